"""Stateful properties: random walks of the hot path against an exact model.

A hypothesis RuleBasedStateMachine drives the real in-process authority (its
gRPC server over the session redis-server, a manual clock) on an event loop
of its own, and keeps a plain-Python model of every account it creates
(tests/integration/model.py). After every step each account's GetBalance
must satisfy the design invariant

    units_granted_total == available + held + charged - refunded + expired

with no grant below zero, and must equal the model's figures (available,
held, overage, period consumption, auto-purchases, lifetime totals and every
grant in consumption order). Every answer and every refusal (status code,
and for RESOURCE_EXHAUSTED the available/required details) is checked
against the model as well.

Time: every script first brings its account up to the clock (due holds
expire, grants expire, a new period begins), so the model applies all of it
the moment the clock moves. Two things keep a case deterministic, as
hypothesis needs (it replays a case to shrink it):
- the background reaper and period sweeper are stopped (they would write at
  moments the test does not control); the reaper_step rule runs the reaper's
  per-hold script instead, and the sweep_step rule a whole sweeper pass;
- a new period's allotment appears at the first write in the period, and a
  period nobody wrote in is skipped (its allotment never exists). Before the
  clock moves past an account's period end, the test makes sure the current
  period was written (an UpdateAccount that changes nothing that counts, and
  only when no call wrote the account in this period), so each period the
  clock passes through is applied exactly once, as in the model.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tally.store.contract import ExpireHoldRequest
from tally.store.state_images import StateImages, unpack_image
from tally_client.errors import insufficient_units
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.cluster_support import RedisClusterProcesses
from tests.integration.model import (
    ALLOW,
    AUTO_PURCHASE,
    DENY,
    EXPIRED,
    HELD,
    Account,
    Model,
    ModelError,
    Outcome,
)
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running

if TYPE_CHECKING:
    from tally_client.v1 import account_pb2_grpc, catalog_pb2_grpc, quota_pb2_grpc

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
OPERATIONS = ("image.generate.sdxl", "image.upscale", "image.vectorize")
ACCOUNTS_MAX = 3
HOLD_TTL_S_MAX = 3600  # the server's default hold_ttl_max
POLICY_ENUM = {DENY: common_pb2.OVERAGE_POLICY_DENY, ALLOW: common_pb2.OVERAGE_POLICY_ALLOW,
               AUTO_PURCHASE: common_pb2.OVERAGE_POLICY_AUTO_PURCHASE}


@dataclass(frozen=True)
class Plan:
    policy: str
    allotment: int
    overage_limit: int  # AUTO_PURCHASE: the per-period cap
    ap_units: int
    ap_threshold: int


PLANS = st.builds(
    Plan,
    policy=st.sampled_from([DENY, ALLOW, AUTO_PURCHASE]),
    allotment=st.sampled_from([0, 20, 50, 100, 200, 500]),
    overage_limit=st.sampled_from([0, 20, 50, 100, 300]),
    ap_units=st.sampled_from([10, 25, 50, 100]),
    ap_threshold=st.sampled_from([0, 10, 50, 100]),
)

MISUSES = ("reuse key", "create same", "create other", "unknown commit", "unknown refund",
           "unknown extend", "unknown reserve", "unknown charge", "unknown purchase",
           "unknown balance")

R = TypeVar("R")
Reply = Any  # a response message, or the AioRpcError the call raised


def timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def duration(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def balance_figures(b: common_pb2.Balance) -> dict[str, Any]:
    return {
        "available": b.available, "held": b.held, "overage_used": b.overage_used,
        "overage_held": b.overage_held, "overage_limit": b.overage_limit,
        "period_consumed": b.period_consumed, "auto_purchased": b.auto_purchased,
        "period": (b.period_start.ToMilliseconds(), b.period_end.ToMilliseconds()),
        "granted": b.units_granted_total, "charged": b.units_charged_total,
        "refunded": b.units_refunded_total, "expired": b.units_expired_total,
        "grants": [
            (common_pb2.GrantKind.Name(g.kind).removeprefix("GRANT_KIND_"), g.units_granted,
             g.units_remaining,
             g.expires_at.ToMilliseconds() if g.HasField("expires_at") else 0)
            for g in b.grants
        ],
    }


def model_figures(acct: Account) -> dict[str, Any]:
    return {
        "available": acct.available(), "held": acct.held, "overage_used": acct.overage_used,
        "overage_held": acct.overage_held, "overage_limit": acct.overage_limit,
        "period_consumed": acct.period_consumed, "auto_purchased": acct.auto_purchased,
        "period": (acct.period_start_ms, acct.period_end_ms),
        "granted": acct.total_granted, "charged": acct.total_charged,
        "refunded": acct.total_refunded, "expired": acct.total_expired,
        "grants": [(g.kind, g.units_granted, g.units_remaining, g.expires_at_ms)
                   for g in acct.grants],
    }


def check_books(b: common_pb2.Balance) -> None:
    """The design invariant and non-negative grants, from the server's own figures."""
    rhs = (b.available + b.held + b.units_charged_total - b.units_refunded_total
           + b.units_expired_total)
    assert b.units_granted_total == rhs, f"books out of balance: {b}"
    assert all(g.units_remaining >= 0 for g in b.grants), f"negative grant: {b}"
    remaining = sum(g.units_remaining for g in b.grants)
    assert b.available == remaining - b.overage_used - b.overage_held, f"available: {b}"
    assert b.held >= 0 and b.overage_used >= 0 and b.overage_held >= 0, f"negative: {b}"


class QuotaMachine(RuleBasedStateMachine):
    """Random calls of the quota API, each checked against the model."""

    redis_url: ClassVar[str] = ""
    accounts = Bundle("accounts")
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.running: Running = self.loop.run_until_complete(start_running(self.redis_url))
        # Deterministic cases: no background reaper or sweeper (see the module notes).
        self.running.authority.reaper.stop()
        self.running.authority.sweeper.stop()
        self.quota = cast("quota_pb2_grpc.QuotaServiceAsyncStub", self.running.quota)
        self.admin = cast("account_pb2_grpc.AccountServiceAsyncStub", self.running.accounts)
        self.catalog = cast("catalog_pb2_grpc.CatalogServiceAsyncStub", self.running.catalog)
        self.run_id = uuid.uuid4().hex[:10]
        self.counter = 0
        listed = self._ok(self._rpc(lambda: self.catalog.ListPrices(
            catalog_pb2.ListPricesRequest())))
        prices = {p.operation: p.units_per_quantity for p in listed.prices}
        assert set(OPERATIONS) <= set(prices), f"default catalog missing: {prices}"
        window_ms = round(self.running.authority.settings.idempotency_window * 1000)
        retention_ms = self.running.authority.store.limits.reservation_retention_ms
        self.model = Model(T0_MS, {op: prices[op] for op in OPERATIONS}, window_ms, retention_ms)
        # what each idempotency key was first sent with, to send it again
        self.sent: dict[tuple[str, str], tuple[str, tuple[Any, ...]]] = {}
        self.commit_answers: dict[str, quota_pb2.CommitResponse] = {}

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(stop_running(self.running))
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # --- plumbing --------------------------------------------------------------

    def _rpc(self, make: Callable[[], Awaitable[R]]) -> R | grpc.aio.AioRpcError:
        async def call() -> R | grpc.aio.AioRpcError:
            try:
                return await make()
            except grpc.aio.AioRpcError as error:
                return error

        return self.loop.run_until_complete(call())

    @staticmethod
    def _ok(reply: R | grpc.aio.AioRpcError) -> R:
        if isinstance(reply, grpc.aio.AioRpcError):
            raise AssertionError(f"expected success, got {reply.code()}: {reply.details()}")
        return reply

    @staticmethod
    def _refused(reply: Reply, expected: ModelError) -> None:
        assert isinstance(reply, grpc.aio.AioRpcError), (
            f"expected {expected.code}, got success: {reply}"
        )
        assert reply.code() == expected.code, (
            f"expected {expected.code}, got {reply.code()}: {reply.details()}"
        )
        if expected.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            detail = insufficient_units(reply.trailing_metadata())
            assert detail is not None, "RESOURCE_EXHAUSTED without InsufficientUnits"
            assert (detail.available, detail.required) == (expected.available, expected.required)

    def _key(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}-{self.run_id}-{self.counter}"

    def _check_balance(self, b: common_pb2.Balance, account_id: str) -> None:
        check_books(b)
        assert b.account_id == account_id
        assert b.as_of.ToMilliseconds() == self.model.now_ms
        expected = model_figures(self.model.accounts[account_id])
        assert balance_figures(b) == expected, f"{account_id}: server != model"

    def _same_answer(self, reply: Any, first: Any, account_id: str) -> None:
        """A replay answers what the first call answered, flagged replayed, with the
        account's balance as of the replay (the model's now)."""
        again = copy.deepcopy(first)
        again.replayed = True
        again.balance.CopyFrom(reply.balance)
        assert reply == again, f"replay differs:\n{reply}\nfirst:\n{first}"
        self._check_balance(reply.balance, account_id)

    def _predict(self, operation: Callable[[], Outcome]) -> Outcome | ModelError:
        try:
            return operation()
        except ModelError as error:
            return error

    # --- calls, each checked against the model -------------------------------

    def _reserve(
        self, account_id: str, operation: str, quantity: int, ttl_ms: int, key: str
    ) -> str | None:
        expected = self._predict(
            lambda: self.model.reserve(account_id, operation, quantity, ttl_ms, key))
        request = quota_pb2.ReserveRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=key, ttl=duration(ttl_ms),
        )
        reply = self._rpc(lambda: self.quota.Reserve(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return None
        ok = self._ok(reply)
        if expected.replay is not None:
            self._same_answer(ok, expected.replay.answer, account_id)
            return None
        assert expected.reservation is not None
        assert not ok.replayed
        assert (ok.units, ok.quantity, ok.units_per_quantity, ok.expires_at.ToMilliseconds()) == (
            expected.units, quantity or 1, self.model.prices[operation], expected.expires_at_ms)
        self.model.bind(account_id, key, expected.reservation, ok.reservation_id, ok)
        self.sent[(account_id, key)] = ("reserve", (account_id, operation, quantity, ttl_ms))
        self._check_balance(ok.balance, account_id)
        return ok.reservation_id

    def _charge(self, account_id: str, operation: str, quantity: int, key: str) -> str | None:
        expected = self._predict(lambda: self.model.charge(account_id, operation, quantity, key))
        request = quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key
        )
        reply = self._rpc(lambda: self.quota.Charge(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return None
        ok = self._ok(reply)
        if expected.replay is not None:
            self._same_answer(ok, expected.replay.answer, account_id)
            return None
        assert expected.reservation is not None
        assert not ok.replayed
        assert (ok.units, ok.overage_units) == (expected.units, expected.overage_units)
        self.model.bind(account_id, key, expected.reservation, ok.reservation_id, ok)
        self.sent[(account_id, key)] = ("charge", (account_id, operation, quantity))
        self._check_balance(ok.balance, account_id)
        return ok.reservation_id

    def _commit(self, rid: str, quantity: int | None) -> None:
        expected = self._predict(lambda: self.model.commit(rid, quantity))
        request = quota_pb2.CommitRequest(reservation_id=rid)
        if quantity is not None:
            request.quantity = quantity
        reply = self._rpc(lambda: self.quota.Commit(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return
        ok = self._ok(reply)
        figures = (ok.units_charged, ok.units_released, ok.overage_units, ok.late)
        assert figures == (expected.units, expected.units_released, expected.overage_units,
                           expected.late), f"commit answered {figures}, expected {expected}"
        assert ok.replayed == expected.replayed
        if expected.replayed:
            if rid in self.commit_answers:
                self._same_answer(ok, self.commit_answers[rid],
                                  self.model.reservations[rid].account_id)
            return
        self.commit_answers[rid] = ok
        self._check_balance(ok.balance, self.model.reservations[rid].account_id)

    def _refund(self, account_id: str, rid: str, units: int | None, key: str) -> None:
        expected = self._predict(lambda: self.model.refund(account_id, rid, units, key))
        request = quota_pb2.RefundRequest(reservation_id=rid, idempotency_key=key)
        if units is not None:
            request.units = units
        reply = self._rpc(lambda: self.quota.Refund(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return
        ok = self._ok(reply)
        if expected.replay is not None:
            self._same_answer(ok, expected.replay.answer, account_id)
            return
        assert not ok.replayed
        assert (ok.units_refunded, ok.units_refundable) == (
            expected.units, expected.units_refundable)
        self.model.keep_answer(account_id, key, ok)
        self.sent[(account_id, key)] = ("refund", (account_id, rid, units))
        self._check_balance(ok.balance, account_id)

    def _purchase(self, account_id: str, units: int, expires_at_ms: int, key: str) -> None:
        expected = self._predict(
            lambda: self.model.purchase(account_id, units, expires_at_ms, key))
        request = account_pb2.PurchaseUnitsRequest(
            account_id=account_id, units=units, idempotency_key=key
        )
        if expires_at_ms:
            request.expires_at.CopyFrom(timestamp(expires_at_ms))
        reply = self._rpc(lambda: self.admin.PurchaseUnits(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return
        ok = self._ok(reply).grant
        if expected.replay is not None:
            # PurchaseUnits answers a Grant, which has no `replayed` flag: the
            # same grant again (and, checked after the step, nothing moved).
            assert ok == expected.replay.answer, f"replay differs: {ok}"
            return
        assert expected.grant is not None
        got = (common_pb2.GrantKind.Name(ok.kind).removeprefix("GRANT_KIND_"),
               ok.units_granted, ok.units_remaining,
               ok.expires_at.ToMilliseconds() if ok.HasField("expires_at") else 0)
        assert got == ("PURCHASE", units, units, expires_at_ms)
        self.model.keep_answer(account_id, key, ok)
        self.sent[(account_id, key)] = ("purchase", (account_id, units, expires_at_ms))

    def _send(self, method: str, args: tuple[Any, ...], key: str) -> None:
        calls: dict[str, Callable[..., object]] = {
            "reserve": self._reserve, "charge": self._charge,
            "refund": self._refund, "purchase": self._purchase,
        }
        calls[method](*args, key)

    def _move_clock(self, now_ms: int) -> None:
        """Moves both clocks; first writes the current period of every account the
        move takes past its period end, unless a write already did."""
        assert now_ms >= self.model.now_ms
        for account_id, acct in self.model.accounts.items():
            if now_ms < acct.period_end_ms:
                continue
            if acct.persisted_period_start_ms == acct.period_start_ms:
                continue
            request = account_pb2.UpdateAccountRequest(account_id=account_id, replace_labels=True)
            self._ok(self._rpc(functools.partial(self.admin.UpdateAccount, request)))
            self.model.wrote(account_id)
        self.running.clock.set(now_ms)
        self.model.advance_to(now_ms)

    def _next_period_end_ms(self) -> int:
        return min(a.period_end_ms for a in self.model.accounts.values())

    # --- rules -------------------------------------------------------------------

    @initialize(target=accounts, plan=PLANS)
    def first_account(self, plan: Plan) -> str:
        return self._new_account(plan)

    @precondition(lambda self: len(self.model.accounts) < ACCOUNTS_MAX)
    @rule(target=accounts, plan=PLANS)
    def create_account(self, plan: Plan) -> str:
        """DENY, ALLOW with an overage limit, or AUTO_PURCHASE with pack, threshold, cap."""
        return self._new_account(plan)

    def _new_account(self, plan: Plan) -> str:
        account_id = f"prop-{self.run_id}-{len(self.model.accounts)}"
        overage_limit = 0 if plan.policy == DENY else plan.overage_limit
        ap_units, ap_threshold = plan.ap_units, plan.ap_threshold
        if plan.policy != AUTO_PURCHASE:
            ap_units = ap_threshold = 0
        self._create(account_id, plan.policy, plan.allotment, overage_limit, ap_units,
                     ap_threshold)
        return account_id

    def _create(self, account_id: str, policy: str, allotment: int, overage_limit: int,
                ap_units: int, ap_threshold: int) -> None:
        try:
            existed: bool | ModelError = self.model.create_account(
                account_id, policy, allotment, overage_limit, ap_units, ap_threshold)
        except ModelError as error:
            existed = error
        request = account_pb2.CreateAccountRequest(
            account_id=account_id, monthly_allotment=allotment,
            overage_policy=POLICY_ENUM[policy], overage_limit=overage_limit,
            auto_purchase_units=ap_units, auto_purchase_threshold=ap_threshold,
        )
        reply = self._rpc(lambda: self.admin.CreateAccount(request))
        if isinstance(existed, ModelError):
            self._refused(reply, existed)
            return
        ok = self._ok(reply).account
        assert ok.replayed == existed
        assert (ok.monthly_allotment, ok.overage_limit) == (allotment, overage_limit)

    @rule(account_id=accounts, plan=PLANS, drop_pack=st.booleans())
    def change_plan(self, account_id: str, plan: Plan, drop_pack: bool) -> None:
        """UpdateAccount: policy and limits apply at once, the allotment from the next
        period; AUTO_PURCHASE without a pack size is INVALID_ARGUMENT."""
        ap_units = 0 if drop_pack else plan.ap_units
        args = (plan.policy, plan.allotment, plan.overage_limit, ap_units, plan.ap_threshold)
        try:
            expected: ModelError | None = None
            self.model.update_account(account_id, *args)
        except ModelError as error:
            expected = error
        request = account_pb2.UpdateAccountRequest(
            account_id=account_id, monthly_allotment=plan.allotment,
            overage_policy=POLICY_ENUM[plan.policy], overage_limit=plan.overage_limit,
            auto_purchase_units=ap_units, auto_purchase_threshold=plan.ap_threshold,
        )
        reply = self._rpc(lambda: self.admin.UpdateAccount(request))
        if expected is not None:
            self._refused(reply, expected)
            return
        ok = self._ok(reply).account
        got = (common_pb2.OveragePolicy.Name(ok.overage_policy).removeprefix("OVERAGE_POLICY_"),
               ok.monthly_allotment,
               ok.overage_limit, ok.auto_purchase_units, ok.auto_purchase_threshold)
        assert got == args

    @rule(
        target=reservations, account_id=accounts, operation=st.sampled_from(OPERATIONS),
        quantity=st.integers(0, 20), ttl_s=st.integers(1, 600),
    )
    def reserve(self, account_id: str, operation: str, quantity: int, ttl_s: int) -> Any:
        rid = self._reserve(account_id, operation, quantity, ttl_s * SECOND_MS, self._key("r"))
        return multiple() if rid is None else rid

    @rule(
        target=reservations, account_id=accounts, operation=st.sampled_from(OPERATIONS),
        quantity=st.integers(0, 20),
    )
    def charge(self, account_id: str, operation: str, quantity: int) -> Any:
        rid = self._charge(account_id, operation, quantity, self._key("c"))
        return multiple() if rid is None else rid

    @rule(rid=reservations, how=st.sampled_from(["whole", "part", "more", "as before"]),
          n=st.integers(0, 25))
    def commit(self, rid: str, how: str, n: int) -> None:
        """Whole (quantity unset), part (0..reserved), more than reserved, or the
        quantity of the first commit again (a replay when it was committed)."""
        res = self.model.reservations[rid]
        quantity = {"whole": None, "part": min(n, res.quantity), "more": res.quantity + 1 + n,
                    "as before": res.charged_quantity}[how]
        self._commit(rid, quantity)

    @rule(rid=reservations, how=st.sampled_from(["all", "hold", "part", "too much"]),
          n=st.integers(1, 50))
    def refund(self, rid: str, how: str, n: int) -> None:
        """All (units unset), the hold's units, part of a charge, or more than refundable."""
        res = self.model.reservations[rid]
        refundable = res.units_charged - res.units_refunded
        units = {"all": None, "hold": res.units, "part": min(n, max(1, refundable)),
                 "too much": refundable + n}[how]
        self._refund(res.account_id, rid, units, self._key("f"))

    def _unsettled_holds(self) -> list[str]:
        return [rid for rid, res in self.model.reservations.items()
                if res.state in (HELD, EXPIRED)]

    @precondition(lambda self: bool(self._unsettled_holds()))
    @rule(pick=st.integers(0, 99), how=st.sampled_from(["commit", "part", "release", "extend"]),
          n=st.integers(0, 20))
    def settle_hold(self, pick: int, how: str, n: int) -> None:
        """A hold nobody committed or released yet, open or expired (the bundle is
        mostly closed reservations by now): commit it whole or in part (late when
        it expired), release it, or extend it."""
        holds = self._unsettled_holds()
        rid = holds[pick % len(holds)]
        res = self.model.reservations[rid]
        if how == "commit":
            self._commit(rid, None)
        elif how == "part":
            self._commit(rid, min(n, res.quantity))
        elif how == "release":
            self._refund(res.account_id, rid, None, self._key("f"))
        else:
            self._extend(rid, 1 + n * 60)

    @rule(
        account_id=accounts, units=st.integers(1, 150),
        expiry=st.sampled_from(["never", "hours", "days", "period end", "past"]),
        offset=st.integers(1, 40),
    )
    def purchase(self, account_id: str, units: int, expiry: str, offset: int) -> None:
        """Units that never expire, expire in hours or days, or exactly when the
        allotment does (the consumption order then goes by kind: allotment first);
        an expiry in the past is INVALID_ARGUMENT."""
        now = self.model.now_ms
        expires_at_ms = {
            "never": 0, "hours": now + offset * HOUR_MS, "days": now + offset * DAY_MS,
            "period end": self.model.accounts[account_id].period_end_ms,
            "past": max(1, now - offset),
        }[expiry]
        self._purchase(account_id, units, expires_at_ms, self._key("p"))

    @rule(rid=reservations, ttl_s=st.integers(1, HOLD_TTL_S_MAX + 60))
    def extend(self, rid: str, ttl_s: int) -> None:
        """A new lifetime from now (beyond the maximum: INVALID_ARGUMENT); a hold
        that is not open (committed, released, expired) is FAILED_PRECONDITION."""
        self._extend(rid, ttl_s)

    def _extend(self, rid: str, ttl_s: int) -> None:
        ttl_ms = ttl_s * SECOND_MS
        expected: Outcome | ModelError = (
            ModelError(grpc.StatusCode.INVALID_ARGUMENT) if ttl_s > HOLD_TTL_S_MAX
            else self._predict(lambda: self.model.extend(rid, ttl_ms))
        )
        request = quota_pb2.ExtendRequest(reservation_id=rid, ttl=duration(ttl_ms))
        reply = self._rpc(lambda: self.quota.Extend(request))
        if isinstance(expected, ModelError):
            self._refused(reply, expected)
            return
        ok = self._ok(reply)
        assert (ok.reservation_id, ok.units, ok.expires_at.ToMilliseconds()) == (
            rid, expected.units, expected.expires_at_ms)
        self._check_balance(ok.balance, self.model.reservations[rid].account_id)

    @precondition(lambda self: bool(self.sent))
    @rule(pick=st.integers(0, 999))
    def replay(self, pick: int) -> None:
        """The same request under the same key: replayed inside the window (the
        first answer again, nothing moves), a new request after it."""
        account_id, key = sorted(self.sent)[pick % len(self.sent)]
        method, args = self.sent[(account_id, key)]
        self._send(method, args, key)

    @rule(which=st.sampled_from(MISUSES), pick=st.integers(0, 999))
    def misuse(self, which: str, pick: int) -> None:
        """Refusals that must move nothing: an idempotency key reused for another
        request (FAILED_PRECONDITION inside the window), CreateAccount again (same
        settings: replayed; others: ALREADY_EXISTS), a well-formed reservation id
        that names nothing or an account that does not exist (NOT_FOUND)."""
        if which == "reuse key":
            self._reuse_key(pick)
        elif which.startswith("create"):
            account_id = sorted(self.model.accounts)[pick % len(self.model.accounts)]
            a = self.model.accounts[account_id]
            allotment = a.allotment if which == "create same" else a.allotment + 1
            self._create(account_id, a.policy, allotment, a.overage_limit, a.ap_units,
                         a.ap_threshold)
        else:
            self._unknown(which.removeprefix("unknown "))

    def _reuse_key(self, pick: int) -> None:
        if not self.sent:
            return
        account_id, key = sorted(self.sent)[pick % len(self.sent)]
        method, args = self.sent[(account_id, key)]
        if method in ("reserve", "charge"):
            quantity = args[2] or 1
            args = (*args[:2], quantity + 1, *args[3:])
        elif method == "refund":
            args = (*args[:2], 1 if args[2] is None else args[2] + 1)
        else:
            args = (args[0], args[1] + 1, args[2])
        self._send(method, args, key)

    def _unknown(self, which: str) -> None:
        ghost_account = f"prop-{self.run_id}-ghost"
        any_account = next(iter(self.model.accounts))
        keys = self.running.authority.store.keys
        ghost_rid = f"{keys.tag(keys.shard_of(any_account))}.999999999.{any_account}"
        not_found = ModelError(grpc.StatusCode.NOT_FOUND)
        if which == "commit":
            self._commit(ghost_rid, None)
        elif which == "refund":
            self._refund(any_account, ghost_rid, None, self._key("f"))
        elif which == "extend":
            extended = self._rpc(lambda: self.quota.Extend(
                quota_pb2.ExtendRequest(reservation_id=ghost_rid, ttl=duration(SECOND_MS))))
            self._refused(extended, not_found)
        elif which == "reserve":
            self._reserve(ghost_account, OPERATIONS[0], 1, SECOND_MS, self._key("r"))
        elif which == "charge":
            self._charge(ghost_account, OPERATIONS[0], 1, self._key("c"))
        elif which == "purchase":
            self._purchase(ghost_account, 10, 0, self._key("p"))
        else:
            balance = self._rpc(lambda: self.quota.GetBalance(
                quota_pb2.GetBalanceRequest(account_id=ghost_account)))
            self._refused(balance, not_found)

    @rule(account_id=accounts, operation=st.sampled_from(OPERATIONS),
          quantity=st.integers(0, 60))
    def quote(self, account_id: str, operation: str, quantity: int) -> None:
        units, affordable, available = self.model.quote(account_id, operation, quantity)
        reply = self._ok(self._rpc(lambda: self.quota.Quote(quota_pb2.QuoteRequest(
            account_id=account_id, operation=operation, quantity=quantity))))
        assert (reply.units, reply.affordable, reply.available) == (units, affordable, available)

    @rule(rid=reservations)
    def reaper_step(self, rid: str) -> None:
        """The reaper's step for one hold (expire_hold.lua): expires it if due, and is a
        no-op for a hold no longer due (another server reaped it, or it was extended
        or closed after the reaper's scan)."""
        self._reap(rid)

    def _reap(self, rid: str) -> None:
        store = self.running.authority.store
        reply = self.loop.run_until_complete(store.expire_hold(ExpireHoldRequest(rid)))
        assert isinstance(reply.expired, int)

    @rule()
    def sweep_step(self) -> None:
        """A period sweeper pass (close_period.lua on every account due): it applies
        what the model applied when the clock moved, so no figure changes; an account
        whose current period it wrote needs no write before the next period end."""
        authority = self.running.authority
        self.loop.run_until_complete(authority.sweeper.sweep_once())
        images = StateImages.of(authority.store)
        for account_id, acct in self.model.accounts.items():
            raw = self.loop.run_until_complete(images.account(account_id))
            if raw is not None and unpack_image(raw)["period_start"] == acct.period_start_ms:
                self.model.wrote(account_id)

    @rule(unit_ms=st.sampled_from([SECOND_MS, MINUTE_MS, HOUR_MS]), count=st.integers(1, 90))
    def advance_clock(self, unit_ms: int, count: int) -> None:
        """Seconds (holds expire), minutes, or hours (days pass, purchases expire)."""
        self._move_clock(self.model.now_ms + unit_ms * count)

    @rule(side=st.sampled_from(["just before", "after"]), offset_s=st.integers(0, 600))
    def cross_period_end(self, side: str, offset_s: int) -> None:
        """Up to the period end of the account renewing first (holds then straddle
        it), or into its next period (new allotment, old one expires). Never skips
        a whole period: every period is at least 28 days long."""
        end_ms = self._next_period_end_ms()
        if side == "just before":
            target_ms = end_ms - (offset_s + 1) * SECOND_MS
        else:
            target_ms = end_ms + offset_s * MINUTE_MS // 2
        if target_ms > self.model.now_ms:
            self._move_clock(target_ms)

    def _edges(self, kind: str) -> list[tuple[int, tuple[str, str] | None]]:
        """Instants ahead where something lapses, with the idempotency record's key."""
        model = self.model
        edges: list[tuple[int, tuple[str, str] | None]]
        if kind == "hold expiry":
            edges = [(r.expires_at_ms, None) for r in model.reservations.values()
                     if r.state == HELD]
        elif kind == "idempotency lapse":
            edges = [(record.expires_at_ms, sent) for sent, record in model.idem.items()
                     if sent in self.sent]
        else:
            edges = [(g.expires_at_ms, None) for a in model.accounts.values() for g in a.grants]
        return sorted(edge for edge in edges if edge[0] > model.now_ms)

    @rule(kind=st.sampled_from(["hold expiry", "idempotency lapse", "grant expiry"]),
          pick=st.integers(0, 99), early_ms=st.sampled_from([0, 1]))
    def move_to_an_edge(self, kind: str, pick: int, early_ms: int) -> None:
        """Exactly to (or 1 ms before) the instant a hold expires, a grant expires or
        an idempotency record lapses (and then sends that request again): the
        boundaries where off-by-one bugs live."""
        edges = [(at_ms - early_ms, sent) for at_ms, sent in self._edges(kind)]
        edges = [edge for edge in edges if edge[0] > self.model.now_ms]
        if not edges:
            return
        at_ms, sent = edges[pick % len(edges)]
        self._move_clock(at_ms)
        if sent is not None:
            method, args = self.sent[sent]
            self._send(method, args, sent[1])

    @invariant()
    def balances_match_the_model(self) -> None:
        for account_id in self.model.accounts:
            request = quota_pb2.GetBalanceRequest(account_id=account_id)
            reply = self._rpc(functools.partial(self.quota.GetBalance, request))
            self._check_balance(self._ok(reply).balance, account_id)

    @invariant()
    def open_holds_match_the_model(self) -> None:
        for account_id, acct in self.model.accounts.items():
            held = sum(r.units for r in self.model.reservations.values()
                       if r.account_id == account_id and r.state == HELD)
            assert acct.held == held, "model: held != sum of open holds"


def machine_settings(max_examples: int, steps: int) -> settings:
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        print_blob=True,
        # no explain phase: its line tracer (Python < 3.12) slows shrinking tenfold
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# A passing run takes about 30 s; a failing one then shrinks its case to a
# minimal sequence, which can take a few minutes (hypothesis caps it at five).
@pytest.mark.timeout(600)
def test_quota_state_machine_agrees_with_the_model(redis_server: RedisProcess) -> None:
    """Proves random walks of reserve, commit, refund, charge, purchase, extend,
    replays and clock moves keep every balance equal to an exact model, with the
    books balanced and no grant below zero, and every refusal the right status."""
    QuotaMachine.redis_url = redis_server.url
    run_state_machine_as_test(QuotaMachine, settings=machine_settings(150, 40))


@pytest.mark.timeout(600)
def test_the_model_holds_on_a_redis_cluster(redis_cluster: RedisClusterProcesses) -> None:
    """Proves the same random walks, in a short form, agree with the model when the
    authority runs on a 3-master Redis Cluster (accounts on every master)."""
    QuotaMachine.redis_url = redis_cluster.url
    run_state_machine_as_test(QuotaMachine, settings=machine_settings(20, 25))
