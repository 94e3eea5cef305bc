"""The per-call steps every method gets, applied once per method handler when the
services are registered, not by grpc.aio interceptors asked on every call.

In order: metrics (outermost: a call refused or shed is counted with its code),
authentication (api/auth.py), the refusal of undecodable requests
(api/malformed.py), then an admission slot (api/admission.py): neither a refused
nor a malformed call ever waits for a slot. A unary call runs all of them in one
coroutine around its behavior; four chained interceptors cost a coroutine and a
continuation each per call. Server streams (WatchUsage, health Watch) compose
the same steps as separate wrappers: they are rare and long-lived.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import grpc

from tally import metrics
from tally.api import malformed
from tally.api.admission import Admission, Shed
from tally.api.auth import CallAuth
from tally.api.rpc_metrics import (
    Context,
    Handler,
    MethodMetrics,
    cancelled_code,
    deadline_passed,
    final_code,
    unary_stream,
)
from tally.auth.principal import bind_principal, unbind_principal
from tally.auth.roles import needs_token

Behavior = Callable[[Any, Context], Awaitable[Any]]


class CallPipeline:
    """Wraps each method's handler with the per-call steps. `auth` None: --auth off
    (every call runs as ANONYMOUS); `admitted`: the services whose unary calls take
    an admission slot (health and reflection never wait)."""

    def __init__(
        self, auth: CallAuth | None, admission: Admission, admitted: Collection[str]
    ) -> None:
        self.auth = auth
        self.admission = admission
        self.admitted = frozenset(admitted)

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        """The handler to serve full_method with (client streams are left as they are)."""
        if handler.request_streaming:
            return handler
        auth = self.auth if needs_token(full_method) else None
        refusal = malformed.refusal(full_method)
        decode = malformed.tolerant(handler.request_deserializer)
        if not handler.response_streaming and handler.unary_unary is not None:
            service = full_method.lstrip("/").rpartition("/")[0]
            admission = self.admission if service in self.admitted else None
            return grpc.unary_unary_rpc_method_handler(
                _unary_unary(full_method, handler.unary_unary, auth, refusal, admission),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and handler.unary_stream is not None:
            behavior = malformed.unary_stream(refusal, handler.unary_stream)
            if auth is not None:
                behavior = auth.unary_stream(full_method, behavior)
            return grpc.unary_stream_rpc_method_handler(
                unary_stream(MethodMetrics(full_method).method, behavior),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        return handler


def _unary_unary(
    full_method: str,
    behavior: Callable[..., Any],
    auth: CallAuth | None,
    refusal: grpc.Status,
    admission: Admission | None,
) -> Behavior:
    counted = MethodMetrics(full_method)
    shed_reasons: dict[str, Any] = {}  # reason -> tally_rpc_shed_total child

    def shed_counter(reason: str) -> Any:
        child = shed_reasons.get(reason)
        if child is None:
            child = shed_reasons[reason] = metrics.RPC_SHED.labels(
                method=counted.method, reason=reason
            )
        return child

    async def handle(request: Any, context: Context) -> Any:
        started = time.perf_counter()
        code = "INTERNAL"
        bound = None
        admitted = False
        try:
            if auth is not None:
                principal = auth.known(full_method, context)
                if principal is None:
                    principal = await auth.principal(full_method, context)
                bound = bind_principal(principal)
            if request is malformed.MALFORMED:
                await context.abort_with_status(refusal)
            if admission is not None:
                try:
                    await admission.enter(context.time_remaining())
                except Shed as shed:
                    shed_counter(shed.reason).inc()
                    await context.abort(shed.code, shed.message)
                admitted = True
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
            code = final_code(context, aborted=False)
            if code == "OK":
                counted.succeeded(request, response)
            return response
        except grpc.aio.AbortError:
            code = final_code(context, aborted=True)
            raise
        except asyncio.CancelledError:
            code = cancelled_code(context)
            raise
        except Exception:
            # An answer that could not be sent because the deadline passed meanwhile
            # (gRPC ended the call DEADLINE_EXCEEDED already) is not an internal error.
            if deadline_passed(context):
                code = grpc.StatusCode.DEADLINE_EXCEEDED.name
            raise
        finally:
            if admitted:
                admission.leave()  # type: ignore[union-attr]  # admitted: admission is set
            if bound is not None:
                unbind_principal(bound)
            counted.ended(code, started)

    return handle


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come wrapped (built once per method,
    again only if the service hands out another handler)."""

    def __init__(self, inner: grpc.GenericRpcHandler, pipeline: CallPipeline) -> None:
        self._inner = inner
        self._pipeline = pipeline
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._pipeline.wrap(full_method, handler)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped


class WrappingServer:
    """Stands for the server while services register (the generated add_*_to_server
    functions): every method handler they register is wrapped by the pipeline."""

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            [_WrappedGeneric(handler, self._pipeline) for handler in handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: self._pipeline.wrap(f"/{service_name}/{name}", handler)
                for name, handler in method_handlers.items()
            },
        )
