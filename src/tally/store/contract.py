"""The script contract: what each Lua script takes and answers, typed.

Every script receives one msgpack map (ARGV[1]) and answers one map. This
module defines, per script, the request (a frozen dataclass whose fields are
the map's keys), the part QuotaStore adds (a context: the clock, the shard,
the store's settings) and the reply, and does the encoding and decoding.
Each script's header comment lists the same fields; tests/unit/
test_script_contract.py compares them, so the two cannot drift apart.

Names follow the protos' vocabulary (monthly_allotment, overage_policy,
units_per_quantity, units_granted_total, ...), one name per concept from the
servicer to the script. The records the scripts store in Redis (the account
blob, reservation records, the catalog's price records, ledger event
fields) keep their own older names (allotment, policy, ap_units, price,
total_granted, ...): renaming those would need a migration of live Redis
and of the state images in the ledger. The scripts translate between the
two where they read or write a record.

Layout: decoding helpers, contexts, shared views, then one section per
script (account scripts, spend scripts, catalog scripts), then the table of
every script's request and reply. New scripts add their types in a section of
their own above that table, and a row to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar, cast

# A msgpack map as a script packed it (the one untyped value; decoded here).
RawMap = Mapping[str, Any]


# --- decoding -------------------------------------------------------------


def _map(value: Any) -> RawMap:
    """A map from a reply: Lua packs an empty table as an empty array."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    """A list from a reply: Lua packs an empty table as an empty array, but
    absent (nil) when it was never set."""
    return value if isinstance(value, list) else []


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _map(value).items()}


# --- contexts: what QuotaStore adds to a request ---------------------------


@dataclass(frozen=True)
class CatalogContext:
    """What the catalog scripts are told besides the request: the clock."""

    now: int  # ms since the epoch, from the store's clock


@dataclass(frozen=True, order=True)
class FenceMark:
    """A shard's fence (lib/fence.lua): ordered by epoch, then count."""

    epoch: int = 0
    count: int = 0

    @classmethod
    def decode(cls, raw: RawMap) -> Self:
        return cls(epoch=int(raw.get("epoch", 0)), count=int(raw.get("count", 0)))


@dataclass(frozen=True)
class ShardContext(CatalogContext):
    """What a script that writes to one shard is told besides the request: the
    shard's key prefix and tag, and the lowest fence the shard may have (below
    it, Redis lost writes; QuotaStore always sets it, absent reads as
    FenceMark(), which nothing is below)."""

    prefix: str
    shard: str
    fence_floor: FenceMark | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class ScriptContext(ShardContext):
    """What an account script is told besides the request: the account it
    works on (for reservation scripts, read from the reservation id), its
    shard's context, and how long closed reservations are kept."""

    account_id: str
    retention_ms: int
    # how long a closed reservation stays in Redis (None: for scripts that close none)
    closed_window_ms: int | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class IdempotentContext(ScriptContext):
    """An idempotent script's context: also how long its answer is kept."""

    idempotency_window_ms: int


@dataclass(frozen=True)
class SpendContext(IdempotentContext):
    """A spend script's context: also how long a price_version is honoured
    after it is superseded (--quote-validity)."""

    quote_validity_ms: int


# --- requests and replies: the common part ---------------------------------


@dataclass(frozen=True)
class Reply:
    """A script's answer, or a part of one: its fields are the map's keys (a
    field with a default may be absent)."""

    @classmethod
    def decode(cls, raw: RawMap) -> Self:
        values = {
            name: decode(raw[name])
            for name, decode, required in _decoders(cls)
            if required or name in raw
        }
        return cls(**values)


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


Decoder = Callable[[Any], Any]
# Per reply class, each field's name, decoder and whether it is required: built on
# first use from the field types (written as text), then reused on every reply.
_DECODERS: dict[type[Reply], tuple[tuple[str, Decoder, bool], ...]] = {}


def _decoders(cls: type[Reply]) -> tuple[tuple[str, Decoder, bool], ...]:
    decoders = _DECODERS.get(cls)
    if decoders is None:
        hints = typing.get_type_hints(cls)
        decoders = _DECODERS[cls] = tuple(
            (field.name, _decoder(hints[field.name]), _required(field))
            for field in dataclasses.fields(cls)
        )
    return decoders


def _decoder(hint: Any) -> Decoder:
    """How a reply's value becomes what the field's type says."""
    if hint in (int, str, bool):
        return cast(Decoder, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict and args == (str, str):
        return _labels
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _decoder(args[0])
        return lambda value: tuple(item(element) for element in _list(value))
    if isinstance(hint, type) and issubclass(hint, Reply):
        reply: type[Reply] = hint
        return lambda value: reply.decode(_map(value))
    raise TypeError(f"a reply field of type {hint!r} has no decoding")


ReplyT = TypeVar("ReplyT", bound=Reply)


@dataclass(frozen=True)
class ScriptRequest(Generic[ReplyT]):
    """A script's request: its fields are the map's keys (None: absent, the
    script's default). SCRIPT names the script, CONTEXT the context it takes,
    REPLY its answer."""

    SCRIPT: ClassVar[str]
    CONTEXT: ClassVar[type[CatalogContext]] = ScriptContext
    REPLY: ClassVar[type[Reply]]

    def argv_fields(self) -> dict[str, object]:
        """The request's part of the script's map."""
        return _fields_of(self)

    def encode(self, context: CatalogContext) -> dict[str, object]:
        """The map the script decodes: the context and the request's fields."""
        if type(context) is not self.CONTEXT:
            raise TypeError(f"{self.SCRIPT} takes a {self.CONTEXT.__name__}, not {context!r}")
        return _fields_of(context) | self.argv_fields()

    def decode_reply(self, raw: RawMap) -> ReplyT:
        return cast(ReplyT, self.REPLY.decode(raw))


# Per dataclass, its fields' names (dataclasses.fields() builds a tuple per call).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
# Values sent to the script as they are (anything else may hold dataclasses).
_PLAIN = (str, int, bool, float, bytes, dict)


def _fields_of(value: Any) -> dict[str, object]:
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        names = _FIELD_NAMES[type(value)] = tuple(f.name for f in dataclasses.fields(value))
    fields: dict[str, object] = {}
    for name in names:
        item = getattr(value, name)
        if item is not None:
            fields[name] = item if isinstance(item, _PLAIN) else _encoded(item)
    return fields


def _encoded(item: object) -> object:
    """A field's value as the script's map holds it (dataclasses become maps)."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return _fields_of(item)
    if isinstance(item, tuple):
        return tuple(_encoded(element) for element in item)
    return item


# Per idempotent request class, the names of the fields its fingerprint covers.
_FINGERPRINTED: dict[type, tuple[str, ...]] = {}


@dataclass(frozen=True)
class IdempotentRequest(ScriptRequest[ReplyT]):
    """A request under an idempotency key. Its fingerprint tells a retry (the
    same request) from a different request under the same key."""

    CONTEXT = IdempotentContext
    METHOD: ClassVar[str]  # the RPC: requests of two RPCs never match
    # Every field but these makes "the same request".
    UNFINGERPRINTED: ClassVar[frozenset[str]] = frozenset({"idempotency_key"})

    def fingerprint(self) -> str:
        """The same bytes for the same request across releases: stored
        idempotency records are matched against it."""
        names = _FINGERPRINTED.get(type(self))
        if names is None:
            names = _FINGERPRINTED[type(self)] = tuple(
                f.name for f in dataclasses.fields(self) if f.name not in self.UNFINGERPRINTED
            )
        fields = {name: getattr(self, name) for name in names}
        canonical = json.dumps(
            {"method": self.METHOD, **fields}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def argv_fields(self) -> dict[str, object]:
        return super().argv_fields() | {"fingerprint": self.fingerprint()}


def _principal() -> Any:
    """The `by` field of a money-in or admin request: the principal that asks
    (auth.principal.current().principal_id), written on the events the script
    emits so the ledger says who did it. None: the server's own action (the
    default catalog it loads), written without one. Keyword-only and last, so
    it never shifts a request's positional fields."""
    return dataclasses.field(default=None, kw_only=True)


# --- views: what replies say about grants, balances, accounts, budgets ------
# (store/lua/lib/views.lua builds them)


@dataclass(frozen=True)
class GrantView(Reply):
    grant_id: str
    kind: str  # ALLOTMENT, PURCHASE or PROMOTIONAL
    units_granted: int
    units_remaining: int
    expires_at: int  # 0: never
    granted_at: int
    reference: str = ""


@dataclass(frozen=True)
class BalanceView(Reply):
    account_id: str
    available: int  # overage (used and held) counts as negative
    spendable: int  # what the account may still spend, overage headroom included
    held: int
    grants: tuple[GrantView, ...]  # live grants in consumption order
    overage_used: int
    overage_held: int
    overage_limit: int
    period_start: int
    period_end: int
    period_consumed: int
    auto_purchased: int
    units_granted_total: int
    units_charged_total: int
    units_refunded_total: int
    units_expired_total: int
    as_of: int
    period_purchased: int
    period_expired: int


@dataclass(frozen=True)
class AlertSettings(Reply):
    """Threshold alerts, each raised once per period (off: empty, 0, False)."""

    allotment_used_percent: tuple[int, ...] = ()
    balance_below: int = 0
    overage_started: bool = False


@dataclass(frozen=True)
class BudgetView(Reply):
    budget_id: str  # "operation:<op>" or "label:<key>=<value>"
    operation: str
    label_key: str
    label_value: str
    limit_units: int
    used_units: int  # this period: charged and held


@dataclass(frozen=True)
class AccountView(Reply):
    account_id: str
    monthly_allotment: int
    overage_policy: str  # DENY, ALLOW or AUTO_PURCHASE
    overage_limit: int
    labels: dict[str, str]
    auto_purchase_units: int
    auto_purchase_threshold: int
    billing_anchor_day: int
    created_at: int
    period_start: int
    period_end: int
    alerts: AlertSettings
    budgets: tuple[BudgetView, ...]  # by budget_id


# --- account scripts ---------------------------------------------------------


@dataclass(frozen=True)
class AccountReply(Reply):
    account: AccountView
    balance: BalanceView


@dataclass(frozen=True)
class CreateAccountReply(Reply):
    account: AccountView
    balance: BalanceView
    replayed: bool  # the account existed with the same settings


@dataclass(frozen=True)
class CreateAccountRequest(ScriptRequest[CreateAccountReply]):
    SCRIPT = "create_account"
    REPLY = CreateAccountReply

    account_id: str
    monthly_allotment: int
    overage_policy: str
    overage_limit: int
    labels: dict[str, str]
    auto_purchase_units: int
    auto_purchase_threshold: int
    billing_anchor_day: int  # 0: the creation day
    alerts: AlertSettings
    by: str | None = _principal()


@dataclass(frozen=True)
class AccountChanges:
    """The settings an UpdateAccount changes (None: unchanged)."""

    monthly_allotment: int | None = None  # from the next billing period
    overage_policy: str | None = None
    overage_limit: int | None = None
    auto_purchase_units: int | None = None
    auto_purchase_threshold: int | None = None
    labels: dict[str, str] | None = None  # replaces every label
    merge_labels: dict[str, str] | None = None  # adds or changes these
    alerts: AlertSettings | None = None  # replaces the settings


@dataclass(frozen=True)
class UpdateAccountRequest(ScriptRequest[AccountReply]):
    SCRIPT = "update_account"
    REPLY = AccountReply

    account_id: str
    set: AccountChanges
    by: str | None = _principal()


@dataclass(frozen=True)
class BalanceRequest(ScriptRequest[AccountReply]):
    SCRIPT = "balance"
    REPLY = AccountReply

    account_id: str


@dataclass(frozen=True)
class BudgetReply(Reply):
    budget: BudgetView


@dataclass(frozen=True)
class SetBudgetRequest(ScriptRequest[BudgetReply]):
    """A budget names an operation, or a label key and value (the other empty)."""

    SCRIPT = "set_budget"
    REPLY = BudgetReply

    account_id: str
    operation: str
    label_key: str
    label_value: str
    limit_units: int
    by: str | None = _principal()


@dataclass(frozen=True)
class DeleteBudgetRequest(ScriptRequest[BudgetReply]):
    SCRIPT = "delete_budget"
    REPLY = BudgetReply

    account_id: str
    budget_id: str
    by: str | None = _principal()


@dataclass(frozen=True)
class PurchaseReply(Reply):
    grant: GrantView
    balance: BalanceView
    replayed: bool


@dataclass(frozen=True)
class PurchaseRequest(IdempotentRequest[PurchaseReply]):
    SCRIPT = "purchase"
    REPLY = PurchaseReply
    METHOD = "PurchaseUnits"
    # The key is the account's own: its fingerprints have never named the account.
    # Who buys is not what is bought: a retry by another principal replays.
    UNFINGERPRINTED = frozenset({"idempotency_key", "account_id", "by"})

    account_id: str
    units: int
    expires_at: int  # 0: never
    reference: str
    idempotency_key: str
    by: str | None = _principal()


@dataclass(frozen=True)
class ExpireHoldReply(Reply):
    expired: int  # holds expired by this call (the account's other due ones included)


@dataclass(frozen=True)
class ExpireHoldRequest(ScriptRequest[ExpireHoldReply]):
    SCRIPT = "expire_hold"
    REPLY = ExpireHoldReply

    reservation_id: str


@dataclass(frozen=True)
class ClosePeriodReply(Reply):
    events: int  # events the close wrote (0: nothing was due, e.g. another server closed it)


@dataclass(frozen=True)
class ClosePeriodRequest(ScriptRequest[ClosePeriodReply]):
    SCRIPT = "close_period"
    REPLY = ClosePeriodReply

    account_id: str


# --- spend scripts -------------------------------------------------------------


@dataclass(frozen=True)
class HoldReply(Reply):
    """A held reservation (reserve, extend)."""

    reservation_id: str
    units: int
    expires_at: int
    balance: BalanceView
    replayed: bool
    price_version: int
    units_per_quantity: int
    quantity: int


@dataclass(frozen=True)
class ChargeReply(Reply):
    reservation_id: str
    units: int
    balance: BalanceView
    replayed: bool
    price_version: int
    overage_units: int


@dataclass(frozen=True)
class SpendRequest(IdempotentRequest[ReplyT]):
    """What Reserve and Charge both ask. reservation_seq: the new reservation's
    id sequence, made by the store (store/reservation_ids.py) just before the
    call; a retry makes a new one, so it is not part of the fingerprint."""

    CONTEXT: ClassVar[type[IdempotentContext]] = SpendContext
    UNFINGERPRINTED = frozenset({"idempotency_key", "reservation_seq"})

    account_id: str
    operation: str
    quantity: int  # >= 1
    idempotency_key: str
    labels: dict[str, str]
    price_version: int  # 0: the current price
    reservation_seq: int | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class ReserveRequest(SpendRequest[HoldReply]):
    SCRIPT = "reserve"
    REPLY = HoldReply
    METHOD = "Reserve"

    ttl_ms: int


@dataclass(frozen=True)
class ChargeRequest(SpendRequest[ChargeReply]):
    SCRIPT = "charge"
    REPLY = ChargeReply
    METHOD = "Charge"


@dataclass(frozen=True)
class CommitReply(Reply):
    units_charged: int
    units_released: int
    balance: BalanceView
    replayed: bool
    late: bool  # the hold had expired: charged from what was available
    overage_units: int
    operation: str = ""  # absent from commit answers stored by older releases


@dataclass(frozen=True)
class CommitRequest(ScriptRequest[CommitReply]):
    SCRIPT = "commit"
    REPLY = CommitReply

    reservation_id: str
    quantity: int | None = None  # None: the whole reserved quantity


@dataclass(frozen=True)
class RefundReply(Reply):
    units_refunded: int
    units_refundable: int
    balance: BalanceView
    replayed: bool
    operation: str = ""  # absent from refund answers stored by older releases


@dataclass(frozen=True)
class RefundRequest(IdempotentRequest[RefundReply]):
    SCRIPT = "refund"
    REPLY = RefundReply
    METHOD = "Refund"

    reservation_id: str
    units: int | None  # None: all that is still refundable
    reason: str
    idempotency_key: str


@dataclass(frozen=True)
class ExtendRequest(ScriptRequest[HoldReply]):
    SCRIPT = "extend"
    REPLY = HoldReply

    reservation_id: str
    ttl_ms: int


@dataclass(frozen=True)
class RestoreHoldReply(Reply):
    restored: bool  # False: the record was in Redis already


@dataclass(frozen=True)
class RestoreHoldRequest(ScriptRequest[RestoreHoldReply]):
    """A closed reservation's record back into Redis from the ledger's image."""

    SCRIPT = "restore_hold"
    REPLY = RestoreHoldReply

    reservation_id: str
    image: RawMap  # the record the ledger keeps, unpacked (it is sent as it is)


@dataclass(frozen=True)
class QuoteReply(Reply):
    units: int
    units_per_quantity: int
    price_version: int
    affordable: bool  # auto-purchases included
    available: int  # what the account could spend before any auto-purchase


@dataclass(frozen=True)
class QuoteRequest(ScriptRequest[QuoteReply]):
    SCRIPT = "quote"
    REPLY = QuoteReply

    account_id: str
    operation: str
    quantity: int  # >= 1


# --- catalog scripts -----------------------------------------------------------


@dataclass(frozen=True)
class PriceVersionRecord(Reply):
    """A record of a shard's price history: one version of an operation's price
    and when a newer version superseded it (0: it is still the current one)."""

    price: int
    superseded_at: int


@dataclass(frozen=True)
class PriceView(Reply):
    operation: str
    units_per_quantity: int
    version: int  # the catalog version that set it
    effective_at_ms: int

    @classmethod
    def of_record(cls, operation: str, record: RawMap) -> Self:
        """From a record of the prices hash (stored as {price, version, at})."""
        return cls(
            operation=operation,
            units_per_quantity=int(record["price"]),
            version=int(record["version"]),
            effective_at_ms=int(record["at"]),
        )


@dataclass(frozen=True)
class SetPriceReply(PriceView):
    changed: bool  # False: that was the price already


@dataclass(frozen=True)
class SetPriceRequest(ScriptRequest[SetPriceReply]):
    SCRIPT = "set_price"
    CONTEXT = ShardContext
    REPLY = SetPriceReply

    operation: str
    units_per_quantity: int
    by: str | None = _principal()


@dataclass(frozen=True)
class ApplyPriceReply(Reply):
    applied: bool  # False: the shard had this version or a newer one


@dataclass(frozen=True)
class ApplyPriceRequest(ScriptRequest[ApplyPriceReply]):
    SCRIPT = "apply_price"
    CONTEXT = ShardContext
    REPLY = ApplyPriceReply

    operation: str
    units_per_quantity: int
    version: int
    effective_at_ms: int
    superseded_at_ms: int  # 0: current as far as shard 0 knows


# --- usage counters and billing periods ------------------------------------
# The counters' field format lives in lib/usage.lua alone; Python sees records.


@dataclass(frozen=True)
class UsageRecord(Reply):
    """One (hour, operation, label set) of a billing period's usage counters."""

    bucket_ms: int
    operation: str
    labels: dict[str, str]
    units: int  # net of refunds: may be negative
    quantity: int
    count: int


@dataclass(frozen=True)
class ReadUsageReply(Reply):
    records: tuple[UsageRecord, ...]


@dataclass(frozen=True)
class ReadUsageRequest(ScriptRequest[ReadUsageReply]):
    SCRIPT = "read_usage"
    CONTEXT = CatalogContext
    REPLY = ReadUsageReply

    period_start: int  # ms: the billing period whose counters are read


@dataclass(frozen=True)
class RestoreUsageReply(Reply):
    records: int  # how many records were written


@dataclass(frozen=True)
class RestoreUsageRequest(ScriptRequest[RestoreUsageReply]):
    SCRIPT = "restore_usage"
    CONTEXT = CatalogContext
    REPLY = RestoreUsageReply

    period_start: int
    replace: bool  # the first call of a period: delete its counters first
    period_end: int
    records: tuple[UsageRecord, ...]  # at most USAGE_RECORDS_PER_CALL_MAX


@dataclass(frozen=True)
class BillingPeriodReply(Reply):
    period_start: int
    period_end: int


@dataclass(frozen=True)
class BillingPeriodRequest(ScriptRequest[BillingPeriodReply]):
    SCRIPT = "billing_period"
    CONTEXT = CatalogContext
    REPLY = BillingPeriodReply

    year: int
    month: int
    anchor_day: int


# --- batch scripts ---------------------------------------------------------------
# One call per shard group of a batch: each item is exactly its single script's
# request (lib/batch.lua runs the single script's work per item) and gets its
# single script's reply or its own error.


@dataclass(frozen=True)
class BatchContext(ShardContext):
    """What a batch script is told besides its items: a ScriptContext without the
    account (each item names its own)."""

    retention_ms: int
    closed_window_ms: int | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class IdempotentBatchContext(BatchContext):
    idempotency_window_ms: int


@dataclass(frozen=True)
class SpendBatchContext(IdempotentBatchContext):
    quote_validity_ms: int


@dataclass(frozen=True)
class ItemError:
    """An item's failure as its script answered it: {code, field, message, extra}
    (store/client.py makes it the typed error the single script would raise)."""

    reply: RawMap


ItemT = TypeVar("ItemT", bound=ScriptRequest[Any])


@dataclass(frozen=True)
class BatchItem(Generic[ItemT]):
    """One item of a batch call: the single script's request and its account."""

    account_id: str
    request: ItemT


@dataclass(frozen=True)
class BatchReply(Reply):
    """Per item, in order: the single script's reply, or its error."""

    results: tuple[Any, ...]


@dataclass(frozen=True)
class BatchRequest(ScriptRequest[BatchReply], Generic[ItemT]):
    """A batch script's request: its items, all of one shard. ITEM: the single
    script's request type, whose reply each item answers."""

    REPLY = BatchReply
    ITEM: ClassVar[type[ScriptRequest[Any]]]

    items: tuple[BatchItem[ItemT], ...]

    def argv_fields(self) -> dict[str, object]:
        return {
            "items": [
                item.request.argv_fields() | {"account_id": item.account_id}
                for item in self.items
            ]
        }

    def decode_reply(self, raw: RawMap) -> BatchReply:
        outcomes = _list(raw.get("results"))
        if len(outcomes) != len(self.items):
            raise RuntimeError(
                f"{self.SCRIPT}.lua answered {len(outcomes)} results for {len(self.items)} items"
            )
        return BatchReply(results=tuple(self._outcome(_map(outcome)) for outcome in outcomes))

    def _outcome(self, outcome: RawMap) -> Reply | ItemError:
        if outcome.get("ok"):
            return self.ITEM.REPLY.decode(_map(outcome.get("r")))
        return ItemError(outcome)


@dataclass(frozen=True)
class ReserveBatchRequest(BatchRequest[ReserveRequest]):
    SCRIPT = "reserve_batch"
    CONTEXT = SpendBatchContext
    ITEM = ReserveRequest


@dataclass(frozen=True)
class CommitBatchRequest(BatchRequest[CommitRequest]):
    SCRIPT = "commit_batch"
    CONTEXT = BatchContext
    ITEM = CommitRequest


@dataclass(frozen=True)
class RefundBatchRequest(BatchRequest[RefundRequest]):
    SCRIPT = "refund_batch"
    CONTEXT = IdempotentBatchContext
    ITEM = RefundRequest


# --- leases of background work (store/leases.py) ---------------------------------
# Their context's `now` is the leasing process's wall clock (a SystemClock), never
# the business clock tests move.


@dataclass(frozen=True)
class LeaseAcquireReply(Reply):
    held: int
    taken_over: int
    holder: str


@dataclass(frozen=True)
class LeaseAcquireRequest(ScriptRequest[LeaseAcquireReply]):
    SCRIPT = "lease_acquire"
    CONTEXT = CatalogContext
    REPLY = LeaseAcquireReply

    owner: str
    ttl_ms: int


@dataclass(frozen=True)
class LeaseReleaseReply(Reply):
    released: int


@dataclass(frozen=True)
class LeaseReleaseRequest(ScriptRequest[LeaseReleaseReply]):
    SCRIPT = "lease_release"
    CONTEXT = CatalogContext
    REPLY = LeaseReleaseReply

    owner: str


@dataclass(frozen=True)
class LeaseHeartbeatReply(Reply):
    live: int


@dataclass(frozen=True)
class LeaseHeartbeatRequest(ScriptRequest[LeaseHeartbeatReply]):
    SCRIPT = "lease_heartbeat"
    CONTEXT = CatalogContext
    REPLY = LeaseHeartbeatReply

    owner: str
    ttl_ms: int
    members_max: int


# --- every script ----------------------------------------------------------------

REQUESTS: tuple[type[ScriptRequest[Any]], ...] = (
    CreateAccountRequest,
    UpdateAccountRequest,
    BalanceRequest,
    SetBudgetRequest,
    DeleteBudgetRequest,
    PurchaseRequest,
    ExpireHoldRequest,
    ClosePeriodRequest,
    ReserveRequest,
    ChargeRequest,
    CommitRequest,
    RefundRequest,
    ExtendRequest,
    RestoreHoldRequest,
    QuoteRequest,
    SetPriceRequest,
    ApplyPriceRequest,
    ReadUsageRequest,
    RestoreUsageRequest,
    BillingPeriodRequest,
    ReserveBatchRequest,
    CommitBatchRequest,
    RefundBatchRequest,
    LeaseAcquireRequest,
    LeaseReleaseRequest,
    LeaseHeartbeatRequest,
)
