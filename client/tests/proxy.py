"""A real gRPC server in front of Tally that forwards every call as bytes and can
fail, lose or delay chosen ones, recording each attempt's method, idempotency key
and deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf import message_factory

from tally_client.v1 import account_pb2, quota_pb2

SERVICES = {
    "tally.v1.QuotaService": quota_pb2.DESCRIPTOR.services_by_name["QuotaService"],
    "tally.v1.AccountService": account_pb2.DESCRIPTOR.services_by_name["AccountService"],
}


@dataclass
class Attempt:
    method: str
    idempotency_key: str
    time_remaining_s: float | None
    arrived: float


def _key(path: str, body: bytes) -> str:
    service, _, name = path.strip("/").partition("/")
    input_type = SERVICES[service].methods_by_name[name].input_type
    request = message_factory.GetMessageClass(input_type).FromString(body)
    return str(getattr(request, "idempotency_key", ""))


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = grpc.insecure_channel(upstream)
        self.attempts: list[Attempt] = []
        self.refuse = 0          # the next N calls: UNAVAILABLE, not forwarded
        self.lose_replies = 0    # the next N calls: forwarded, then UNAVAILABLE
        self.refuse_all = False  # every call: UNAVAILABLE
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([_Forward(self)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.stop(None)
        self.upstream.close()

    def keys(self, method: str) -> list[str]:
        return [a.idempotency_key for a in self.attempts if a.method == method]

    def handle(self, path: str, body: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.attempts.append(Attempt(
                path.rsplit("/", 1)[-1], _key(path, body), context.time_remaining(),
                time.monotonic(),
            ))
            refuse = self.refuse_all or self.refuse > 0
            self.refuse = max(self.refuse - 1, 0) if not self.refuse_all else self.refuse
            lose = not refuse and self.lose_replies > 0
            self.lose_replies -= 1 if lose else 0
        if refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: refused")
        if self.delay_s:
            time.sleep(self.delay_s)
        forward: Callable[..., Any] = self.upstream.unary_unary(path)
        try:
            reply: bytes = forward(
                body, timeout=context.time_remaining(),
                metadata=[(m.key, m.value) for m in context.invocation_metadata()],
            )
        except grpc.RpcError as error:
            context.abort(error.code(), error.details())  # type: ignore[attr-defined]
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: reply lost")
        return reply


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path = handler_call_details.method  # type: ignore[attr-defined]
        return grpc.unary_unary_rpc_method_handler(
            lambda body, context: self.proxy.handle(path, body, context)
        )
