"""The store facade: one method per operation, each one script call.

Methods take a script's request and return its reply, both typed in
store/contract.py; the store adds the context (clock, shard, settings, the
shard's fence floor) and keeps the shard fences (store/fence.py) up to date
with what account scripts answer. The gRPC layer never speaks Redis; it calls
these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgpack

from tally.clock import Clock
from tally.deployment import record_in_redis
from tally.domain.catalog import DEFAULT_CATALOG
from tally.domain.errors import TallyError, Unavailable
from tally.domain.usage import Usage
from tally.store.client import ScriptCall, ScriptRunner, script_error, store_errors
from tally.store.contract import (
    AccountReply,
    ApplyPriceRequest,
    BalanceRequest,
    BatchContext,
    BatchItem,
    BatchRequest,
    BillingPeriodRequest,
    BudgetReply,
    CatalogContext,
    ChargeReply,
    ChargeRequest,
    ClosePeriodReply,
    ClosePeriodRequest,
    CommitBatchRequest,
    CommitReply,
    CommitRequest,
    CreateAccountReply,
    CreateAccountRequest,
    DeleteBudgetRequest,
    ExpireHoldReply,
    ExpireHoldRequest,
    ExtendRequest,
    HoldReply,
    IdempotentBatchContext,
    IdempotentContext,
    ItemError,
    PriceVersionRecord,
    PriceView,
    PurchaseReply,
    PurchaseRequest,
    QuoteReply,
    QuoteRequest,
    ReadUsageRequest,
    RefundBatchRequest,
    RefundReply,
    RefundRequest,
    ReplyT,
    ReserveBatchRequest,
    ReserveRequest,
    RestoreHoldReply,
    RestoreHoldRequest,
    ScriptContext,
    ScriptRequest,
    SetBudgetRequest,
    SetPriceReply,
    SetPriceRequest,
    ShardContext,
    SpendBatchContext,
    SpendContext,
    UpdateAccountRequest,
)
from tally.store.fence import ShardBehind, ShardFences
from tally.store.keys import KeySpace
from tally.store.nodes import config_values
from tally.store.reservation_ids import ReservationIds
from tally.store.usage_counters import usage_of

ItemT = TypeVar("ItemT", bound=ScriptRequest[Any])
SpendT = TypeVar("SpendT", ReserveRequest, ChargeRequest)
# Tries of a Reserve or Charge whose new reservation id another server also made.
NEW_ID_TRIES = 3
ContextT = TypeVar("ContextT", bound=ScriptContext)


@dataclass(frozen=True)
class StoreLimits:
    idempotency_window_ms: int
    reservation_retention_ms: int
    quote_validity_ms: int
    closed_reservation_window_ms: int


class QuotaStore:
    def __init__(
        self,
        runner: ScriptRunner,
        keys: KeySpace,
        clock: Clock,
        limits: StoreLimits,
        fences: ShardFences | None = None,
    ) -> None:
        self.runner = runner
        self.keys = keys
        self.clock = clock
        self.limits = limits
        self.fences = fences or ShardFences(keys.shards)
        self.reservation_ids = ReservationIds()
        self._shard_index = {keys.tag(shard): shard for shard in range(keys.shards)}
        # What each kind of account context says of this store's settings.
        account = {
            "retention_ms": limits.reservation_retention_ms,
            "closed_window_ms": limits.closed_reservation_window_ms,
        }
        idempotent = account | {"idempotency_window_ms": limits.idempotency_window_ms}
        self._settings_of: dict[type[ScriptContext], dict[str, int]] = {
            ScriptContext: account,
            IdempotentContext: idempotent,
            SpendContext: idempotent | {"quote_validity_ms": limits.quote_validity_ms},
        }

    @property
    def redis(self) -> Any:
        return self.runner.redis

    async def close(self) -> None:
        await self.redis.aclose()

    def _shard_context(self, shard: int) -> ShardContext:
        return ShardContext(
            now=self.clock.now_ms(),
            prefix=self.keys.prefix(shard),
            shard=self.keys.tag(shard),
            fence_floor=self.fences.floor(shard),
        )

    def _context(self, account_id: str) -> ScriptContext:
        return self._account_context(ScriptContext, account_id)

    def _idempotent_context(self, account_id: str) -> IdempotentContext:
        return self._account_context(IdempotentContext, account_id)

    def _spend_context(self, account_id: str) -> SpendContext:
        return self._account_context(SpendContext, account_id)

    def _account_context(self, kind: type[ContextT], account_id: str) -> ContextT:
        """An account script's context, built in one step (no chain of contexts)."""
        shard = self.keys.shard_of(account_id)
        return kind(
            now=self.clock.now_ms(),
            prefix=self.keys.prefix(shard),
            shard=self.keys.tag(shard),
            fence_floor=self.fences.floor(shard),
            account_id=account_id,
            **self._settings_of[kind],
        )

    async def _run(
        self,
        request: ScriptRequest[ReplyT],
        context: CatalogContext,
        keys: list[str],
        timeout_s: float | None,
    ) -> ReplyT:
        """Runs the script; one that writes to a shard (a ShardContext) checks the
        shard's fence, and this store's view of the fence follows the answer."""
        if not isinstance(context, ShardContext):
            raw = await self.runner.run(request.SCRIPT, keys, request.encode(context), timeout_s)
            return request.decode_reply(raw)
        shard = self._shard_index[context.shard]
        try:
            ran = await self.runner.call(request.SCRIPT, keys, request.encode(context), timeout_s)
        except ShardBehind:
            await self.fences.refused(shard)
            raise
        if ran.fence is None:
            raise RuntimeError(f"{request.SCRIPT}.lua checked no fence")
        await self.fences.passed(shard, ran.fence)
        return request.decode_reply(ran.result)

    async def _on_account(
        self, request: ScriptRequest[ReplyT], account_id: str, timeout_s: float | None
    ) -> ReplyT:
        """Runs a script that needs only the account's own keys."""
        return await self._run(
            request, self._context(account_id), self.keys.account_keys(account_id), timeout_s
        )

    def _reservation_account(self, reservation_id: str) -> str:
        return self.keys.parse_reservation_id(reservation_id).account_id

    def _on_reservation(self, reservation_id: str) -> tuple[str, list[str]]:
        """The reservation's account and the keys of a script that names it: the
        account's keys, then the reservation's own."""
        account_id = self._reservation_account(reservation_id)
        return account_id, [*self.keys.account_keys(account_id),
                            self.keys.reservation(reservation_id)]

    def _with_new_id(self, request: SpendT) -> SpendT:
        """The request with a new reservation id's sequence (the script refuses
        one already taken)."""
        return replace(
            request, reservation_seq=self.reservation_ids.next_sequence(self.clock.now_ms())
        )

    def _new_reservation_key(self, request: ReserveRequest | ChargeRequest) -> str:
        """The key of the reservation a spend request with its id makes."""
        if request.reservation_seq is None:
            raise ValueError("a spend request needs its reservation_seq (_with_new_id)")
        shard = self.keys.shard_of(request.account_id)
        rid = self.reservation_ids.reservation_id(
            self.keys.tag(shard), request.reservation_seq, request.account_id
        )
        return self.keys.reservation_in(shard, rid)

    async def create_account(
        self, request: CreateAccountRequest, timeout_s: float | None
    ) -> CreateAccountReply:
        return await self._on_account(request, request.account_id, timeout_s)

    async def update_account(
        self, request: UpdateAccountRequest, timeout_s: float | None
    ) -> AccountReply:
        return await self._on_account(request, request.account_id, timeout_s)

    async def set_budget(self, request: SetBudgetRequest, timeout_s: float | None) -> BudgetReply:
        return await self._on_account(request, request.account_id, timeout_s)

    async def delete_budget(
        self, request: DeleteBudgetRequest, timeout_s: float | None
    ) -> BudgetReply:
        return await self._on_account(request, request.account_id, timeout_s)

    async def balance(self, request: BalanceRequest, timeout_s: float | None) -> AccountReply:
        return await self._on_account(request, request.account_id, timeout_s)

    async def purchase(self, request: PurchaseRequest, timeout_s: float | None) -> PurchaseReply:
        account_id = request.account_id
        keys = [
            *self.keys.account_keys(account_id),
            self.keys.idempotency(account_id, request.idempotency_key),
        ]
        return await self._run(request, self._idempotent_context(account_id), keys, timeout_s)

    def _spend_keys(self, request: ReserveRequest | ChargeRequest) -> list[str]:
        account_id = request.account_id
        shard = self.keys.shard_of(account_id)
        return [
            *self.keys.account_keys(account_id),
            self.keys.idempotency(account_id, request.idempotency_key),
            self.keys.prices(shard),
            self.keys.price_history(shard),
            self._new_reservation_key(request),
        ]

    async def reserve(self, request: ReserveRequest, timeout_s: float | None) -> HoldReply:
        return await self._under_a_new_id(
            request,
            lambda fresh: self._run(
                fresh, self._spend_context(fresh.account_id), self._spend_keys(fresh), timeout_s
            ),
        )

    async def charge(self, request: ChargeRequest, timeout_s: float | None) -> ChargeReply:
        return await self._under_a_new_id(
            request,
            lambda fresh: self._run(
                fresh, self._spend_context(fresh.account_id), self._spend_keys(fresh), timeout_s
            ),
        )

    async def _under_a_new_id(
        self, request: SpendT, spend: Callable[[SpendT], Awaitable[ReplyT]]
    ) -> ReplyT:
        """Runs `spend` under a new reservation id. An id another server made too is
        refused by the script (nothing moved); a new one, drawn out of step with
        that server's, is tried at once, so the caller never sees the clash."""
        for tries_left in reversed(range(NEW_ID_TRIES)):
            try:
                return await spend(self._with_new_id(request))
            except Unavailable as error:
                if error.field_name != "reservation_id" or not tries_left:
                    raise
                self.reservation_ids.leap()
        raise AssertionError("unreachable: the last try returns or raises")

    async def commit(self, request: CommitRequest, timeout_s: float | None) -> CommitReply:
        account_id, keys = self._on_reservation(request.reservation_id)
        return await self._run(request, self._context(account_id), keys, timeout_s)

    async def refund(self, request: RefundRequest, timeout_s: float | None) -> RefundReply:
        account_id, keys = self._on_reservation(request.reservation_id)
        keys.append(self.keys.idempotency(account_id, request.idempotency_key))
        return await self._run(request, self._idempotent_context(account_id), keys, timeout_s)

    async def extend(self, request: ExtendRequest, timeout_s: float | None) -> HoldReply:
        account_id, keys = self._on_reservation(request.reservation_id)
        return await self._run(request, self._context(account_id), keys, timeout_s)

    async def restore_hold(
        self, request: RestoreHoldRequest, timeout_s: float | None
    ) -> RestoreHoldReply:
        account_id, keys = self._on_reservation(request.reservation_id)
        return await self._run(request, self._context(account_id), keys, timeout_s)

    async def quote(self, request: QuoteRequest, timeout_s: float | None) -> QuoteReply:
        account_id = request.account_id
        shard = self.keys.shard_of(account_id)
        keys = [
            *self.keys.account_keys(account_id),
            self.keys.prices(shard),
            self.keys.price_history(shard),
        ]
        return await self._run(request, self._context(account_id), keys, timeout_s)

    # --- batches: one script call per shard group, all in one round trip -------

    def _batch_context(self, shard: int) -> BatchContext:
        return BatchContext(
            **vars(self._shard_context(shard)),
            retention_ms=self.limits.reservation_retention_ms,
            closed_window_ms=self.limits.closed_reservation_window_ms,
        )

    def _idempotent_batch_context(self, shard: int) -> IdempotentBatchContext:
        return IdempotentBatchContext(
            **vars(self._batch_context(shard)),
            idempotency_window_ms=self.limits.idempotency_window_ms,
        )

    def _spend_batch_context(self, shard: int) -> SpendBatchContext:
        return SpendBatchContext(
            **vars(self._idempotent_batch_context(shard)),
            quote_validity_ms=self.limits.quote_validity_ms,
        )

    def _shard_keys(self, shard: int) -> list[str]:
        """A batch's shard keys (store/lua/lib/batch.lua): expiries, events,
        closings, fence."""
        return [self.keys.expiries(shard), self.keys.events(shard),
                self.keys.closings(shard), self.keys.fence(shard)]

    async def reserve_batch(
        self, items: Sequence[ReserveRequest], timeout_s: float | None
    ) -> list[HoldReply | Exception]:
        """Each item exactly a reserve; per item, in order, its reply or its error."""
        return await self._batch(
            ReserveBatchRequest,
            [(item.account_id, self._with_new_id(item)) for item in items],
            self._spend_batch_context,
            lambda shard: [
                *self._shard_keys(shard), self.keys.prices(shard), self.keys.price_history(shard),
            ],
            lambda account_id, item: [
                *self.keys.holder_keys(account_id),
                self.keys.idempotency(account_id, item.idempotency_key),
                self._new_reservation_key(item),
            ],
            timeout_s,
        )

    async def commit_batch(
        self, items: Sequence[CommitRequest], timeout_s: float | None
    ) -> list[CommitReply | Exception]:
        """Each item exactly a commit; per item, in order, its reply or its error."""
        return await self._batch(
            CommitBatchRequest,
            [(self._item_account(item.reservation_id), item) for item in items],
            self._batch_context,
            self._shard_keys,
            lambda account_id, item: [
                *self.keys.holder_keys(account_id), self.keys.reservation(item.reservation_id),
            ],
            timeout_s,
        )

    async def refund_batch(
        self, items: Sequence[RefundRequest], timeout_s: float | None
    ) -> list[RefundReply | Exception]:
        """Each item exactly a refund; per item, in order, its reply or its error."""
        return await self._batch(
            RefundBatchRequest,
            [(self._item_account(item.reservation_id), item) for item in items],
            self._idempotent_batch_context,
            self._shard_keys,
            lambda account_id, item: [
                *self.keys.holder_keys(account_id),
                self.keys.reservation(item.reservation_id),
                self.keys.idempotency(account_id, item.idempotency_key),
            ],
            timeout_s,
        )

    def _item_account(self, reservation_id: str) -> str | TallyError:
        try:
            return self._reservation_account(reservation_id)
        except TallyError as error:
            return error

    async def _batch(
        self,
        batch_type: type[BatchRequest[ItemT]],
        items: list[tuple[str | TallyError, ItemT]],
        context_of: Callable[[int], BatchContext],
        shard_keys: Callable[[int], list[str]],
        item_keys: Callable[[str, ItemT], list[str]],
        timeout_s: float | None,
    ) -> list[Any]:
        """Groups the items (account, request) by shard, runs one script call per
        group, every group in one pipelined round trip, and keeps the fences as
        _run does. An item whose account is an error answers that error."""
        outcomes: list[Any] = [account for account, _ in items]
        groups: dict[int, list[int]] = {}
        for index, (account, _) in enumerate(items):
            if isinstance(account, str):
                groups.setdefault(self.keys.shard_of(account), []).append(index)
        batches: list[BatchRequest[ItemT]] = []
        calls: list[ScriptCall] = []
        for shard, indexes in groups.items():
            members = [(str(items[i][0]), items[i][1]) for i in indexes]
            batch = batch_type(items=tuple(BatchItem(a, request) for a, request in members))
            keys = shard_keys(shard)
            for account_id, request in members:
                keys.extend(item_keys(account_id, request))
            batches.append(batch)
            calls.append(ScriptCall(batch.SCRIPT, keys, batch.encode(context_of(shard))))
        ran = await self.runner.run_many(calls, timeout_s)
        for (shard, indexes), batch, result in zip(groups.items(), batches, ran, strict=True):
            outcomes_of_group = await self._group_outcomes(shard, batch, result)
            for index, outcome in zip(indexes, outcomes_of_group, strict=True):
                outcomes[index] = outcome
        return outcomes

    async def _group_outcomes(
        self, shard: int, batch: BatchRequest[ItemT], result: Any
    ) -> list[Any]:
        """A shard group's outcomes; a group refused as a whole (its shard behind
        its fence) gives every item that error."""
        if isinstance(result, ShardBehind):
            await self.fences.refused(shard)
        if isinstance(result, Exception):
            return [result] * len(batch.items)
        if result.fence is None:
            raise RuntimeError(f"{batch.SCRIPT}.lua checked no fence")
        await self.fences.passed(shard, result.fence)
        return [
            script_error(outcome.reply) if isinstance(outcome, ItemError) else outcome
            for outcome in batch.decode_reply(result.result).results
        ]

    async def expire_hold(self, request: ExpireHoldRequest) -> ExpireHoldReply:
        account_id, keys = self._on_reservation(request.reservation_id)
        return await self._run(request, self._context(account_id), keys, None)

    async def due_holds(self, shard: int, batch: int) -> list[str]:
        return await self._due(self.keys.expiries(shard), batch)

    async def close_period(self, request: ClosePeriodRequest) -> ClosePeriodReply:
        return await self._on_account(request, request.account_id, None)

    async def due_closings(self, shard: int, batch: int) -> list[str]:
        """Accounts of the shard whose period end or a grant expiry has come."""
        return await self._due(self.keys.closings(shard), batch)

    async def _due(self, index_key: str, batch: int) -> list[str]:
        """The first `batch` members of a zset indexed by time, due by now."""
        with store_errors():
            raw = await self.redis.zrangebyscore(
                index_key, "-inf", self.clock.now_ms(), start=0, num=batch
            )
        return [r.decode() for r in raw]

    # --- catalog -----------------------------------------------------------

    async def set_price(self, request: SetPriceRequest, timeout_s: float | None) -> SetPriceReply:
        """Sets the price on shard 0 (authoritative), then copies it to every shard."""
        keys = [
            self.keys.prices(0),
            self.keys.price_history(0),
            self.keys.catalog_meta(),
            self.keys.events(0),
            self.keys.fence(0),
        ]
        reply = await self._run(request, self._shard_context(0), keys, timeout_s)
        await self._apply_everywhere(reply, 0, timeout_s)
        return reply

    def _catalog_context(self) -> CatalogContext:
        return CatalogContext(now=self.clock.now_ms())

    async def _apply_everywhere(
        self, price: PriceView, superseded_at_ms: int, timeout_s: float | None
    ) -> None:
        request = ApplyPriceRequest(
            operation=price.operation,
            units_per_quantity=price.units_per_quantity,
            version=price.version,
            effective_at_ms=price.effective_at_ms,
            superseded_at_ms=superseded_at_ms,
        )
        for shard in range(1, self.keys.shards):
            keys = [self.keys.prices(shard), self.keys.price_history(shard), self.keys.fence(shard)]
            await self._run(request, self._shard_context(shard), keys, timeout_s)

    async def list_prices(self) -> tuple[list[PriceView], int]:
        with store_errors():
            raw = await self.redis.hgetall(self.keys.prices(0))
            version = await self.redis.hget(self.keys.catalog_meta(), "version")
        prices = [
            PriceView.of_record(operation.decode(), msgpack.unpackb(packed, raw=False))
            for operation, packed in sorted(raw.items())
        ]
        return prices, int(version or 0)

    async def sync_catalog(self, load_defaults: bool) -> None:
        """Loads the default catalog into an empty one, then repairs every shard's copy
        (a SetPrice interrupted between shards is finished here)."""
        prices, _ = await self.list_prices()
        if not prices and load_defaults:
            for operation, units in DEFAULT_CATALOG.items():
                await self.set_price(SetPriceRequest(operation, units), None)
            return
        history = await self.redis.hgetall(self.keys.price_history(0))
        current = {p.operation: p for p in prices}
        for name, packed in history.items():
            operation, version = self.keys.price_version_of(name.decode())
            record = PriceVersionRecord.decode(msgpack.unpackb(packed, raw=False))
            at_ms = current[operation].effective_at_ms if operation in current else 0
            await self._apply_everywhere(
                PriceView(operation, record.price, version, at_ms), record.superseded_at, None
            )

    # --- deployment checks -------------------------------------------------

    async def check_deployment(self) -> None:
        """Refuses a Redis that can evict keys (on a cluster: any node that can), or
        one that records another shard layout (tally/deployment.py); then records
        this store's layout in it."""
        policies = await config_values(self.redis, "maxmemory-policy")
        evicting = {node: value for node, value in policies.items() if value != "noeviction"}
        if evicting:
            named = ", ".join(
                f"{value!r} on {node}" if node else repr(value)
                for node, value in sorted(evicting.items())
            )
            raise RuntimeError(
                f"Redis maxmemory-policy is {named}: eviction would delete balances; "
                "set maxmemory-policy noeviction"
            )
        await record_in_redis(self.redis, self.keys.layout)

    # --- usage counters and billing periods ----------------------------------

    async def usage(
        self, account_id: str, period_start_ms: int, timeout_s: float | None
    ) -> list[Usage]:
        """The usage an account's counters of one billing period hold (read_usage.lua)."""
        keys = self.keys.usage_slots(account_id)
        request = ReadUsageRequest(period_start=period_start_ms)
        reply = await self._run(request, self._catalog_context(), keys, timeout_s)
        return [usage_of(account_id, record) for record in reply.records]

    async def billing_period(
        self, year: int, month: int, anchor_day: int, timeout_s: float | None
    ) -> tuple[int, int]:
        """The [start, end) ms of the billing period that starts in that month on
        anchor_day (billing_period.lua: the calendar is Lua's alone)."""
        request = BillingPeriodRequest(year=year, month=month, anchor_day=anchor_day)
        reply = await self._run(request, self._catalog_context(), [], timeout_s)
        return reply.period_start, reply.period_end
