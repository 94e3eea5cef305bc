"""RPC metrics (rate, status code, latency) and units by operation, recorded from
the request and response messages; api/pipeline.py applies them to every
unary-request handler (unary-unary and unary-stream) with the other per-call
steps. A call
ends with OK, with the code its handler aborted with (or set), INTERNAL when
the handler raised something unexpected, and CANCELLED or DEADLINE_EXCEEDED
when it was cancelled. Unary calls are timed; streams are counted when they
end but not timed (a watch's lifetime is not a latency).

Units are counted only for successful calls that moved something: a replay
(`replayed = true`) answered what an earlier call already counted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc

from tally import metrics
from tally_client.v1 import quota_pb2

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


def final_code(context: Context, aborted: bool) -> str:
    try:
        name = _code_name(context.code())
    except Exception:  # a context without code(): only the outcome is known
        name = None
    if name is None:
        return "UNKNOWN" if aborted else "OK"
    return name


def deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def cancelled_code(context: Context) -> str:
    if deadline_passed(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


# --- units by operation ----------------------------------------------------------


# (counter, operation label) -> the counter's child: bound once per operation (the
# labels are bounded by metrics.OPERATION_LABELS_MAX), not looked up per call.
_BY_OPERATION: dict[tuple[Any, str], Any] = {}


def _by_operation(counter: Any, operation: str) -> Any:
    label = metrics.operation_label(operation)
    child = _BY_OPERATION.get((counter, label))
    if child is None:
        child = _BY_OPERATION[(counter, label)] = counter.labels(operation=label)
    return child


def _reserved(request: quota_pb2.ReserveRequest, response: quota_pb2.ReserveResponse) -> None:
    if not response.replayed:
        _by_operation(metrics.UNITS_RESERVED, request.operation).inc(max(0, response.units))


def _count_charge(operation: str, units_charged: int, overage_units: int) -> None:
    """A Commit and a Charge count their units alike."""
    _by_operation(metrics.UNITS_CHARGED, operation).inc(max(0, units_charged))
    _by_operation(metrics.OVERAGE_UNITS, operation).inc(max(0, overage_units))


def _committed(_request: quota_pb2.CommitRequest, response: quota_pb2.CommitResponse) -> None:
    if not response.replayed:
        _count_charge(response.operation, response.units_charged, response.overage_units)


def _refunded(_request: quota_pb2.RefundRequest, response: quota_pb2.RefundResponse) -> None:
    if not response.replayed:
        _by_operation(metrics.UNITS_REFUNDED, response.operation).inc(
            max(0, response.units_refunded)
        )


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


# --- the wrappers (api/pipeline.py applies them) -----------------------------------


class MethodMetrics:
    """One unary method's metric children, bound once: calls by code (filled on first
    use of each code), latency, and the units its successful calls moved."""

    def __init__(self, full_method: str) -> None:
        self.method = method_label(full_method)
        self.duration = metrics.RPC_DURATION.labels(method=self.method)
        self.recorder = UNITS_RECORDERS.get(full_method)
        self._requests: dict[str, Any] = {}

    def ended(self, code: str, started: float) -> None:
        """Counts a call that ended with `code`, timed from `started` (perf_counter)."""
        self.duration.observe(time.perf_counter() - started)
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = metrics.RPC_REQUESTS.labels(
                method=self.method, code=code
            )
        child.inc()

    def succeeded(self, request: Any, response: Any) -> None:
        _record_units(self.recorder, request, response)


def unary_stream(
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
            code = final_code(context, aborted=False)
        except grpc.aio.AbortError:
            code = final_code(context, aborted=True)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = cancelled_code(context)
            raise
        finally:
            metrics.RPC_REQUESTS.labels(method=method, code=code).inc()

    return handle
