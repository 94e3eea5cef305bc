"""WatchUsage: a server stream of an account's (or every account's) events.

Being written: see the interface of UsageWatch.stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tally.ledger.backend import SqlLedger
from tally.store.keys import KeySpace
from tally.v1 import usage_pb2


class UsageWatch:
    def __init__(self, redis: Any, keys: KeySpace, ledger: SqlLedger) -> None:
        self.redis = redis
        self.keys = keys
        self.ledger = ledger

    async def stream(
        self, request: usage_pb2.WatchUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[usage_pb2.UsageEvent]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchUsage is being written")
        yield usage_pb2.UsageEvent()
