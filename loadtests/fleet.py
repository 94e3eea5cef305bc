"""The accounts and worker tokens a load test makes for itself.

Each Locust process that runs users (the only one, or each worker) makes its own
fleet at test start with an admin token: `accounts` accounts named
`lt-<run>-<n>`, `dry_accounts` of them (spread evenly) with `dry_units` as their
monthly allotment (they run dry within a few calls and are then refused) and the
others with `units`; and one worker token per group of at most ACCOUNTS_PER_TOKEN_MAX
accounts (the server's bound), scoped to that group. At test stop it revokes the
tokens. The accounts stay (Tally deletes no account); their names say which run
made them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import grpc
from gevent.pool import Pool
from google.protobuf.duration_pb2 import Duration

from tally.auth.book import ACCOUNTS_PER_TOKEN_MAX
from tally_calls import Metadata
from tally_client.v1 import account_pb2, account_pb2_grpc, token_pb2, token_pb2_grpc

ACCOUNT_PREFIX = "lt"
# A safety net for a run whose test_stop never came: its tokens die on their own.
TOKEN_LIFETIME_S = 24 * 3600
SETUP_CALLS_IN_FLIGHT_MAX = 16


@dataclass(frozen=True)
class FleetPlan:
    accounts: int
    units: int
    dry_accounts: int
    dry_units: int

    def __post_init__(self) -> None:
        if self.accounts < 1:
            raise ValueError("--tally-accounts must be at least 1")
        if not 0 <= self.dry_accounts < self.accounts:
            raise ValueError("--tally-dry-accounts must be below --tally-accounts")
        if self.units < 1 or self.dry_units < 0:
            raise ValueError("--tally-units must be positive and --tally-dry-units not negative")


@dataclass(frozen=True)
class Group:
    """Accounts and the worker token scoped to them (a group may lack one kind)."""

    accounts: tuple[str, ...]  # with `units`
    dry_accounts: tuple[str, ...]  # with `dry_units`
    token: str
    token_id: str


@dataclass(frozen=True)
class Fleet:
    run_id: str
    groups: tuple[Group, ...]

    @property
    def accounts(self) -> int:
        return sum(len(group.accounts) + len(group.dry_accounts) for group in self.groups)


def account_ids(run_id: str, count: int) -> list[str]:
    return [f"{ACCOUNT_PREFIX}-{run_id}-{n:06d}" for n in range(count)]


def build(
    channel: grpc.Channel, admin: Metadata, plan: FleetPlan, timeout_s: float
) -> Fleet:
    """Creates the plan's accounts and their worker tokens (grpc.RpcError on refusal)."""
    accounts = account_pb2_grpc.AccountServiceStub(channel)
    tokens = token_pb2_grpc.TokenServiceStub(channel)
    run_id = secrets.token_hex(4)
    ids = account_ids(run_id, plan.accounts)
    dry = {ids[n * plan.accounts // plan.dry_accounts] for n in range(plan.dry_accounts)}

    def create(account_id: str) -> grpc.RpcError | None:
        allotment = plan.dry_units if account_id in dry else plan.units
        try:
            accounts.CreateAccount(
                account_pb2.CreateAccountRequest(
                    account_id=account_id,
                    monthly_allotment=allotment,
                    labels={"made_by": "locust", "run": run_id},
                ),
                timeout=timeout_s,
                metadata=admin,
            )
        except grpc.RpcError as error:
            return error
        return None

    # The first alone: a wrong address or token is told once, not once per account.
    failed = [create(ids[0])]
    if failed[0] is None:
        failed += Pool(SETUP_CALLS_IN_FLIGHT_MAX).imap_unordered(create, ids[1:])
    for error in failed:
        if error is not None:
            raise error
    groups = []
    for start in range(0, len(ids), ACCOUNTS_PER_TOKEN_MAX):
        scope = ids[start : start + ACCOUNTS_PER_TOKEN_MAX]
        made = tokens.CreateToken(
            token_pb2.CreateTokenRequest(
                role="worker",
                accounts=scope,
                name=f"locust {run_id} {start // ACCOUNTS_PER_TOKEN_MAX}",
                expires_in=Duration(seconds=TOKEN_LIFETIME_S),
            ),
            timeout=timeout_s,
            metadata=admin,
        )
        groups.append(Group(tuple(a for a in scope if a not in dry),
                            tuple(a for a in scope if a in dry), made.token, made.info.token_id))
    return Fleet(run_id, tuple(groups))


def retire(
    channel: grpc.Channel, admin: Metadata, fleet: Fleet, timeout_s: float
) -> None:
    """Revokes the fleet's worker tokens."""
    tokens = token_pb2_grpc.TokenServiceStub(channel)
    for group in fleet.groups:
        tokens.RevokeToken(
            token_pb2.RevokeTokenRequest(token_id=group.token_id),
            timeout=timeout_s,
            metadata=admin,
        )
