"""The baseline a team would otherwise build: QuotaService on PostgreSQL.

    python -m bench.pg_server --port 50062 --dsn postgresql://postgres@127.0.0.1:5432/db \
        [--pool 16] [--event-loop auto|uvloop|asyncio]

The same RPC shape as Tally's hot path on a grpc.aio server (same options), with
psycopg's async connection pool:

- Reserve: one transaction: record the hold (its idempotency key unique: a
  retry finds the first hold), then take the units
  `UPDATE balances SET units = units - $1 WHERE account_id = $2 AND units >= $1`;
  no row updated: RESOURCE_EXHAUSTED.
- Commit: settle the hold (held -> committed, the units were taken at Reserve).
- Charge: the UPDATE alone.

Prices: a fixed number of units per quantity (`--units`), like one catalog entry.
`setup()` creates the schema and the funded accounts (bench/run.py calls it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from typing import Any

import grpc
import psycopg
from psycopg_pool import AsyncConnectionPool

from bench import event_loops
from bench.unmeasured import NoBatches, Unmeasured
from tally import config
from tally.api.transport import server_options
from tally_client.v1 import common_pb2, quota_pb2, quota_pb2_grpc

SCHEMA = """
CREATE TABLE balances (account_id text PRIMARY KEY, units bigint NOT NULL);
CREATE TABLE holds (
  reservation_id text PRIMARY KEY,
  idempotency_key text NOT NULL UNIQUE,
  account_id text NOT NULL REFERENCES balances,
  units bigint NOT NULL,
  state text NOT NULL DEFAULT 'held'
);
"""
TAKE = ("UPDATE balances SET units = units - %(units)s "
        "WHERE account_id = %(account)s AND units >= %(units)s RETURNING units")
RECORD_HOLD = ("INSERT INTO holds (reservation_id, idempotency_key, account_id, units) "
               "VALUES (%(id)s, %(key)s, %(account)s, %(units)s) "
               "ON CONFLICT (idempotency_key) DO NOTHING")
FIND_HOLD = "SELECT reservation_id, units FROM holds WHERE idempotency_key = %(key)s"
SETTLE = ("UPDATE holds SET state = 'committed' WHERE reservation_id = %(id)s "
          "AND state = 'held' RETURNING units")
DEFAULT_POOL = 16


class PostgresQuota(Unmeasured, NoBatches, quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, pool: AsyncConnectionPool[Any], units_per_quantity: int) -> None:
        self.pool = pool
        self.units_per_quantity = units_per_quantity

    def _units(self, quantity: int) -> int:
        return (quantity or 1) * self.units_per_quantity

    async def Reserve(self, request: Any, context: Any) -> quota_pb2.ReserveResponse:
        units = self._units(request.quantity)
        hold = {"id": str(uuid.uuid4()), "key": request.idempotency_key,
                "account": request.account_id, "units": units}
        async with self.pool.connection() as conn, conn.transaction():
            recorded = await conn.execute(RECORD_HOLD, hold)
            if recorded.rowcount == 0:  # a retry: the first hold stands
                found = await (await conn.execute(FIND_HOLD, hold)).fetchone()
                assert found is not None
                return quota_pb2.ReserveResponse(reservation_id=found[0], units=found[1],
                                                 replayed=True)
            row = await (await conn.execute(TAKE, hold)).fetchone()
            if row is None:
                raise _Refused(request.account_id)
        return quota_pb2.ReserveResponse(
            reservation_id=hold["id"], units=units, quantity=request.quantity or 1,
            units_per_quantity=self.units_per_quantity,
            balance=common_pb2.Balance(account_id=request.account_id, available=row[0]))

    async def Commit(self, request: Any, context: Any) -> quota_pb2.CommitResponse:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(SETTLE, {"id": request.reservation_id})).fetchone()
        if row is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "reservation_id: no open hold")
        assert row is not None
        return quota_pb2.CommitResponse(units_charged=row[0])

    async def Charge(self, request: Any, context: Any) -> quota_pb2.ChargeResponse:
        units = self._units(request.quantity)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                TAKE, {"units": units, "account": request.account_id})).fetchone()
        if row is None:
            raise _Refused(request.account_id)
        return quota_pb2.ChargeResponse(
            units=units, balance=common_pb2.Balance(account_id=request.account_id,
                                                    available=row[0]))


class _Refused(Exception):
    def __init__(self, account_id: str) -> None:
        super().__init__(f"account {account_id}: insufficient units")


class RefusalInterceptor(grpc.aio.ServerInterceptor):
    """_Refused -> RESOURCE_EXHAUSTED (the handlers stay plain)."""

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def refusing(request: Any, context: Any) -> Any:
            try:
                return await inner(request, context)
            except _Refused as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

        return grpc.unary_unary_rpc_method_handler(
            refusing, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def serve(port: int, dsn: str, pool_size: int, units_per_quantity: int) -> None:
    settings = config.from_sources(argparse.Namespace(), {})
    async with AsyncConnectionPool(dsn, min_size=pool_size, max_size=pool_size,
                                   kwargs={"autocommit": True}, open=False) as pool:
        await pool.wait()
        server = grpc.aio.server(interceptors=[RefusalInterceptor()],
                                 options=server_options(settings))
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(
            PostgresQuota(pool, units_per_quantity), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)


def setup(dsn: str, accounts: list[str], units_each: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        with conn.cursor().copy("COPY balances (account_id, units) FROM STDIN") as copy:
            for account in accounts:
                copy.write_row((account, units_each))
        # statistics for the planner, and the checkpoint the new database asks for
        # taken now rather than during the first measured run
        conn.execute("VACUUM ANALYZE balances")
        conn.execute("CHECKPOINT")


def main() -> None:
    parser = argparse.ArgumentParser(description="QuotaService on PostgreSQL (the baseline)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--pool", type=int, default=DEFAULT_POOL)
    parser.add_argument("--units", type=int, default=1, help="units per quantity")
    parser.add_argument("--event-loop", choices=event_loops.CHOICES, default="auto")
    args = parser.parse_args()
    event_loops.run(serve(args.port, args.dsn, args.pool, args.units), args.event_loop)


if __name__ == "__main__":
    main()
