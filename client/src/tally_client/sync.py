"""The synchronous client, for workers without an event loop (PyTorch, Celery,
Ray). Safe to share between threads.

    with SyncTallyClient("127.0.0.1:50051") as tally:
        with tally.hold("acct-1", "image.upscale", 4, labels={"model": "x"}) as hold:
            images = upscale(...)                # an exception releases the hold
            hold.deliver(len(images))            # charge for what was delivered
        # on normal exit the hold is committed

Retries follow retry.py; every call takes `timeout_s`, its own deadline
(default: the client's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self, TypeVar

import grpc

from tally_client import requests
from tally_client.channel import call_metadata, channel_target, sync_channel
from tally_client.hold import HoldState
from tally_client.retry import CallAttempts, RetryPolicy, check_timeout
from tally_client.tls import ClientTls
from tally_client.v1 import account_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc

__all__ = ["SyncHold", "SyncTallyClient"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class SyncTallyClient:
    """Typed synchronous access to the quota hot path (and purchases)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: ClientTls | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """target: an address, several (calls are spread over them, round robin),
        or a gRPC target such as dns:///name:port. token: a bearer token sent with
        every call. channel: one of your own (then target names it in errors)."""
        self.target = channel_target(target)
        self.timeout_s = check_timeout(timeout_s)
        self.retry = retry or RetryPolicy()
        self._metadata = call_metadata(metadata, token)
        self._own_channel = channel is None
        self._channel = channel or sync_channel(self.target, tls)
        self._quota = quota_pb2_grpc.QuotaServiceStub(self._channel)
        self._accounts = account_pb2_grpc.AccountServiceStub(self._channel)

    def close(self) -> None:
        """Closes the channel (when the client made it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout_s: float | None,
    ) -> Resp:
        attempts = CallAttempts(self.retry, self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return method(
                    request, timeout=attempts.next_timeout_s(), metadata=self._metadata
                )
            except grpc.RpcError as error:
                if not isinstance(error, grpc.Call):
                    raise
                time.sleep(attempts.pause_after(error))

    # --- the hot path ---------------------------------------------------------------

    def reserve(
        self,
        account_id: str,
        operation: str,
        quantity: int = 1,
        *,
        labels: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        idempotency_key: str | None = None,
        price_version: int = 0,
        timeout_s: float | None = None,
    ) -> quota_pb2.ReserveResponse:
        """Holds the units `quantity` of `operation` costs; `ttl_s` None: the server's default."""
        request = requests.reserve(
            account_id, operation, quantity, labels=labels, ttl_s=ttl_s,
            idempotency_key=idempotency_key, price_version=price_version,
        )
        return self._call(self._quota.Reserve, request, timeout_s)

    def commit(
        self, reservation_id: str, quantity: int | None = None, *, timeout_s: float | None = None
    ) -> quota_pb2.CommitResponse:
        """Charges a hold: the whole reserved quantity, or `quantity` of it."""
        request = requests.commit(reservation_id, quantity)
        return self._call(self._quota.Commit, request, timeout_s)

    def refund(
        self,
        reservation_id: str,
        units: int | None = None,
        reason: str = "",
        idempotency_key: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> quota_pb2.RefundResponse:
        """Releases a hold, or gives back `units` (None: all refundable) of a charge."""
        request = requests.refund(reservation_id, units, reason, idempotency_key)
        return self._call(self._quota.Refund, request, timeout_s)

    def charge(
        self,
        account_id: str,
        operation: str,
        quantity: int = 1,
        *,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        price_version: int = 0,
        timeout_s: float | None = None,
    ) -> quota_pb2.ChargeResponse:
        """Reserves and commits in one step."""
        request = requests.charge(
            account_id, operation, quantity, labels, idempotency_key, price_version
        )
        return self._call(self._quota.Charge, request, timeout_s)

    def extend(
        self, reservation_id: str, ttl_s: float, *, timeout_s: float | None = None
    ) -> quota_pb2.ExtendResponse:
        """Keeps a hold alive: its new lifetime is `ttl_s` from now."""
        request = requests.extend(reservation_id, ttl_s)
        return self._call(self._quota.Extend, request, timeout_s)

    def quote(
        self, account_id: str, operation: str, quantity: int = 1, *,
        timeout_s: float | None = None,
    ) -> quota_pb2.QuoteResponse:
        """The exact cost now and whether it is affordable; moves nothing."""
        request = requests.quote(account_id, operation, quantity)
        return self._call(self._quota.Quote, request, timeout_s)

    def balance(
        self, account_id: str, *, timeout_s: float | None = None
    ) -> common_pb2.Balance:
        request = quota_pb2.GetBalanceRequest(account_id=account_id)
        return (self._call(self._quota.GetBalance, request, timeout_s)).balance

    def purchase(
        self,
        account_id: str,
        units: int,
        *,
        reference: str = "",
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
    ) -> common_pb2.Grant:
        """Adds purchased units; `expires_at` None: they never expire."""
        request = requests.purchase(account_id, units, reference, expires_at, idempotency_key)
        return (self._call(self._accounts.PurchaseUnits, request, timeout_s)).grant

    # --- batches: many calls in one, each item with its own status ------------------

    def reserve_batch(
        self, items: Sequence[quota_pb2.ReserveRequest], *, timeout_s: float | None = None
    ) -> list[quota_pb2.ReserveBatchResult]:
        """Many Reserves in one call (at most 1,000; requests.reserve builds one).
        Per item, in order: its status and, when the status code is 0, its answer."""
        request = requests.reserve_batch(items)
        return list((self._call(self._quota.ReserveBatch, request, timeout_s)).results)

    def commit_batch(
        self, items: Sequence[tuple[str, int | None]], *, timeout_s: float | None = None
    ) -> list[quota_pb2.CommitBatchResult]:
        """Many Commits in one call: (reservation id, quantity or None for all)."""
        request = requests.commit_batch(items)
        return list((self._call(self._quota.CommitBatch, request, timeout_s)).results)

    def refund_batch(
        self, items: Sequence[quota_pb2.RefundRequest], *, timeout_s: float | None = None
    ) -> list[quota_pb2.RefundBatchResult]:
        """Many Refunds in one call (requests.refund builds one)."""
        request = requests.refund_batch(items)
        return list((self._call(self._quota.RefundBatch, request, timeout_s)).results)

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
        heartbeat: bool = True,
        timeout_s: float | None = None,
    ) -> SyncHold:
        """A hold as a context manager (hold.HoldState). With `heartbeat`, a
        thread extends it every third of its lifetime while the block runs, so a
        job may outlast `ttl_s`; a worker that dies stops extending, and the hold
        expires one lifetime later. `timeout_s`: the deadline of each of its calls."""
        request = requests.reserve(
            account_id, operation, quantity, labels=labels, ttl_s=ttl_s,
            idempotency_key=idempotency_key, price_version=price_version,
        )
        return SyncHold(self, request, heartbeat, timeout_s)


class SyncHold(HoldState):
    def __init__(
        self, client: SyncTallyClient, request: quota_pb2.ReserveRequest, heartbeat: bool,
        timeout_s: float | None,
    ) -> None:
        super().__init__(request, heartbeat, timeout_s)
        self._client = client
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def extend(
        self, ttl_s: float, *, timeout_s: float | None = None
    ) -> quota_pb2.ExtendResponse:
        """Keeps the hold alive for `ttl_s` more seconds from now; `reservation`
        then shows the new expiry and balance."""
        reply = self._client.extend(
            self.reservation_id, ttl_s, timeout_s=timeout_s or self.timeout_s
        )
        self.extended(reply)
        return reply

    def _beat(self) -> None:
        interval = self.beat_interval_s()
        while not self._stop.wait(interval):
            try:
                self.extend(self.lifetime_s(), timeout_s=self.beat_timeout_s())
            except Exception as error:  # a refusal, a closed channel: record and stop
                self.beat_failed(error)
                return

    def __enter__(self) -> Self:
        self.entering()
        self.reservation = self._client._call(
            self._client._quota.Reserve, self.request, self.timeout_s
        )
        if self.heartbeat:
            self._beating = threading.Thread(
                target=self._beat, name=f"tally-heartbeat-{self.reservation_id}", daemon=True
            )
            self._beating.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._beating is not None:
            self._stop.set()
            self._beating.join()
        reservation_id = self.reservation_id
        if exc is None:
            self.committed = self._client.commit(
                reservation_id, self._delivered, timeout_s=self.timeout_s
            )
            return
        try:
            self.released = self._client.refund(
                reservation_id,
                reason=self.release_reason(exc_type),
                idempotency_key=requests.release_key(self.request.idempotency_key),
                timeout_s=self.timeout_s,
            )
        except Exception as release_error:
            # The original exception matters more; the hold expires on its own.
            exc.add_note(f"tally: releasing hold {reservation_id} failed: {release_error}")
        # Returning None re-raises the original exception.
