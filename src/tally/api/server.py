"""Builds the gRPC server: services, health, reflection (unless turned off), TLS and
limits (api/transport.py), graceful stop."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tally.api.admission import Admission
from tally.api.auth import CallAuth
from tally.api.closed_reservations import ClosedReservations
from tally.api.pipeline import CallPipeline, WrappingServer
from tally.api.servicers import AccountServicer, CatalogServicer, QuotaServicer
from tally.api.tokens import TokenServicer
from tally.api.transport import ServerTransport
from tally.api.usage import UsageServicer
from tally.api.validation import HoldTtlLimits
from tally.api.watch import UsageWatch
from tally.auth.authenticator import Authenticator
from tally.auth.book import TokenBook
from tally.ledger.durability import MoneyInBarrier
from tally.ledger.ledger import Ledger
from tally.store.quota_store import QuotaStore
from tally_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

SERVICE_NAMES = (
    quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name,
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    token_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
)


def build_server(
    store: QuotaStore,
    ttl_limits: HoldTtlLimits,
    listen: str,
    barrier: MoneyInBarrier,
    ledger: Ledger,
    watch: UsageWatch,
    admission: Admission,
    transport: ServerTransport,
    authenticator: Authenticator | None,
    tokens: TokenBook,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Returns the server (not started), the bound port and its health servicer.
    Without an authenticator (--auth off) every call runs as ANONYMOUS."""
    auth = None if authenticator is None else CallAuth(authenticator, transport.principals)
    grpc_server = grpc.aio.server(options=transport.options)
    # Every service registers through this stand-in: its handlers come back wrapped
    # with the per-call steps (api/pipeline.py), built once per method.
    server: Any = WrappingServer(grpc_server, CallPipeline(auth, admission, SERVICE_NAMES))
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(
        QuotaServicer(store, ttl_limits, ClosedReservations(store, ledger, barrier)), server
    )
    account_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountServicer(store, barrier, ledger), server
    )
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(
        CatalogServicer(store, barrier), server
    )
    usage_pb2_grpc.add_UsageServiceServicer_to_server(
        UsageServicer(store, ledger, watch), server
    )
    token_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if transport.reflection:  # a bidirectional stream: nothing of the pipeline applies
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
        )
    port = (
        grpc_server.add_insecure_port(listen)
        if transport.credentials is None
        else grpc_server.add_secure_port(listen, transport.credentials)
    )
    if port == 0:
        raise RuntimeError(f"could not listen on {listen}")
    return grpc_server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, status)


class Serving:
    """Health from its sources: SERVING while every background task can stay up
    (the supervisor), no shard is fenced (store/fence.py) and, in a worker, the
    primary says so (it runs the background work and waits for every worker);
    after `close()` (shutdown) always NOT_SERVING."""

    def __init__(self, health_servicer: health.aio.HealthServicer, primary_up: bool = True) -> None:
        self._servicer = health_servicer
        self._tasks_up = True
        self._fenced = False
        self._primary_up = primary_up
        self._closed = False

    async def primary(self, up: bool) -> None:
        self._primary_up = up
        await self._publish()

    async def tasks(self, up: bool) -> None:
        self._tasks_up = up
        await self._publish()

    async def fences(self, fenced: bool) -> None:
        self._fenced = fenced
        await self._publish()

    async def close(self) -> None:
        self._closed = True
        await self._publish()

    async def _publish(self) -> None:
        serving = self._tasks_up and self._primary_up and not self._fenced and not self._closed
        await set_serving(self._servicer, serving)
