"""Locust load test of Tally: users that behave like generation workers.

Each user is one worker with its own gRPC channel (its own connection) to
--tally-target, calling as a worker token scoped to a group of the accounts the
load test made at start (fleet.py). It runs these tasks, picked by weight, waiting
uniformly between 0 and --tally-think-max seconds (default 1.0) after each:

| task    | weight | what the worker does                                                  |
|---------|--------|-----------------------------------------------------------------------|
| job     | 80     | Reserve (with labels), generate for 0..--tally-job-max s (default 0.5),|
|         |        | then: Commit the whole hold (75%), Commit part of it (15%: quantity   |
|         |        | below the hold's), or Refund the hold instead (10%: the job failed).  |
|         |        | 10% of jobs are long and Extend their hold first; 5% of commits are   |
|         |        | followed by a Refund of part of the charge (a customer complaint).    |
| quote   | 10     | Quote: the exact cost of a job before accepting it                    |
| charge  | 5      | Charge: a short job, reserved and committed at once                   |
| balance | 5      | GetBalance                                                            |

Operations come from the default catalog, quantities are 1..4. Every call is
reported to Locust under its RPC's name (tally_calls.py): a RESOURCE_EXHAUSTED for
want of units as `<Rpc> [refused]` and one shed by a busy server as `<Rpc> [shed]`,
both counted as successes, so failures are real failures. Dry accounts
(--tally-dry-accounts, --tally-dry-units) run out within a few calls, so refusals
always show up.

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
from locust.exception import StopUser
from locust.runners import MasterRunner

import fleet
from tally.client_tls import ClientTls
from tally.v1 import quota_pb2, quota_pb2_grpc
from tally_calls import Caller, Metadata

# gRPC must wait on gevent's loop, not block the process: before any channel exists.
grpc_gevent.init_gevent()

log = logging.getLogger("tally.loadtest")

OPERATIONS = ("image.generate.sdxl", "image.upscale", "image.vectorize")
MODELS = ("sdxl-1.0", "sdxl-turbo", "upscaler-x4")
PROJECTS = 8
QUANTITY_MAX = 4
HOLD_TTL_S = 60
EXTENDED_TTL_S = 120
LONG_JOB_SHARE = 0.10
REFUND_INSTEAD_SHARE = 0.10
PARTIAL_COMMIT_SHARE = 0.15
REFUND_AFTER_COMMIT_SHARE = 0.05


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


def fail_setup(environment: Environment, what: str, error: Exception) -> None:
    log.error("tally load test: %s failed: %s", what, error)
    environment.process_exit_code = 2
    if environment.runner is not None:
        gevent.spawn(environment.runner.quit)


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
        fail_setup(environment, "making the accounts and worker tokens", error)
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
        fail_setup(environment, "revoking the worker tokens", error)
    finally:
        channel.close()


class GenerationWorker(User):
    """One generation worker: its own connection, its worker token, its accounts."""

    def wait_time(self) -> float:
        return random.uniform(0, self.environment.parsed_options.tally_think_max)

    def on_start(self) -> None:
        group = FLEETS.next_group()
        if group is None:
            raise StopUser  # the setup failed and said so
        options = self.environment.parsed_options
        self.accounts = group.accounts
        self.worker = f"locust-{os.getpid()}-{id(self):x}"
        self.channel = open_channel(options.tally_target)
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)
        self.caller = Caller(self.environment.events.request, bearer(group.token),
                             options.tally_timeout, options.tally_retries)

    def on_stop(self) -> None:
        self.channel.close()

    def _work(self) -> tuple[str, str, int]:
        """An account, an operation and a quantity for the next call."""
        return (random.choice(self.accounts), random.choice(OPERATIONS),
                random.randint(1, QUANTITY_MAX))

    def _labels(self) -> dict[str, str]:
        return {"model": random.choice(MODELS),
                "project": f"project-{random.randrange(PROJECTS)}", "worker": self.worker}

    @task(80)
    def job(self) -> None:
        account_id, operation, quantity = self._work()
        held = self.caller.call("Reserve", self.quota.Reserve, quota_pb2.ReserveRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=uuid.uuid4().hex, ttl=Duration(seconds=HOLD_TTL_S),
            labels=self._labels()))
        if held is None:
            return
        gevent.sleep(random.uniform(0, self.environment.parsed_options.tally_job_max))
        if random.random() < LONG_JOB_SHARE:
            self.caller.call("Extend", self.quota.Extend, quota_pb2.ExtendRequest(
                reservation_id=held.reservation_id, ttl=Duration(seconds=EXTENDED_TTL_S)))
        outcome = random.random()
        if outcome < REFUND_INSTEAD_SHARE:
            self._refund(held.reservation_id, None, "generation failed")
            return
        commit = quota_pb2.CommitRequest(reservation_id=held.reservation_id)
        if outcome < REFUND_INSTEAD_SHARE + PARTIAL_COMMIT_SHARE and quantity > 1:
            commit.quantity = random.randint(1, quantity - 1)
        charged = self.caller.call("Commit", self.quota.Commit, commit)
        if (charged is not None and charged.units_charged > 0
                and random.random() < REFUND_AFTER_COMMIT_SHARE):
            self._refund(held.reservation_id, random.randint(1, charged.units_charged),
                         "customer complaint")

    def _refund(self, reservation_id: str, units: int | None, reason: str) -> None:
        request = quota_pb2.RefundRequest(reservation_id=reservation_id, reason=reason,
                                          idempotency_key=uuid.uuid4().hex)
        if units is not None:
            request.units = units
        self.caller.call("Refund", self.quota.Refund, request)

    @task(10)
    def quote(self) -> None:
        account_id, operation, quantity = self._work()
        self.caller.call("Quote", self.quota.Quote, quota_pb2.QuoteRequest(
            account_id=account_id, operation=operation, quantity=quantity))

    @task(5)
    def charge(self) -> None:
        account_id, operation, quantity = self._work()
        self.caller.call("Charge", self.quota.Charge, quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=uuid.uuid4().hex, labels=self._labels()))

    @task(5)
    def balance(self) -> None:
        self.caller.call("GetBalance", self.quota.GetBalance,
                         quota_pb2.GetBalanceRequest(account_id=random.choice(self.accounts)))
