"""QuotaService methods the bench servers do not serve (no cell measures them)."""

from __future__ import annotations

from typing import Any

import grpc


async def _unimplemented(context: Any, method: str) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this bench server serves no {method}")


class Unmeasured:
    async def Refund(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "Refund")

    async def Extend(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "Extend")

    async def Quote(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "Quote")

    async def GetBalance(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "GetBalance")


class NoBatches:
    """For a baseline without a batch path (the PostgreSQL one: a team's first build)."""

    async def ReserveBatch(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "ReserveBatch")

    async def CommitBatch(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "CommitBatch")

    async def RefundBatch(self, request: Any, context: Any) -> Any:
        return await _unimplemented(context, "RefundBatch")
