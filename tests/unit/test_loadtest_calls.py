"""How the load test reports a call to Locust (loadtests/tally_calls.py): answers,
refusals, sheds and failures under their names, and which of them are retried with
the same request. Calls are fakes raising the errors a gRPC stub raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from tally_calls import Caller, CallFailed
from tally_client.v1 import quota_pb2

METADATA = (("authorization", "Bearer t"),)
RETRIES = 2


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a blocking stub raises: an RpcError that is also the finished call."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        self._code, self._details = code, details
        self._trailers: tuple[tuple[str, bytes], ...] = ()
        if reason:
            status = status_pb2.Status(code=code.value[0], message=details)
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason))
            self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class Recorded:
    """Locust's request event: what was fired."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def fire(self, **kwargs: Any) -> None:
        self.requests.append(kwargs)

    def outcomes(self) -> list[tuple[str, str, str | None]]:
        return [(r["name"], r["context"]["status_code"],
                 None if r["exception"] is None else str(r["exception"]))
                for r in self.requests]


def answering(*outcomes: Message | grpc.RpcError) -> tuple[Callable[..., Any], list[Any]]:
    """A stub method giving these outcomes in turn; and the requests it was sent."""
    sent: list[Any] = []
    queue = list(outcomes)

    def method(request: Any, *, timeout: float, metadata: Any) -> Any:
        assert (timeout, metadata) == (5.0, METADATA)
        sent.append(request)
        outcome = queue.pop(0)
        if isinstance(outcome, grpc.RpcError):
            raise outcome
        return outcome

    return method, sent


def caller(event: Recorded, sleeps: list[float]) -> Caller:
    return Caller(event, METADATA, 5.0, RETRIES, sleeps.append)


REQUEST = quota_pb2.ReserveRequest(account_id="a", operation="op", idempotency_key="k1")
NO_UNITS = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "not enough units",
                        "INSUFFICIENT_UNITS")
BUSY = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: 512 calls in flight")
DOWN = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "redis unreachable")


def test_an_answer_is_a_success_under_the_rpc_name_with_its_size() -> None:
    """Proves an answered call fires one request: the RPC's name, grpc, OK, the reply's size."""
    event, sleeps = Recorded(), []
    reply = quota_pb2.ReserveResponse(reservation_id="r1", units=5)
    method, _ = answering(reply)
    assert caller(event, sleeps).call("Reserve", method, REQUEST) == reply
    (fired,) = event.requests
    assert (fired["request_type"], fired["name"], fired["response_length"],
            fired["exception"], fired["context"]) == (
        "grpc", "Reserve", reply.ByteSize(), None, {"status_code": "OK"})
    assert fired["response_time"] >= 0


def test_a_refusal_for_want_of_units_is_counted_apart_and_not_retried() -> None:
    """Proves RESOURCE_EXHAUSTED with INSUFFICIENT_UNITS is `<Rpc> [refused]`, a
    success, and is not sent again."""
    event, sleeps = Recorded(), []
    method, sent = answering(NO_UNITS)
    assert caller(event, sleeps).call("Reserve", method, REQUEST) is None
    assert event.outcomes() == [("Reserve [refused]", "RESOURCE_EXHAUSTED", None)]
    assert (len(sent), sleeps) == (1, [])


def test_a_shed_call_is_counted_apart_and_retried_with_the_same_request() -> None:
    """Proves another RESOURCE_EXHAUSTED (admission shedding) is `<Rpc> [shed]`, a
    success, and the same request (same idempotency key) is sent again after a backoff."""
    event, sleeps = Recorded(), []
    reply = quota_pb2.ReserveResponse(reservation_id="r1")
    method, sent = answering(BUSY, reply)
    assert caller(event, sleeps).call("Reserve", method, REQUEST) == reply
    assert event.outcomes() == [("Reserve [shed]", "RESOURCE_EXHAUSTED", None),
                                ("Reserve", "OK", None)]
    assert sent == [REQUEST, REQUEST] and sleeps == [0.05]


def test_unavailable_is_a_failure_retried_at_most_retries_times() -> None:
    """Proves each UNAVAILABLE attempt is a failure named by its status code, retried
    with the same request RETRIES times with a doubling backoff, then given up."""
    event, sleeps = Recorded(), []
    method, sent = answering(DOWN, DOWN, DOWN, quota_pb2.ReserveResponse())
    assert caller(event, sleeps).call("Reserve", method, REQUEST) is None
    assert event.outcomes() == [("Reserve", "UNAVAILABLE", "UNAVAILABLE: redis unreachable")
                                ] * (RETRIES + 1)
    assert all(isinstance(r["exception"], CallFailed) for r in event.requests)
    assert sent == [REQUEST] * (RETRIES + 1) and sleeps == [0.05, 0.1]


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.PERMISSION_DENIED])
def test_other_codes_are_failures_and_not_retried(code: grpc.StatusCode) -> None:
    """Proves any other status is one failure, `CODE: details`, never sent again."""
    event, sleeps = Recorded(), []
    method, sent = answering(FakeRpcError(code, "no"))
    assert caller(event, sleeps).call("Commit", method, REQUEST) is None
    assert event.outcomes() == [("Commit", code.name, f"{code.name}: no")]
    assert (len(sent), sleeps) == (1, [])

