"""Domain errors to gRPC statuses, in one place.

Every handler runs inside `map_errors`: a TallyError becomes its status code
with a message naming the field; RESOURCE_EXHAUSTED carries `available` and
`required` as google.rpc.Status details (an InsufficientUnits message and a
google.rpc.ErrorInfo). Anything else is a bug: logged, answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tally.domain.errors import ResourceExhausted, TallyError
from tally_client.v1 import common_pb2

log = logging.getLogger("tally.api")

STATUS_BY_CODE: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(error: TallyError) -> grpc.Status:
    code = STATUS_BY_CODE[error.code]
    status = status_pb2.Status(code=code.value[0], message=error.message)
    if isinstance(error, ResourceExhausted):
        shortfall = error.shortfall
        status.details.append(
            _packed(
                common_pb2.InsufficientUnits(
                    account_id=shortfall.account_id,
                    operation=shortfall.operation,
                    available=shortfall.available,
                    required=shortfall.required,
                    budget_id=shortfall.budget_id,
                )
            )
        )
        status.details.append(
            _packed(
                error_details_pb2.ErrorInfo(
                    reason="INSUFFICIENT_UNITS",
                    domain="tally.v1",
                    metadata={
                        "account_id": shortfall.account_id,
                        "operation": shortfall.operation,
                        "available": str(shortfall.available),
                        "required": str(shortfall.required),
                        "budget_id": shortfall.budget_id,
                    },
                )
            )
        )
    if error.field_name:
        status.details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field_name, description=error.message
                        )
                    ]
                )
            )
        )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def map_errors(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        try:
            return await handler(self, request, context)
        except TallyError as error:
            log.info(
                "rpc refused",
                extra={"rpc": handler.__name__, "code": error.code, "field": error.field_name},
            )
            await context.abort_with_status(rich_status(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc failed", extra={"rpc": handler.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    return wrapper


def deadline_s(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The caller's remaining deadline, passed down as the store timeout."""
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)
