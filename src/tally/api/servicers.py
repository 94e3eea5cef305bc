"""Thin servicers: validate and convert the request, call the store, convert back."""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

import grpc

from tally.api import batches, convert, ledger_query
from tally.api import validation as v
from tally.api.closed_reservations import ClosedReservations
from tally.api.errors import deadline_s, map_errors
from tally.auth.principal import current
from tally.auth.scope import require_account
from tally.domain import limits
from tally.domain.errors import InvalidArgument, TallyError
from tally.ledger.durability import MoneyInBarrier
from tally.ledger.ledger import Ledger
from tally.store.contract import (
    AccountChanges,
    BalanceRequest,
    ChargeRequest,
    CommitReply,
    CommitRequest,
    CreateAccountRequest,
    DeleteBudgetRequest,
    ExtendRequest,
    PurchaseRequest,
    QuoteRequest,
    RefundReply,
    RefundRequest,
    ReserveRequest,
    SetPriceRequest,
    UpdateAccountRequest,
)
from tally.store.failures import HoldNotInStore
from tally.store.quota_store import QuotaStore
from tally_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]


class SpendFields(TypedDict):
    """What Reserve and Charge both ask (contract.SpendRequest's fields)."""

    account_id: str
    operation: str
    quantity: int
    idempotency_key: str
    labels: dict[str, str]
    price_version: int


class AccountNamed(Protocol):
    """A request naming one account."""

    @property
    def account_id(self) -> str: ...


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(
        self, store: QuotaStore, ttl_limits: v.HoldTtlLimits, closed: ClosedReservations
    ) -> None:
        self.store = store
        self.ttl_limits = ttl_limits
        self.closed = closed  # reservations no longer in Redis come back through it

    def _reservation_id(self, value: str) -> str:
        """A reservation id of an account within the caller's scope (the id names it)."""
        if not value:
            raise InvalidArgument("reservation_id is required", field_name="reservation_id")
        reservation_id = v.text(value, "reservation_id", limits.RESERVATION_ID_BYTES_MAX)
        if current().scoped:  # unscoped callers keep the store's own parsing of the id
            require_account(self.store.keys.parse_reservation_id(reservation_id).account_id)
        return reservation_id

    @map_errors
    async def Reserve(
        self, request: quota_pb2.ReserveRequest, context: Context
    ) -> quota_pb2.ReserveResponse:
        reply = await self.store.reserve(self._reserve(request), deadline_s(context))
        return convert.reserve_response(reply)

    def _reserve(self, request: quota_pb2.ReserveRequest) -> ReserveRequest:
        ttl = request.ttl if request.HasField("ttl") else None
        return ReserveRequest(
            **_spend_fields(request), ttl_ms=v.hold_ttl_ms(ttl, "ttl", self.ttl_limits)
        )

    @map_errors
    async def Charge(
        self, request: quota_pb2.ChargeRequest, context: Context
    ) -> quota_pb2.ChargeResponse:
        reply = await self.store.charge(
            ChargeRequest(**_spend_fields(request)), deadline_s(context)
        )
        return quota_pb2.ChargeResponse(
            reservation_id=reply.reservation_id,
            units=reply.units,
            balance=convert.balance(reply.balance),
            replayed=reply.replayed,
            price_version=reply.price_version,
            overage_units=reply.overage_units,
        )

    @map_errors
    async def Commit(
        self, request: quota_pb2.CommitRequest, context: Context
    ) -> quota_pb2.CommitResponse:
        commit = self._commit(request)
        reply = await self.closed.call(
            commit.reservation_id, lambda: self.store.commit(commit, deadline_s(context)),
            lambda: deadline_s(context),
        )
        return _commit_response(reply)

    def _commit(self, request: quota_pb2.CommitRequest) -> CommitRequest:
        return CommitRequest(
            reservation_id=self._reservation_id(request.reservation_id),
            quantity=(
                v.units(request.quantity, "quantity") if request.HasField("quantity") else None
            ),
        )

    @map_errors
    async def Refund(
        self, request: quota_pb2.RefundRequest, context: Context
    ) -> quota_pb2.RefundResponse:
        refund = self._refund(request)
        reply = await self.closed.call(
            refund.reservation_id, lambda: self.store.refund(refund, deadline_s(context)),
            lambda: deadline_s(context),
        )
        return _refund_response(reply)

    def _refund(self, request: quota_pb2.RefundRequest) -> RefundRequest:
        return RefundRequest(
            reservation_id=self._reservation_id(request.reservation_id),
            units=(
                v.units(request.units, "units", minimum=1) if request.HasField("units") else None
            ),
            reason=v.text(request.reason, "reason", limits.REASON_BYTES_MAX),
            idempotency_key=v.idempotency_key(request.idempotency_key),
        )

    @map_errors
    async def Extend(
        self, request: quota_pb2.ExtendRequest, context: Context
    ) -> quota_pb2.ExtendResponse:
        reservation_id = self._reservation_id(request.reservation_id)
        if not request.HasField("ttl"):
            raise InvalidArgument("ttl is required", field_name="ttl")
        extend = ExtendRequest(
            reservation_id=reservation_id,
            ttl_ms=v.hold_ttl_ms(request.ttl, "ttl", self.ttl_limits),
        )
        reply = await self.closed.call(
            reservation_id, lambda: self.store.extend(extend, deadline_s(context)),
            lambda: deadline_s(context),
        )
        return convert.extend_response(reply)

    @map_errors
    async def Quote(
        self, request: quota_pb2.QuoteRequest, context: Context
    ) -> quota_pb2.QuoteResponse:
        quote = QuoteRequest(
            account_id=_account(request.account_id),
            operation=v.operation(request.operation),
            quantity=v.quantity(request.quantity),
        )
        reply = await self.store.quote(quote, deadline_s(context))
        return quota_pb2.QuoteResponse(
            units=reply.units,
            price_version=reply.price_version,
            affordable=reply.affordable,
            available=reply.available,
            units_per_quantity=reply.units_per_quantity,
        )

    @map_errors
    async def GetBalance(
        self, request: quota_pb2.GetBalanceRequest, context: Context
    ) -> quota_pb2.GetBalanceResponse:
        reply = await self.store.balance(_balance_request(request), deadline_s(context))
        return quota_pb2.GetBalanceResponse(balance=convert.balance(reply.balance))

    # --- batches: each item exactly its single RPC (api/batches.py) ------------

    @map_errors
    async def ReserveBatch(
        self, request: quota_pb2.ReserveBatchRequest, context: Context
    ) -> quota_pb2.ReserveBatchResponse:
        checked = batches.validated(batches.check_count(request.items), self._reserve)
        outcomes = await batches.run_valid(
            checked, lambda items: self.store.reserve_batch(items, deadline_s(context))
        )
        return quota_pb2.ReserveBatchResponse(results=batches.results(
            outcomes, quota_pb2.ReserveBatchResult, convert.reserve_response
        ))

    @map_errors
    async def CommitBatch(
        self, request: quota_pb2.CommitBatchRequest, context: Context
    ) -> quota_pb2.CommitBatchResponse:
        checked = batches.validated(batches.check_count(request.items), self._commit)
        outcomes = await batches.run_valid(
            checked, lambda items: self.store.commit_batch(items, deadline_s(context))
        )
        for index, (item, outcome) in enumerate(zip(checked, outcomes, strict=True)):
            if isinstance(outcome, HoldNotInStore) and isinstance(item, CommitRequest):
                outcomes[index] = await self._closed_commit(item, context)
        return quota_pb2.CommitBatchResponse(results=batches.results(
            outcomes, quota_pb2.CommitBatchResult, _commit_response
        ))

    @map_errors
    async def RefundBatch(
        self, request: quota_pb2.RefundBatchRequest, context: Context
    ) -> quota_pb2.RefundBatchResponse:
        checked = batches.validated(batches.check_count(request.items), self._refund)
        outcomes = await batches.run_valid(
            checked, lambda items: self.store.refund_batch(items, deadline_s(context))
        )
        for index, (item, outcome) in enumerate(zip(checked, outcomes, strict=True)):
            if isinstance(outcome, HoldNotInStore) and isinstance(item, RefundRequest):
                outcomes[index] = await self._closed_refund(item, context)
        return quota_pb2.RefundBatchResponse(results=batches.results(
            outcomes, quota_pb2.RefundBatchResult, _refund_response
        ))

    # An item whose reservation left Redis is brought back from the ledger and run
    # alone (api/closed_reservations.py), as its single RPC would be.

    async def _closed_commit(
        self, commit: CommitRequest, context: Context
    ) -> CommitReply | TallyError:
        try:
            return await self.closed.call(
                commit.reservation_id, lambda: self.store.commit(commit, deadline_s(context)),
                lambda: deadline_s(context),
            )
        except TallyError as error:
            return error

    async def _closed_refund(
        self, refund: RefundRequest, context: Context
    ) -> RefundReply | TallyError:
        try:
            return await self.closed.call(
                refund.reservation_id, lambda: self.store.refund(refund, deadline_s(context)),
                lambda: deadline_s(context),
            )
        except TallyError as error:
            return error


def _commit_response(reply: CommitReply) -> quota_pb2.CommitResponse:
    return quota_pb2.CommitResponse(
        units_charged=reply.units_charged,
        units_released=reply.units_released,
        balance=convert.balance(reply.balance),
        replayed=reply.replayed,
        late=reply.late,
        overage_units=reply.overage_units,
        operation=reply.operation,
    )


def _refund_response(reply: RefundReply) -> quota_pb2.RefundResponse:
    return quota_pb2.RefundResponse(
        units_refunded=reply.units_refunded,
        balance=convert.balance(reply.balance),
        replayed=reply.replayed,
        units_refundable=reply.units_refundable,
        operation=reply.operation,
    )


def _spend_fields(request: quota_pb2.ReserveRequest | quota_pb2.ChargeRequest) -> SpendFields:
    """What Reserve and Charge both ask, validated."""
    return SpendFields(
        account_id=_account(request.account_id),
        operation=v.operation(request.operation),
        quantity=v.quantity(request.quantity),
        idempotency_key=v.idempotency_key(request.idempotency_key),
        labels=v.labels(request.labels),
        price_version=v.units(request.price_version, "price_version"),
    )


def _balance_request(request: AccountNamed) -> BalanceRequest:
    return BalanceRequest(account_id=_account(request.account_id))


def _account(value: str) -> str:
    """A valid account id within the caller's scope."""
    account_id = v.account_id(value)
    require_account(account_id)
    return account_id


def _policy(value: int, field: str = "overage_policy") -> str:
    name = convert.policy_name(value)
    if name is None:
        raise InvalidArgument(f"{field} {value} is not a known policy", field_name=field)
    return name


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, store: QuotaStore, barrier: MoneyInBarrier, ledger: Ledger) -> None:
        self.store = store
        self.barrier = barrier
        self.ledger = ledger

    @map_errors
    async def CreateAccount(
        self, request: account_pb2.CreateAccountRequest, context: Context
    ) -> account_pb2.CreateAccountResponse:
        anchor_day = request.billing_anchor_day
        if not 0 <= anchor_day <= limits.BILLING_ANCHOR_DAY_MAX:
            raise InvalidArgument(
                f"billing_anchor_day must be between 1 and {limits.BILLING_ANCHOR_DAY_MAX} "
                "(0: the creation day)",
                field_name="billing_anchor_day",
            )
        create = CreateAccountRequest(
            account_id=_account(request.account_id),
            monthly_allotment=v.units(request.monthly_allotment, "monthly_allotment"),
            overage_policy=_policy(request.overage_policy),
            overage_limit=v.units(request.overage_limit, "overage_limit"),
            labels=v.labels(request.labels),
            auto_purchase_units=v.units(request.auto_purchase_units, "auto_purchase_units"),
            auto_purchase_threshold=v.units(
                request.auto_purchase_threshold, "auto_purchase_threshold"
            ),
            billing_anchor_day=anchor_day,
            alerts=v.alert_settings(request.alerts),
            by=current().principal_id,
        )
        reply = await self.store.create_account(create, deadline_s(context))
        await self.barrier.settle_account(create.account_id)
        return account_pb2.CreateAccountResponse(
            account=convert.account(reply.account, replayed=reply.replayed)
        )

    @map_errors
    async def GetAccount(
        self, request: account_pb2.GetAccountRequest, context: Context
    ) -> account_pb2.GetAccountResponse:
        reply = await self.store.balance(_balance_request(request), deadline_s(context))
        return account_pb2.GetAccountResponse(account=convert.account(reply.account))

    @map_errors
    async def UpdateAccount(
        self, request: account_pb2.UpdateAccountRequest, context: Context
    ) -> account_pb2.UpdateAccountResponse:
        account_id = _account(request.account_id)
        has = request.HasField
        changes = AccountChanges(
            monthly_allotment=(
                v.units(request.monthly_allotment, "monthly_allotment")
                if has("monthly_allotment") else None
            ),
            overage_policy=_policy(request.overage_policy) if has("overage_policy") else None,
            overage_limit=(
                v.units(request.overage_limit, "overage_limit") if has("overage_limit") else None
            ),
            auto_purchase_units=(
                v.units(request.auto_purchase_units, "auto_purchase_units")
                if has("auto_purchase_units") else None
            ),
            auto_purchase_threshold=(
                v.units(request.auto_purchase_threshold, "auto_purchase_threshold")
                if has("auto_purchase_threshold") else None
            ),
            alerts=v.alert_settings(request.alerts) if has("alerts") else None,
            labels=v.labels(request.labels) if request.replace_labels else None,
            merge_labels=(
                v.labels(request.labels)
                if request.labels and not request.replace_labels else None
            ),
        )
        reply = await self.store.update_account(
            UpdateAccountRequest(account_id=account_id, set=changes, by=current().principal_id),
            deadline_s(context),
        )
        await self.barrier.settle_account(account_id)
        return account_pb2.UpdateAccountResponse(account=convert.account(reply.account))

    @map_errors
    async def PurchaseUnits(
        self, request: account_pb2.PurchaseUnitsRequest, context: Context
    ) -> account_pb2.PurchaseUnitsResponse:
        account_id = _account(request.account_id)
        purchase = PurchaseRequest(
            account_id=account_id,
            units=v.units(request.units, "units", minimum=1),
            idempotency_key=v.idempotency_key(request.idempotency_key),
            expires_at=(
                v.timestamp_ms(request.expires_at, "expires_at")
                if request.HasField("expires_at")
                else 0
            ),
            reference=v.text(request.reference, "reference", limits.REFERENCE_BYTES_MAX),
            by=current().principal_id,
        )
        reply = await self.store.purchase(purchase, deadline_s(context))
        await self.barrier.settle_account(account_id)
        return account_pb2.PurchaseUnitsResponse(grant=convert.grant(reply.grant))

    @map_errors
    async def ListLedgerEntries(
        self, request: account_pb2.ListLedgerEntriesRequest, context: Context
    ) -> account_pb2.ListLedgerEntriesResponse:
        query = ledger_query.parse(request)
        require_account(query.account_id)
        rows = await ledger_query.read(self.ledger, query)
        more = len(rows) > query.page_size
        rows = rows[: query.page_size]
        return account_pb2.ListLedgerEntriesResponse(
            entries=[convert.ledger_entry(row) for row in rows],
            next_page_token=ledger_query.token_after(rows[-1].seq) if more else "",
        )


    @map_errors
    async def SetBudget(
        self, request: account_pb2.SetBudgetRequest, context: Context
    ) -> account_pb2.SetBudgetResponse:
        account_id = _account(request.account_id)
        if not request.HasField("budget"):
            raise InvalidArgument("budget is required", field_name="budget")
        reply = await self.store.set_budget(
            v.budget(account_id, request.budget, by=current().principal_id), deadline_s(context)
        )
        await self.barrier.settle_account(account_id)
        return account_pb2.SetBudgetResponse(budget=convert.budget(reply.budget))

    @map_errors
    async def ListBudgets(
        self, request: account_pb2.ListBudgetsRequest, context: Context
    ) -> account_pb2.ListBudgetsResponse:
        reply = await self.store.balance(_balance_request(request), deadline_s(context))
        return account_pb2.ListBudgetsResponse(
            budgets=[convert.budget(view) for view in reply.account.budgets]
        )

    @map_errors
    async def DeleteBudget(
        self, request: account_pb2.DeleteBudgetRequest, context: Context
    ) -> account_pb2.DeleteBudgetResponse:
        account_id = _account(request.account_id)
        budget_id = v.text(request.budget_id, "budget_id", limits.BUDGET_ID_BYTES_MAX)
        if not budget_id:
            raise InvalidArgument("budget_id is required", field_name="budget_id")
        reply = await self.store.delete_budget(
            DeleteBudgetRequest(
                account_id=account_id, budget_id=budget_id, by=current().principal_id
            ),
            deadline_s(context),
        )
        await self.barrier.settle_account(account_id)
        return account_pb2.DeleteBudgetResponse(budget=convert.budget(reply.budget))


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, store: QuotaStore, barrier: MoneyInBarrier) -> None:
        self.store = store
        self.barrier = barrier

    @map_errors
    async def SetPrice(
        self, request: catalog_pb2.SetPriceRequest, context: Context
    ) -> catalog_pb2.SetPriceResponse:
        price = SetPriceRequest(
            operation=v.operation(request.operation),
            units_per_quantity=v.units(
                request.units_per_quantity, "units_per_quantity", minimum=1
            ),
            by=current().principal_id,
        )
        reply = await self.store.set_price(price, deadline_s(context))
        await self.barrier.settle_shard(0)
        return catalog_pb2.SetPriceResponse(price=convert.price(reply))

    @map_errors
    async def ListPrices(
        self, request: catalog_pb2.ListPricesRequest, context: Context
    ) -> catalog_pb2.ListPricesResponse:
        prices, version = await self.store.list_prices()
        return catalog_pb2.ListPricesResponse(
            prices=[convert.price(p) for p in prices], catalog_version=version
        )
