"""Server interceptors: the base that wraps each method's handler once, and
RPC metrics (rate, status code, latency) and units by operation, recorded from
the request and response messages (admission lives in api/admission.py).

Every unary-request handler (unary-unary and unary-stream) is wrapped. A call
ends with OK, with the code its handler aborted with (or set), INTERNAL when
the handler raised something unexpected, and CANCELLED or DEADLINE_EXCEEDED
when it was cancelled. Unary calls are timed; streams are counted when they
end but not timed (a watch's lifetime is not a latency).

Units are counted only for successful calls that moved something: a replay
(`replayed = true`) answered what an earlier call already counted.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from tally import metrics
from tally.v1 import quota_pb2

log = logging.getLogger("tally.api")

Context = grpc.aio.ServicerContext[Any, Any]
UnitsRecorder = Callable[[Any, Any], None]
# grpc.RpcMethodHandler is generic in the stubs only.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_QUOTA = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
_CODES_BY_VALUE: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def method_label(full_method: str) -> str:
    """'/tally.v1.QuotaService/Reserve' -> 'QuotaService/Reserve'."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return f"{service.rpartition('.')[2]}/{method}"


def _code_name(code: Any) -> str | None:
    """The name of a status code read from a servicer context (an enum member or,
    from the Cython context, its integer value); None when none was set."""
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODES_BY_VALUE.get(code, "UNKNOWN")
    return "UNKNOWN"


def _final_code(context: Context, aborted: bool) -> str:
    try:
        name = _code_name(context.code())
    except Exception:  # a context without code(): only the outcome is known
        name = None
    if name is None:
        return "UNKNOWN" if aborted else "OK"
    return name


def _deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _cancelled_code(context: Context) -> str:
    if _deadline_passed(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


# --- units by operation ----------------------------------------------------------


def _reserved(request: quota_pb2.ReserveRequest, response: quota_pb2.ReserveResponse) -> None:
    if not response.replayed:
        operation = metrics.operation_label(request.operation)
        metrics.UNITS_RESERVED.labels(operation=operation).inc(max(0, response.units))


def _count_charge(operation: str, units_charged: int, overage_units: int) -> None:
    """A Commit and a Charge count their units alike."""
    label = metrics.operation_label(operation)
    metrics.UNITS_CHARGED.labels(operation=label).inc(max(0, units_charged))
    metrics.OVERAGE_UNITS.labels(operation=label).inc(max(0, overage_units))


def _committed(_request: quota_pb2.CommitRequest, response: quota_pb2.CommitResponse) -> None:
    if not response.replayed:
        _count_charge(response.operation, response.units_charged, response.overage_units)


def _refunded(_request: quota_pb2.RefundRequest, response: quota_pb2.RefundResponse) -> None:
    if not response.replayed:
        operation = metrics.operation_label(response.operation)
        metrics.UNITS_REFUNDED.labels(operation=operation).inc(max(0, response.units_refunded))


def _charged(request: quota_pb2.ChargeRequest, response: quota_pb2.ChargeResponse) -> None:
    if not response.replayed:
        _count_charge(request.operation, response.units, response.overage_units)


def _per_item(recorder: UnitsRecorder) -> UnitsRecorder:
    """A batch counts the units of each item that succeeded, as its single call would."""

    def record(request: Any, response: Any) -> None:
        for item, result in zip(request.items, response.results, strict=True):
            if result.status.code == 0:
                recorder(item, result.response)

    return record


UNITS_RECORDERS: dict[str, UnitsRecorder] = {
    f"/{_QUOTA}/Reserve": _reserved,
    f"/{_QUOTA}/Commit": _committed,
    f"/{_QUOTA}/Refund": _refunded,
    f"/{_QUOTA}/Charge": _charged,
    f"/{_QUOTA}/ReserveBatch": _per_item(_reserved),
    f"/{_QUOTA}/CommitBatch": _per_item(_committed),
    f"/{_QUOTA}/RefundBatch": _per_item(_refunded),
}


def _record_units(recorder: UnitsRecorder | None, request: Any, response: Any) -> None:
    if recorder is None:
        return
    try:
        recorder(request, response)
    except Exception:  # metrics never fail a call that succeeded
        log.exception("recording units failed")


# --- the interceptor ------------------------------------------------------------


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of each method with a unary request; `wrap` says how.

    grpc.aio asks the interceptor on every call: the wrapped handler of each method
    is built once and reused while the service returns the same handler."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    @abc.abstractmethod
    def wrap(self, full_method: str, handler: Handler) -> Handler:
        """The handler to serve full_method with (handler itself: left as it is)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        full_method = handler_call_details.method
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(full_method, handler)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped


class MetricsInterceptor(WrappingInterceptor):
    """Counts and times every call with a unary request; counts units moved."""

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        method = method_label(full_method)
        if not handler.response_streaming and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_unary(method, handler.unary_unary, UNITS_RECORDERS.get(full_method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _unary_unary(
    method: str, behavior: Callable[..., Any], recorder: UnitsRecorder | None
) -> Callable[[Any, Context], Awaitable[Any]]:
    requests: dict[str, Any] = {}  # code name -> counter child, filled on first use

    def count(code: str) -> None:
        child = requests.get(code)
        if child is None:
            child = requests[code] = metrics.RPC_REQUESTS.labels(method=method, code=code)
        child.inc()

    duration = metrics.RPC_DURATION.labels(method=method)

    async def handle(request: Any, context: Context) -> Any:
        started = time.perf_counter()
        code = "INTERNAL"
        try:
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
            code = _final_code(context, aborted=False)
            if code == "OK":
                _record_units(recorder, request, response)
            return response
        except grpc.aio.AbortError:
            code = _final_code(context, aborted=True)
            raise
        except asyncio.CancelledError:
            code = _cancelled_code(context)
            raise
        except Exception:
            # An answer that could not be sent because the deadline passed meanwhile
            # (gRPC ended the call DEADLINE_EXCEEDED already) is not an internal error.
            if _deadline_passed(context):
                code = grpc.StatusCode.DEADLINE_EXCEEDED.name
            raise
        finally:
            duration.observe(time.perf_counter() - started)
            count(code)

    return handle


def _unary_stream(
    method: str, behavior: Callable[..., Any]
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        code = "INTERNAL"
        try:
            responses = behavior(request, context)
            if hasattr(responses, "__aiter__"):
                try:
                    async for response in responses:
                        yield response
                finally:
                    aclose = getattr(responses, "aclose", None)
                    if aclose is not None:
                        await aclose()  # a stream closed early closes its source now
            elif inspect.isawaitable(responses):
                await responses  # writes with context.write()
            elif responses is not None:
                for response in responses:
                    yield response
            code = _final_code(context, aborted=False)
        except grpc.aio.AbortError:
            code = _final_code(context, aborted=True)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancelled_code(context)
            raise
        finally:
            metrics.RPC_REQUESTS.labels(method=method, code=code).inc()

    return handle
