"""UsageService: reports (GetUsageReport) and the live stream (WatchUsage)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tally.api import reports
from tally.api.errors import map_errors
from tally.api.watch import UsageWatch
from tally.ledger.ledger import Ledger
from tally.store.quota_store import QuotaStore
from tally_client.v1 import usage_pb2, usage_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, store: QuotaStore, ledger: Ledger, watch: UsageWatch) -> None:
        self.store = store
        self.ledger = ledger
        self.watch = watch

    @map_errors
    async def GetUsageReport(
        self, request: usage_pb2.GetUsageReportRequest, context: Context
    ) -> usage_pb2.GetUsageReportResponse:
        report = await reports.usage_report(self.store, self.ledger, request)
        return usage_pb2.GetUsageReportResponse(report=report)

    async def WatchUsage(
        self, request: usage_pb2.WatchUsageRequest, context: Context
    ) -> AsyncIterator[usage_pb2.WatchUsageResponse]:
        async for event in self.watch.stream(request, context):
            yield usage_pb2.WatchUsageResponse(event=event)
