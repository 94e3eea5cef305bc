"""Requests whose bytes are no message of their type: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio decodes a request with the method handler's deserializer before any
behavior runs, and answers UNKNOWN ("Unexpected error") when that raises. This
module gives every method a deserializer that turns undecodable bytes into
MALFORMED, and api/pipeline.py a behavior that refuses MALFORMED with
INVALID_ARGUMENT naming the request and its type, so the refusal is
deliberate and counted like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tally.api.errors import rich_status
from tally.api.rpc_metrics import Context
from tally.domain.errors import InvalidArgument


class _Malformed:
    """A request whose bytes did not decode (one instance, MALFORMED)."""


MALFORMED = _Malformed()


def refusal(full_method: str) -> grpc.Status:
    method = full_method.rpartition("/")[2]
    return rich_status(InvalidArgument(
        f"request is not a valid {method} request message (it does not decode)",
        field_name="request",
    ))


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except DecodeError:
            return MALFORMED

    return decode


def unary_stream(
    refusal: grpc.Status, stream: Callable[..., Any]
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    """A stream's behavior that refuses MALFORMED before anything else."""

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

    return handle_stream
