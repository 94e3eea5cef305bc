"""Requests whose bytes are no message of their type: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio decodes a request with the method handler's deserializer before any
behavior runs, and answers UNKNOWN ("Unexpected error") when that raises. This
interceptor gives every method a deserializer that turns undecodable bytes into
MALFORMED, and a behavior that refuses MALFORMED with INVALID_ARGUMENT naming the
request and its type, so the refusal is deliberate and counted like any other.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tally.api.errors import rich_status
from tally.api.interceptors import Context, Handler, WrappingInterceptor
from tally.domain.errors import InvalidArgument


class _Malformed:
    """A request whose bytes did not decode (one instance, MALFORMED)."""


MALFORMED = _Malformed()


def _refusal(full_method: str) -> grpc.Status:
    method = full_method.rpartition("/")[2]
    return rich_status(InvalidArgument(
        f"request is not a valid {method} request message (it does not decode)",
        field_name="request",
    ))


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except DecodeError:
            return MALFORMED

    return decode


class MalformedRequestInterceptor(WrappingInterceptor):
    """Refuses undecodable requests with INVALID_ARGUMENT before any other work."""

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        refusal = _refusal(full_method)
        decode = _tolerant(handler.request_deserializer)
        if not handler.response_streaming and handler.unary_unary is not None:
            unary: Callable[..., Any] = handler.unary_unary

            async def handle(request: Any, context: Context) -> Any:
                if request is MALFORMED:
                    await context.abort_with_status(refusal)
                response = unary(request, context)
                return await response if inspect.isawaitable(response) else response

            return grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and handler.unary_stream is not None:
            stream: Callable[..., Any] = handler.unary_stream

            async def handle_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if request is MALFORMED:
                    await context.abort_with_status(refusal)
                responses = stream(request, context)
                if not hasattr(responses, "__aiter__"):
                    await responses  # writes with context.write() (grpc's health Watch)
                    return
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                handle_stream, request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        return handler
