"""The error a refused call raises, with the figures of a shortfall."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from tally_client.v1 import common_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

Metadata = Iterable[tuple[str, str | bytes]]
# A failed call of either API.
FailedCall = grpc.Call | grpc.aio.AioRpcError


class TallyRpcError(Exception):
    """A call the authority refused (or that could not reach it).

    For RESOURCE_EXHAUSTED from a shortfall, `insufficient` is the
    tally.v1.InsufficientUnits of the status details (account, operation,
    available, required, and budget_id when a budget refused rather than the
    balance), and `available` / `required` / `budget_id` repeat its figures;
    otherwise they are None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        insufficient: common_pb2.InsufficientUnits | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.insufficient = insufficient

    @property
    def available(self) -> int | None:
        return self.insufficient.available if self.insufficient is not None else None

    @property
    def required(self) -> int | None:
        return self.insufficient.required if self.insufficient is not None else None

    @property
    def budget_id(self) -> str | None:
        """The budget that refused the call; None when the balance did (or no shortfall)."""
        if self.insufficient is None or not self.insufficient.budget_id:
            return None
        return self.insufficient.budget_id

    @classmethod
    def from_call(cls, error: FailedCall) -> TallyRpcError:
        """From a failed call of either API (grpc.RpcError or grpc.aio.AioRpcError)."""
        shortfall = insufficient_units(error.trailing_metadata())
        return cls(error.code(), error.details() or "", shortfall)


def insufficient_units(metadata: Metadata | None) -> common_pb2.InsufficientUnits | None:
    """The tally.v1.InsufficientUnits in the google.rpc.Status of the trailers."""
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            if detail.Is(common_pb2.InsufficientUnits.DESCRIPTOR):
                units = common_pb2.InsufficientUnits()
                detail.Unpack(units)
                return units
        return None
    return None
