"""Locust load test of Tally: users that behave like generation workers.

Each user is one worker with its own gRPC channel (its own connection) to
--tally-target, calling as a worker token scoped to a group of the accounts the
load test made at start (fleet.py). After each task it waits uniformly between 0
and --tally-think-max seconds (default 1.0).

The mix is dealt from decks, so the shares are exact over every 20 tasks (and 20
jobs) of each user while the order is random: a short run still does every kind.
Tasks, per 20:

| task    | of 20 | what the worker does                                             |
|---------|-------|------------------------------------------------------------------|
| job     | 16    | Reserve (with labels), generate for 0..--tally-job-max s         |
|         |       | (default 0.5), then finish as its card says (below)              |
| quote   | 2     | Quote: the exact cost of a job before accepting it               |
| charge  | 1     | Charge: a short job, reserved and committed at once              |
| balance | 1     | GetBalance                                                       |

Jobs, per 20: 11 Commit the whole hold; 3 Commit part of it (quantity below the
hold's); 2 Refund the hold instead (the generation failed); 1 Commits, then
Refunds part of the charge (a customer complaint); 1 is long and Extends its hold
before it Commits; 2 are for a dry account (--tally-dry-accounts with
--tally-dry-units each): they Commit while it has units and are refused after.
Every other job, quote, charge and balance read is for an account with units.

Operations come from the default catalog, quantities are 1..4 (2..4 for a partial
commit). Every call is reported to Locust under its RPC's name (tally_calls.py): a
RESOURCE_EXHAUSTED for want of units as `<Rpc> [refused]` and one shed by a busy
server as `<Rpc> [shed]`, both counted as successes, so failures are real failures.

Every Reserve, Charge and Refund has its own idempotency key; a retry (UNAVAILABLE,
or shed) sends the same request again. TLS: the client variables of the CLI
(TALLY_TLS_CA, TALLY_TLS_CLIENT_CERT, TALLY_TLS_CLIENT_KEY); unset: plaintext.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from google.protobuf.duration_pb2 import Duration
from locust import User, events, task
from locust.env import Environment
from locust.runners import STATE_INIT, STATE_SPAWNING, MasterRunner, Runner
from locust.stats import CSV_STATS_INTERVAL_SEC

import fleet
from tally_calls import Caller, CallFailed, Metadata
from tally_client.tls import ClientTls
from tally_client.v1 import quota_pb2, quota_pb2_grpc

# gRPC must wait on gevent's loop, not block the process: before any channel exists.
grpc_gevent.init_gevent()

log = logging.getLogger("tally.loadtest")

OPERATIONS = ("image.generate.sdxl", "image.upscale", "image.vectorize")
MODELS = ("sdxl-1.0", "sdxl-turbo", "upscaler-x4")
PROJECTS = 8
QUANTITY_MAX = 4
HOLD_TTL_S = 60
EXTENDED_TTL_S = 120
QUIT_POLL_S = 0.1
TASKS = {"job": 16, "quote": 2, "charge": 1, "balance": 1}
JOBS = {"commit": 11, "partial": 3, "refund_instead": 2, "commit_then_refund": 1,
        "extended": 1, "dry": 2}


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    parser.add_argument("--tally-target", env_var="TALLY_TARGET", default="127.0.0.1:50051",
                        help="host:port of the Tally server")
    parser.add_argument("--tally-token", env_var="TALLY_TOKEN", default="", is_secret=True,
                        help="an admin token: makes the accounts and the worker tokens")
    parser.add_argument("--tally-token-file", env_var="TALLY_TOKEN_FILE", default="",
                        help="a file holding the admin token (when --tally-token is unset)")
    parser.add_argument("--tally-accounts", type=int, default=100,
                        help="accounts made by each Locust process that runs users")
    parser.add_argument("--tally-units", type=int, default=1_000_000,
                        help="monthly allotment of each account")
    parser.add_argument("--tally-dry-accounts", type=int, default=10,
                        help="of those accounts, how many get --tally-dry-units only")
    parser.add_argument("--tally-dry-units", type=int, default=20,
                        help="monthly allotment of a dry account")
    parser.add_argument("--tally-think-max", type=float, default=1.0,
                        help="a user waits 0..this many seconds after each task")
    parser.add_argument("--tally-job-max", type=float, default=0.5,
                        help="a job generates for 0..this many seconds between Reserve and Commit")
    parser.add_argument("--tally-timeout", type=float, default=5.0,
                        help="deadline of each call, seconds")
    parser.add_argument("--tally-retries", type=int, default=2,
                        help="retries of an UNAVAILABLE or shed call, with the same request")


def open_channel(target: str) -> grpc.Channel:
    # A subchannel of its own: each user holds its own connection, as each worker does.
    options = [("grpc.use_local_subchannel_pool", 1)]
    tls = ClientTls.from_sources(None, None, None, os.environ)
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


def admin_token(options: Any) -> str:
    token: str = options.tally_token
    if not token and options.tally_token_file:
        with open(options.tally_token_file, encoding="utf-8") as file:
            token = file.read().strip()
    return token


@dataclass
class Fleets:
    """This process's fleet, made at test start; users take its groups in turn."""

    current: fleet.Fleet | None = None
    turns: itertools.count[int] = field(default_factory=itertools.count)

    def next_group(self) -> fleet.Group | None:
        if self.current is None:
            return None
        groups = self.current.groups
        return groups[next(self.turns) % len(groups)]


FLEETS = Fleets()


def report_failure(environment: Environment, what: str, error: Exception) -> None:
    """Logs a failure of the load test's own work; the run will exit 2."""
    if isinstance(error, grpc.RpcError):
        error = CallFailed(error.code(), error.details() or "")
    log.error("tally load test: %s failed: %s", what, error)
    environment.process_exit_code = 2


def quit_once_spawned(runner: Runner) -> None:
    """Quits the run; a quit while users are still being spawned leaves them running."""
    while runner.state in (STATE_INIT, STATE_SPAWNING):
        gevent.sleep(QUIT_POLL_S)
    runner.quit()


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def make_fleet(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # each worker makes its own
    options: Any = environment.parsed_options
    try:
        plan = fleet.FleetPlan(options.tally_accounts, options.tally_units,
                               options.tally_dry_accounts, options.tally_dry_units)
        channel = open_channel(options.tally_target)
        try:
            made = fleet.build(channel, bearer(admin_token(options)), plan, options.tally_timeout)
        finally:
            channel.close()
    except (ValueError, OSError, grpc.RpcError) as error:
        report_failure(environment, "making the accounts and worker tokens", error)
        if environment.runner is not None:
            gevent.spawn(quit_once_spawned, environment.runner)
        return
    FLEETS.current = made
    log.info("tally load test: run %s made %d accounts and %d worker tokens",
             made.run_id, made.accounts, len(made.groups))


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def retire_fleet(environment: Environment, **_: Any) -> None:
    made, FLEETS.current = FLEETS.current, None
    if made is None:
        return
    options: Any = environment.parsed_options
    channel = open_channel(options.tally_target)
    try:
        fleet.retire(channel, bearer(admin_token(options)), made, options.tally_timeout)
    except grpc.RpcError as error:
        report_failure(environment, "revoking the worker tokens", error)
    finally:
        channel.close()


@events.quit.add_listener  # type: ignore[untyped-decorator]
def let_the_csv_catch_up(**_: Any) -> None:
    # Locust writes its CSV report every CSV_STATS_INTERVAL_SEC and not again at the
    # end: one more interval lets it record the final counts before the files close.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.1)


class Deck:
    """Cards dealt in a random order; a full deck is dealt before it is reshuffled."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.cards = [card for card, count in counts.items() for _ in range(count)]
        self.dealt = len(self.cards)

    def deal(self) -> str:
        if self.dealt == len(self.cards):
            random.shuffle(self.cards)
            self.dealt = 0
        self.dealt += 1
        return self.cards[self.dealt - 1]


class GenerationWorker(User):
    """One generation worker: its own connection, its worker token, its accounts."""

    channel: grpc.Channel | None = None  # None until on_start had a fleet to work for

    def wait_time(self) -> float:
        return random.uniform(0, self.environment.parsed_options.tally_think_max)

    def on_start(self) -> None:
        group = FLEETS.next_group()
        while group is None:
            # the setup failed and the run is quitting (quit_once_spawned)
            self.wait()  # type: ignore[no-untyped-call]
        options = self.environment.parsed_options
        # a group too small to hold both kinds uses what it has
        self.accounts = group.accounts or group.dry_accounts
        self.dry_accounts = group.dry_accounts or group.accounts
        self.worker = f"locust-{os.getpid()}-{id(self):x}"
        self.tasks_deck, self.jobs_deck = Deck(TASKS), Deck(JOBS)
        self.channel = channel = open_channel(options.tally_target)
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self.caller = Caller(self.environment.events.request, bearer(group.token),
                             options.tally_timeout, options.tally_retries, gevent.sleep)

    def on_stop(self) -> None:
        if self.channel is not None:
            self.channel.close()

    @task
    def next_task(self) -> None:
        card = self.tasks_deck.deal()
        if card == "job":
            self.job(self.jobs_deck.deal())
        elif card == "quote":
            self.quote()
        elif card == "charge":
            self.charge()
        else:
            self.balance()

    def _labels(self) -> dict[str, str]:
        return {"model": random.choice(MODELS),
                "project": f"project-{random.randrange(PROJECTS)}", "worker": self.worker}

    def job(self, card: str) -> None:
        accounts = self.dry_accounts if card == "dry" else self.accounts
        quantity = random.randint(2 if card == "partial" else 1, QUANTITY_MAX)
        held = self.caller.call("Reserve", self.quota.Reserve, quota_pb2.ReserveRequest(
            account_id=random.choice(accounts), operation=random.choice(OPERATIONS),
            quantity=quantity, idempotency_key=uuid.uuid4().hex,
            ttl=Duration(seconds=HOLD_TTL_S), labels=self._labels()))
        if held is None:
            return
        gevent.sleep(random.uniform(0, self.environment.parsed_options.tally_job_max))
        if card == "refund_instead":
            self._refund(held.reservation_id, None, "generation failed")
            return
        if card == "extended":
            self.caller.call("Extend", self.quota.Extend, quota_pb2.ExtendRequest(
                reservation_id=held.reservation_id, ttl=Duration(seconds=EXTENDED_TTL_S)))
        commit = quota_pb2.CommitRequest(reservation_id=held.reservation_id)
        if card == "partial":
            commit.quantity = random.randint(1, quantity - 1)
        charged = self.caller.call("Commit", self.quota.Commit, commit)
        if card == "commit_then_refund" and charged is not None and charged.units_charged:
            self._refund(held.reservation_id, random.randint(1, charged.units_charged),
                         "customer complaint")

    def _refund(self, reservation_id: str, units: int | None, reason: str) -> None:
        request = quota_pb2.RefundRequest(reservation_id=reservation_id, reason=reason,
                                          idempotency_key=uuid.uuid4().hex)
        if units is not None:
            request.units = units
        self.caller.call("Refund", self.quota.Refund, request)

    def quote(self) -> None:
        self.caller.call("Quote", self.quota.Quote, quota_pb2.QuoteRequest(
            account_id=random.choice(self.accounts), operation=random.choice(OPERATIONS),
            quantity=random.randint(1, QUANTITY_MAX)))

    def charge(self) -> None:
        self.caller.call("Charge", self.quota.Charge, quota_pb2.ChargeRequest(
            account_id=random.choice(self.accounts), operation=random.choice(OPERATIONS),
            quantity=random.randint(1, QUANTITY_MAX), idempotency_key=uuid.uuid4().hex,
            labels=self._labels()))

    def balance(self) -> None:
        self.caller.call("GetBalance", self.quota.GetBalance,
                         quota_pb2.GetBalanceRequest(account_id=random.choice(self.accounts)))
