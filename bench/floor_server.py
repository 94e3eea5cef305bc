"""The floor: QuotaService answered by empty handlers on a bare grpc.aio server.

    python -m bench.floor_server --port 50061 [--event-loop auto|uvloop|asyncio]

Same protos, same server options as `tally serve` (tally.api.transport), and
replies of realistic size built once (a ReserveResponse carries a reservation id
shaped like Tally's, which the client commits, and a balance with one grant).
Requests are still parsed and replies serialized by the generated code: what
any server of this API pays before it does any work. No interceptors, no store.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from bench import event_loops
from bench.unmeasured import Unmeasured
from tally import config
from tally.api.transport import server_options
from tally_client.v1 import common_pb2, quota_pb2, quota_pb2_grpc

RESERVATION_ID = "s07.1234567.bench-00042"


def _balance() -> common_pb2.Balance:
    balance = common_pb2.Balance(account_id="bench-00042", available=999_999_995, held=5,
                                 period_consumed=5, units_granted_total=1_000_000_000)
    balance.grants.add(grant_id="g-0001", kind=common_pb2.GRANT_KIND_ALLOTMENT,
                       units_granted=1_000_000_000, units_remaining=999_999_995)
    for stamp in (balance.period_start, balance.period_end, balance.as_of,
                  balance.grants[0].granted_at, balance.grants[0].expires_at):
        stamp.GetCurrentTime()
    return balance


class FloorServicer(Unmeasured, quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self) -> None:
        balance = _balance()
        self.reserve = quota_pb2.ReserveResponse(
            reservation_id=RESERVATION_ID, units=5, balance=balance, price_version=1,
            units_per_quantity=5, quantity=1)
        self.reserve.expires_at.GetCurrentTime()
        self.commit = quota_pb2.CommitResponse(units_charged=5, balance=balance,
                                               operation="bench.op")
        self.charge = quota_pb2.ChargeResponse(reservation_id=RESERVATION_ID, units=5,
                                               balance=balance, price_version=1)

    async def Reserve(self, request: Any, context: Any) -> quota_pb2.ReserveResponse:
        return self.reserve

    async def Commit(self, request: Any, context: Any) -> quota_pb2.CommitResponse:
        return self.commit

    async def Charge(self, request: Any, context: Any) -> quota_pb2.ChargeResponse:
        return self.charge

    # The batch RPCs: one fixed result per item.
    async def ReserveBatch(self, request: Any, context: Any) -> quota_pb2.ReserveBatchResponse:
        result = quota_pb2.ReserveBatchResult(response=self.reserve)
        return quota_pb2.ReserveBatchResponse(results=[result] * len(request.items))

    async def CommitBatch(self, request: Any, context: Any) -> quota_pb2.CommitBatchResponse:
        result = quota_pb2.CommitBatchResult(response=self.commit)
        return quota_pb2.CommitBatchResponse(results=[result] * len(request.items))

    async def RefundBatch(self, request: Any, context: Any) -> quota_pb2.RefundBatchResponse:
        result = quota_pb2.RefundBatchResult(response=quota_pb2.RefundResponse())
        return quota_pb2.RefundBatchResponse(results=[result] * len(request.items))


async def serve(port: int) -> None:
    settings = config.from_sources(argparse.Namespace(), {})
    server = grpc.aio.server(options=server_options(settings))
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(FloorServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="the floor: empty QuotaService handlers")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-loop", choices=event_loops.CHOICES, default="auto")
    args = parser.parse_args()
    event_loops.run(serve(args.port), args.event_loop)


if __name__ == "__main__":
    main()
