"""A small typed asyncio client for workers.

    async with TallyClient("127.0.0.1:50051") as tally:
        async with tally.hold("acct-1", "image.upscale", 4, labels={"model": "x"}) as hold:
            images = await upscale(...)          # an exception releases the hold
            hold.deliver(len(images))            # charge for what was delivered
        # on normal exit the hold is committed

Every mutating call carries an idempotency key, made once per logical call
(unless the caller passes one) and reused on every retry, so a retry never
moves a unit twice. Only UNAVAILABLE is retried, with capped exponential
backoff and jitter; DEADLINE_EXCEEDED and every other status surface at once
as a `TallyRpcError`. `timeout_s` bounds a whole logical call, retries and
backoff included.

Many servers: `TallyClient(["10.0.0.1:50051", "10.0.0.2:50051"])`, or
`TallyClient("dns:///tally.internal:50051")` (every address the name resolves to).
The channel the client makes carries the service config shipped with the
protos (tally/v1/service_config.json): its `round_robin` load balancing keeps a
connection to every address and spreads calls over them (a server that goes
away is skipped), and gRPC itself retries UNAVAILABLE first; the loop here
retries on top of it what gRPC gives up on (a call the server had started to
answer, gRPC's attempts or retry budget used up) and covers a `channel` passed
in without that config.

TLS: `TallyClient(target, tls=ClientTls(ca="ca.pem"))`; for mutual TLS add the
client's `cert=` and `key=` (client_tls.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from tally.client_tls import ClientTls
from tally.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    quota_pb2,
    quota_pb2_grpc,
)

__all__ = ["Hold", "TallyClient", "TallyRpcError"]

STATUS_DETAILS_KEY = "grpc-status-details-bin"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class TallyRpcError(Exception):
    """A call the authority refused (or that could not reach it).

    For RESOURCE_EXHAUSTED, `available` and `required` come from the rich
    status details (tally.v1.InsufficientUnits); otherwise they are None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        available: int | None = None,
        required: int | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.available = available
        self.required = required

    @classmethod
    def from_aio(cls, error: grpc.aio.AioRpcError) -> TallyRpcError:
        code = error.code()
        available, required = _shortfall(error.trailing_metadata())
        return cls(code, error.details() or "", available, required)


def _shortfall(metadata: grpc.aio.Metadata | None) -> tuple[int | None, int | None]:
    """`available`/`required` from the google.rpc.Status in the trailers."""
    if metadata is None:
        return None, None
    for key, value in metadata:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None, None
        info: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(common_pb2.InsufficientUnits.DESCRIPTOR):
                units = common_pb2.InsufficientUnits()
                detail.Unpack(units)
                return units.available, units.required
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                info = dict(error_info.metadata)
        try:
            return int(info["available"]), int(info["required"])
        except (KeyError, ValueError):
            return None, None
    return None, None


def service_config() -> str:
    """The gRPC service config (JSON) of every Tally service: retries of UNAVAILABLE."""
    return resources.files("tally.v1").joinpath("service_config.json").read_text("utf-8")


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target of one address, or of several `host:port` addresses (IP
    literals: gRPC's `ipv4:` or `ipv6:` address lists; a host name must be one
    `dns:///name:port` target, which balances over all its addresses)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("no address to connect to")
    if len(addresses) == 1:
        return addresses[0]
    families = {_ip_family(address) for address in addresses}
    if len(families) != 1 or None in families:
        raise ValueError(
            "several addresses must all be IPv4 or all IPv6 literals (host:port, "
            "[v6]:port); for host names use one dns:///name:port target"
        )
    return f"{families.pop()}:{','.join(addresses)}"


def _ip_family(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    try:
        version = ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).version
    except ValueError:
        return None
    if version == 6 and not host.startswith("["):
        return None
    return "ipv4" if version == 4 else "ipv6"


def _key(value: str | None) -> str:
    return value if value else str(uuid.uuid4())


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration


def _timestamp(moment: datetime) -> Timestamp:
    if moment.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


Spend = TypeVar("Spend", quota_pb2.ReserveRequest, quota_pb2.ChargeRequest)


def _spend_request(
    kind: type[Spend],
    account_id: str,
    operation: str,
    quantity: int,
    labels: Mapping[str, str] | None,
    idempotency_key: str | None,
    price_version: int,
) -> Spend:
    """What Reserve and Charge both ask: `quantity` of `operation` on an account,
    under one idempotency key (made here when the caller gave none)."""
    return kind(
        account_id=account_id,
        operation=operation,
        quantity=quantity,
        idempotency_key=_key(idempotency_key),
        labels=dict(labels or {}),
        price_version=price_version,
    )


def _reserve_request(
    account_id: str,
    operation: str,
    quantity: int,
    labels: Mapping[str, str] | None,
    ttl_s: float | None,
    idempotency_key: str | None,
    price_version: int,
) -> quota_pb2.ReserveRequest:
    request = _spend_request(
        quota_pb2.ReserveRequest, account_id, operation, quantity, labels,
        idempotency_key, price_version,
    )
    if ttl_s is not None:
        request.ttl.CopyFrom(_duration(ttl_s))
    return request


class TallyClient:
    """Typed async access to the quota hot path (and purchases)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        max_attempts: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        """target: an address, several (calls are spread over them), or a gRPC
        target such as dns:///name:port. token: a bearer token sent with every call
        (a server with --auth required asks for one)."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be more than 0")
        self.target = channel_target(target)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        sent = [*(metadata or ()), *([("authorization", f"Bearer {token}")] if token else [])]
        self._metadata = tuple(sent) if sent else None
        self._own_channel = channel is None
        self._channel = (
            channel
            if channel is not None
            else self._open_channel(self.target, tls, interceptors)
        )
        self._quota = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._accounts = account_pb2_grpc.AccountServiceStub(self._channel)

    @staticmethod
    def _open_channel(
        target: str,
        tls: ClientTls | None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
    ) -> grpc.aio.Channel:
        options = [("grpc.service_config", service_config())]
        if tls is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(
            target, tls.credentials(), options=options, interceptors=interceptors
        )

    # --- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        """Closes the channel (when the client made it)."""
        if self._own_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the retry loop ----------------------------------------------------------

    def _backoff_s(self, retry: int) -> float:
        """Capped exponential backoff with "equal jitter": half fixed, half random."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * (1 << retry))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req
    ) -> Resp:
        """One logical call: the same request (and so the same idempotency key)
        is sent on every attempt; only UNAVAILABLE is retried."""
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            try:
                return await method(request, timeout=max(remaining, 0.001), metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_attempts:
                    raise TallyRpcError.from_aio(error) from None
                pause = self._backoff_s(attempt - 1)
                if time.monotonic() + pause >= deadline:
                    raise TallyRpcError.from_aio(error) from None
                await asyncio.sleep(pause)

    # --- the hot path --------------------------------------------------------------

    async def reserve(
        self,
        account_id: str,
        operation: str,
        quantity: int = 1,
        *,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        idempotency_key: str | None = None,
        price_version: int = 0,
    ) -> quota_pb2.ReserveResponse:
        """Holds the units `quantity` of `operation` costs; `ttl_s` None: the server's default."""
        return await self._reserve(
            _reserve_request(
                account_id, operation, quantity, labels, ttl_s, idempotency_key, price_version
            )
        )

    async def _reserve(self, request: quota_pb2.ReserveRequest) -> quota_pb2.ReserveResponse:
        return await self._call(self._quota.Reserve, request)

    async def commit(
        self, reservation_id: str, quantity: int | None = None
    ) -> quota_pb2.CommitResponse:
        """Charges a hold: the whole reserved quantity, or `quantity` of it."""
        request = quota_pb2.CommitRequest(reservation_id=reservation_id)
        if quantity is not None:
            request.quantity = quantity
        return await self._call(self._quota.Commit, request)

    async def refund(
        self,
        reservation_id: str,
        units: int | None = None,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> quota_pb2.RefundResponse:
        """Releases a hold, or gives back `units` (None: all refundable) of a charge."""
        request = quota_pb2.RefundRequest(
            reservation_id=reservation_id, reason=reason, idempotency_key=_key(idempotency_key)
        )
        if units is not None:
            request.units = units
        return await self._call(self._quota.Refund, request)

    async def charge(
        self,
        account_id: str,
        operation: str,
        quantity: int = 1,
        *,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        price_version: int = 0,
    ) -> quota_pb2.ChargeResponse:
        """Reserves and commits in one step."""
        request = _spend_request(
            quota_pb2.ChargeRequest, account_id, operation, quantity, labels,
            idempotency_key, price_version,
        )
        return await self._call(self._quota.Charge, request)

    # --- batches: many calls in one, each item with its own status ------------------

    async def reserve_batch(
        self, items: Sequence[quota_pb2.ReserveRequest]
    ) -> list[quota_pb2.ReserveBatchResult]:
        """Many Reserves in one call (at most 1,000; see _reserve_request to build
        one). An item without an idempotency key gets one, kept across retries.
        Per item, in order: its status and, when the status code is 0, its answer."""
        request = quota_pb2.ReserveBatchRequest(items=items)
        for item in request.items:
            item.idempotency_key = _key(item.idempotency_key)
        return list((await self._call(self._quota.ReserveBatch, request)).results)

    async def commit_batch(
        self, items: Sequence[tuple[str, int | None]]
    ) -> list[quota_pb2.CommitBatchResult]:
        """Many Commits in one call: (reservation id, quantity or None for all).
        Per item, in order: its status and, when the status code is 0, its answer."""
        request = quota_pb2.CommitBatchRequest()
        for reservation_id, quantity in items:
            item = request.items.add(reservation_id=reservation_id)
            if quantity is not None:
                item.quantity = quantity
        return list((await self._call(self._quota.CommitBatch, request)).results)

    async def refund_batch(
        self, items: Sequence[quota_pb2.RefundRequest]
    ) -> list[quota_pb2.RefundBatchResult]:
        """Many Refunds in one call. An item without an idempotency key gets one,
        kept across retries. Per item, in order: its status and, when the status
        code is 0, its answer."""
        request = quota_pb2.RefundBatchRequest(items=items)
        for item in request.items:
            item.idempotency_key = _key(item.idempotency_key)
        return list((await self._call(self._quota.RefundBatch, request)).results)

    async def extend(self, reservation_id: str, ttl_s: float) -> quota_pb2.ExtendResponse:
        """Keeps a hold alive: its new lifetime is `ttl_s` from now."""
        request = quota_pb2.ExtendRequest(reservation_id=reservation_id, ttl=_duration(ttl_s))
        return await self._call(self._quota.Extend, request)

    async def quote(
        self, account_id: str, operation: str, quantity: int = 1
    ) -> quota_pb2.QuoteResponse:
        """The exact cost now and whether it is affordable; moves nothing."""
        request = quota_pb2.QuoteRequest(
            account_id=account_id, operation=operation, quantity=quantity
        )
        return await self._call(self._quota.Quote, request)

    async def balance(self, account_id: str) -> common_pb2.Balance:
        reply = await self._call(
            self._quota.GetBalance, quota_pb2.GetBalanceRequest(account_id=account_id)
        )
        return reply.balance

    async def purchase(
        self,
        account_id: str,
        units: int,
        *,
        reference: str = "",
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> common_pb2.Grant:
        """Adds purchased units; `expires_at` None: they never expire."""
        request = account_pb2.PurchaseUnitsRequest(
            account_id=account_id,
            units=units,
            reference=reference,
            idempotency_key=_key(idempotency_key),
        )
        if expires_at is not None:
            request.expires_at.CopyFrom(_timestamp(expires_at))
        return (await self._call(self._accounts.PurchaseUnits, request)).grant

    def hold(
        self,
        account_id: str,
        operation: str,
        quantity: int = 1,
        *,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        idempotency_key: str | None = None,
        price_version: int = 0,
    ) -> Hold:
        """A hold as an async context manager: reserved on enter, committed on
        normal exit (the whole quantity, or what `deliver()` set), released on
        an exception, which is then re-raised."""
        return Hold(
            self,
            _reserve_request(
                account_id, operation, quantity, labels, ttl_s, idempotency_key, price_version
            ),
        )


class Hold:
    """One reservation for the length of an `async with` block."""

    def __init__(self, client: TallyClient, request: quota_pb2.ReserveRequest) -> None:
        self._client = client
        # Sent on enter (and on each retry); its key also names the release on failure.
        self.request = request
        self._delivered: int | None = None
        self.reservation: quota_pb2.ReserveResponse | None = None
        self.committed: quota_pb2.CommitResponse | None = None
        self.released: quota_pb2.RefundResponse | None = None

    def _reserved(self) -> quota_pb2.ReserveResponse:
        if self.reservation is None:
            raise RuntimeError("the hold is not reserved yet (use it with `async with`)")
        return self.reservation

    @property
    def reservation_id(self) -> str:
        return self._reserved().reservation_id

    @property
    def units(self) -> int:
        """Units held."""
        return self._reserved().units

    def deliver(self, quantity: int) -> None:
        """Commits `quantity` (at most what was reserved) instead of the whole."""
        reserved = self.request.quantity
        if not 0 <= quantity <= reserved:
            raise ValueError(f"deliver() takes 0..{reserved}, got {quantity}")
        self._delivered = quantity

    async def extend(self, ttl_s: float) -> quota_pb2.ExtendResponse:
        """Keeps the hold alive for `ttl_s` more seconds from now; `reservation`
        then shows the new expiry and balance."""
        reservation = self._reserved()
        reply = await self._client.extend(reservation.reservation_id, ttl_s)
        reservation.expires_at.CopyFrom(reply.expires_at)
        reservation.balance.CopyFrom(reply.balance)
        return reply

    async def __aenter__(self) -> Self:
        self.reservation = await self._client._reserve(self.request)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reservation_id = self.reservation_id
        if exc is None:
            self.committed = await self._client.commit(reservation_id, self._delivered)
            return
        try:
            self.released = await self._client.refund(
                reservation_id,
                reason=f"released: the work failed ({exc_type.__name__ if exc_type else '?'})",
                idempotency_key=f"release-{self.request.idempotency_key}"[:128],
            )
        except Exception as release_error:
            # The original exception matters more; the hold expires on its own.
            exc.add_note(f"tally: releasing hold {reservation_id} failed: {release_error}")
        # Returning None re-raises the original exception.
