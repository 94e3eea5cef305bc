"""Tally calls as Locust requests.

Every attempt of every call fires Locust's request event (request_type "grpc", the
RPC's name, response time, response size, status code in the context), so that the
summary, the CSV and the HTML report count each of them. A RESOURCE_EXHAUSTED is a
refusal the design promises, not a failure: it is reported under its own name, as a
success, so that the failure count holds real failures only:

- `<Rpc> [refused]`: not enough units (the status carries INSUFFICIENT_UNITS);
- `<Rpc> [shed]`: any other RESOURCE_EXHAUSTED, the server's admission shedding a
  call while it is busy.

UNAVAILABLE (the store is unreachable) and a shed call are retried with the same
request, so the same idempotency key, at most `retries` times, after a short
backoff; each attempt is reported. Neither Locust nor gevent is imported here (the
locustfile passes its event and gevent's sleep), so the suite can test this module
without monkey-patching itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

REQUEST_TYPE = "grpc"
REFUSED = "[refused]"
SHED = "[shed]"
INSUFFICIENT_UNITS = "INSUFFICIENT_UNITS"
RETRY_BACKOFF_S = 0.05  # doubled at each retry

Response = TypeVar("Response", bound=Message)
Metadata = tuple[tuple[str, str], ...]


class RequestEvent(Protocol):
    """Locust's request event (environment.events.request)."""

    def fire(self, **kwargs: Any) -> None: ...


class CallFailed(Exception):
    """A call that ended in a real failure. Reads `CODE: details`, so Locust's
    failure table groups failures by status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def is_insufficient_units(error: grpc.RpcError) -> bool:
    """Whether a RESOURCE_EXHAUSTED carries Tally's INSUFFICIENT_UNITS detail."""
    status = rpc_status.from_call(error)
    if status is None:
        return False
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == INSUFFICIENT_UNITS:
            return True
    return False


@dataclass(frozen=True)
class Caller:
    """Calls one server as one principal, reporting every attempt to `request_event`."""

    request_event: RequestEvent
    metadata: Metadata
    timeout_s: float
    retries: int
    sleep: Callable[[float], None]  # gevent.sleep under Locust

    def call(
        self, name: str, method: Callable[..., Response], request: Message
    ) -> Response | None:
        """The response, or None when the call was refused, shed or failed (all reported)."""
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                response: Response = method(
                    request, timeout=self.timeout_s, metadata=self.metadata
                )
            except grpc.RpcError as error:
                elapsed_ms = (time.perf_counter() - started) * 1000
                retry = self._report_error(name, error, elapsed_ms)
                if not retry or attempt == self.retries:
                    return None
                self.sleep(RETRY_BACKOFF_S * 2**attempt)
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            self._report(name, elapsed_ms, response.ByteSize(), grpc.StatusCode.OK, None)
            return response
        raise AssertionError("unreachable: the last attempt returns")

    def _report_error(self, name: str, error: grpc.RpcError, elapsed_ms: float) -> bool:
        """Reports a refused, shed or failed attempt; whether it is worth a retry."""
        code: grpc.StatusCode = error.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            refused = is_insufficient_units(error)
            self._report(f"{name} {REFUSED if refused else SHED}", elapsed_ms, 0, code, None)
            return not refused
        details: str = error.details() or ""
        self._report(name, elapsed_ms, 0, code, CallFailed(code, details))
        return code == grpc.StatusCode.UNAVAILABLE

    def _report(
        self,
        name: str,
        elapsed_ms: float,
        response_length: int,
        code: grpc.StatusCode,
        exception: Exception | None,
    ) -> None:
        context: dict[str, Any] = {"status_code": code.name}
        self.request_event.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=elapsed_ms,
            response_length=response_length,
            exception=exception,
            context=context,
        )
