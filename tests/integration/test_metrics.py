"""Prometheus metrics on a real authority: RPC counts and codes, units by operation,
holds, Redis script calls, and the Grafana dashboard's queries against the exposition.

The registry is process-global: every assertion compares a scrape before and after."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tally_client.v1 import account_pb2, common_pb2, quota_pb2
from tests.guard_support import aio, rpc_error
from tests.support import RedisProcess, Running, free_port, start_running, stop_running, unique

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "tally-dashboard.json"
SCRAPE_TIMEOUT_S = 5.0

Key = tuple[str, tuple[tuple[str, str], ...]]

# Idempotency keys distinctive enough that "absent from the exposition" cannot match by chance.
RESERVE_KEY, CHARGE_KEY, REFUND_KEY = (
    unique(f"idem-{verb}") for verb in ("reserve", "charge", "refund")
)


@dataclass
class Observed:
    running: Running
    url: str


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: dict[Key, float]
    families: set[str]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples} | self.families


@pytest_asyncio.fixture
async def observed(own_redis: RedisProcess) -> AsyncIterator[Observed]:
    """An authority on a private Redis with its /metrics endpoint on a free port. Its
    leases are renewed every 20 minutes: no renewal (Redis calls of its own, counted
    in the Redis metrics) falls between a test's two scrapes."""
    port = free_port()
    running = await start_running(
        own_redis.url, metrics_listen=f"127.0.0.1:{port}", lease_ttl="1h")
    yield Observed(running, f"http://127.0.0.1:{port}/metrics")
    await stop_running(running)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        body: bytes = response.read()
    return body.decode()


async def scrape(observed: Observed) -> Scrape:
    text = await asyncio.to_thread(_get, observed.url)
    samples: dict[Key, float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(text, samples, families)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def create_account(running: Running, account_id: str, **settings: int) -> None:
    await aio(running).accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, **settings)  # type: ignore[arg-type]
    )


def reserve(
    account_id: str, key: str, operation: str = "image.upscale", quantity: int = 1,
    ttl: Duration | None = None,
) -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(
        account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key,
        ttl=ttl, labels={"customer_ref": f"label-{account_id}"},
    )


async def drive_mix(running: Running, account_id: str) -> list[str]:
    """A known mix on a fresh DENY account with 1000 units; returns the reservation ids.

    Reserve image.upscale x3 (30 units), its replay; Commit 2 (20 charged), its replay;
    Refund 5, its replay; Charge image.generate.sdxl x4 (20 units); a Reserve of 10000
    units (RESOURCE_EXHAUSTED); a Reserve without idempotency key (INVALID_ARGUMENT)."""
    stubs = aio(running)
    held = await stubs.quota.Reserve(reserve(account_id, RESERVE_KEY, quantity=3))
    replay = await stubs.quota.Reserve(reserve(account_id, RESERVE_KEY, quantity=3))
    assert (held.units, replay.replayed) == (30, True)
    rid = held.reservation_id
    committed = await stubs.quota.Commit(quota_pb2.CommitRequest(reservation_id=rid, quantity=2))
    again = await stubs.quota.Commit(quota_pb2.CommitRequest(reservation_id=rid, quantity=2))
    assert (committed.units_charged, committed.operation, again.replayed) == (
        20, "image.upscale", True
    )
    refund = quota_pb2.RefundRequest(reservation_id=rid, units=5, idempotency_key=REFUND_KEY)
    refunded = await stubs.quota.Refund(refund)
    assert (refunded.units_refunded, (await stubs.quota.Refund(refund)).replayed) == (5, True)
    charged = await stubs.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.generate.sdxl", quantity=4,
            idempotency_key=CHARGE_KEY,
        )
    )
    assert (charged.units, charged.overage_units) == (20, 0)
    refused = await rpc_error(stubs.quota.Reserve(reserve(account_id, "big", quantity=1000)))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    malformed = await rpc_error(stubs.quota.Reserve(reserve(account_id, "")))
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    return [rid, charged.reservation_id]


async def drive_overage(running: Running, account_id: str) -> int:
    """An ALLOW account with 15 units: Charge sdxl x2 (10, no overage), then Reserve and
    Commit image.upscale x1 (10: 5 available, 5 overage), then Charge sdxl x1 (5, all
    overage). Returns the overage units the responses reported."""
    await create_account(
        running, account_id, monthly_allotment=15, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW,
        overage_limit=100,
    )
    stubs = aio(running)
    first = await stubs.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.generate.sdxl", quantity=2,
            idempotency_key="o1",
        )
    )
    held = await stubs.quota.Reserve(reserve(account_id, "o2"))
    committed = await stubs.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id)
    )
    last = await stubs.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.generate.sdxl", quantity=1,
            idempotency_key="o3",
        )
    )
    assert (first.overage_units, committed.overage_units, last.overage_units) == (0, 5, 5)
    return first.overage_units + committed.overage_units + last.overage_units


async def test_rpc_and_unit_counters_count_a_known_mix_exactly(observed: Observed) -> None:
    """Proves every RPC is counted once by method and final code (refusals as
    RESOURCE_EXHAUSTED and INVALID_ARGUMENT), timed, and that units reserved, charged
    and refunded are counted by operation exactly once: replays add nothing."""
    account_id = unique()
    await create_account(observed.running, account_id, monthly_allotment=1000)
    before = await scrape(observed)
    reservation_ids = await drive_mix(observed.running, account_id)
    after = await scrape(observed)

    def calls(method: str, code: str = "OK") -> float:
        return delta(
            before, after, "tally_rpc_requests_total", method=f"QuotaService/{method}", code=code
        )

    assert (calls("Reserve"), calls("Commit"), calls("Refund"), calls("Charge")) == (2, 2, 2, 1)
    assert calls("Reserve", "RESOURCE_EXHAUSTED") == 1
    assert calls("Reserve", "INVALID_ARGUMENT") == 1
    assert calls("Extend") == 0
    timed = delta(
        before, after, "tally_rpc_duration_seconds_count", method="QuotaService/Reserve"
    )
    assert timed == 4
    upscale, sdxl = {"operation": "image.upscale"}, {"operation": "image.generate.sdxl"}
    assert delta(before, after, "tally_units_reserved_total", **upscale) == 30
    assert delta(before, after, "tally_units_reserved_total", **sdxl) == 0
    assert delta(before, after, "tally_units_charged_total", **upscale) == 20
    assert delta(before, after, "tally_units_charged_total", **sdxl) == 20
    assert delta(before, after, "tally_units_refunded_total", **upscale) == 5
    assert delta(before, after, "tally_overage_units_total", **upscale) == 0
    # The Lua side: three reserve scripts ran (the replay and the refusal included; the
    # malformed call never reached Redis), each timed; no Redis error.
    ran = delta(
        before, after, "tally_redis_script_duration_seconds_count", script="reserve"
    )
    assert ran == 3
    for kind in ("unavailable", "deadline", "other"):
        assert delta(before, after, "tally_redis_errors_total", kind=kind) == 0
    for secret in (account_id, *reservation_ids, "customer_ref", RESERVE_KEY, CHARGE_KEY,
                   REFUND_KEY):
        assert secret not in after.text, f"{secret!r} appears in the exposition"


async def test_overage_units_are_counted_by_operation(observed: Observed) -> None:
    """Proves overage taken by Commit and by Charge is counted in
    tally_overage_units_total under the operation, and is part of the units charged."""
    before = await scrape(observed)
    reported = await drive_overage(observed.running, unique())
    after = await scrape(observed)
    upscale, sdxl = {"operation": "image.upscale"}, {"operation": "image.generate.sdxl"}
    assert reported == 10
    assert delta(before, after, "tally_overage_units_total", **upscale) == 5
    assert delta(before, after, "tally_overage_units_total", **sdxl) == 5
    assert delta(before, after, "tally_units_charged_total", **upscale) == 10
    assert delta(before, after, "tally_units_charged_total", **sdxl) == 15


async def wait_for(
    observed: Observed, within_s: float, condition: str, **expected: float
) -> Scrape:
    """Scrapes until every named sample (no labels) has the expected value."""
    deadline = time.monotonic() + within_s
    while True:
        current = await scrape(observed)
        if all(current.value(name) == value for name, value in expected.items()):
            return current
        if time.monotonic() > deadline:
            seen = {name: current.value(name) for name in expected}
            raise AssertionError(f"{condition}: expected {expected}, saw {seen}")
        await asyncio.sleep(0.05)


async def test_reaper_reports_open_and_expired_holds(observed: Observed) -> None:
    """Proves the reaper refreshes tally_open_holds with the holds open in the store and
    counts in tally_holds_expired_total the holds it releases once the clock passes
    their expiry."""
    running = observed.running
    account_id = unique()
    await create_account(running, account_id, monthly_allotment=1000)
    before = await wait_for(observed, 2.0, "no hold yet", tally_open_holds=0)
    stubs = aio(running)
    for key in ("h1", "h2"):
        await stubs.quota.Reserve(reserve(account_id, key, ttl=Duration(seconds=1)))
    await stubs.quota.Reserve(reserve(account_id, "long", ttl=Duration(seconds=600)))
    await wait_for(observed, 2.0, "three holds open", tally_open_holds=3)
    running.clock.advance(1_001)
    after = await wait_for(
        observed, 2.0, "two holds expired", tally_open_holds=1,
        tally_holds_expired_total=before.value("tally_holds_expired_total") + 2,
    )
    assert account_id not in after.text


async def test_redis_outage_is_counted_as_unavailable(
    observed: Observed, own_redis: RedisProcess
) -> None:
    """Proves a script call that finds Redis dead counts one
    tally_redis_errors_total{kind="unavailable"} and the RPC is counted UNAVAILABLE."""
    account_id = unique()
    await create_account(observed.running, account_id, monthly_allotment=1000)
    before = await scrape(observed)
    own_redis.kill()
    try:
        error = await rpc_error(aio(observed.running).quota.Reserve(reserve(account_id, "x")))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        after = await scrape(observed)
    finally:
        own_redis.start()
    assert delta(before, after, "tally_redis_errors_total", kind="unavailable") == 1
    assert delta(before, after, "tally_redis_errors_total", kind="other") == 0
    assert delta(
        before, after, "tally_rpc_requests_total", method="QuotaService/Reserve",
        code="UNAVAILABLE",
    ) == 1


async def test_other_services_and_streams_are_counted_by_short_method_name(
    observed: Observed,
) -> None:
    """Proves calls outside QuotaService are counted under their short method name
    (Health/Check), and a server stream the client cancels is counted CANCELLED when it
    ends, without a latency sample."""
    health: Any = health_pb2_grpc.HealthStub(observed.running.stubs.channel)
    before = await scrape(observed)
    await health.Check(health_pb2.HealthCheckRequest(service=""))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    deadline = time.monotonic() + 2.0
    while True:
        after = await scrape(observed)
        cancelled = delta(
            before, after, "tally_rpc_requests_total", method="Health/Watch", code="CANCELLED"
        )
        if cancelled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert cancelled == 1
    assert delta(
        before, after, "tally_rpc_requests_total", method="Health/Check", code="OK"
    ) == 1
    assert delta(before, after, "tally_rpc_duration_seconds_count", method="Health/Check") == 1
    assert after.value("tally_rpc_duration_seconds_count", method="Health/Watch") == 0


METRIC_NAME = re.compile(r"\btally_[a-z0-9_]+\b")
QUERY_KEYS = ("expr", "definition", "query")  # "query" is also the datasource type


def dashboard_queries(dashboard: dict[str, object]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in QUERY_KEYS and isinstance(value, str) and "(" in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return found


async def test_dashboard_queries_only_metrics_the_server_exposes(observed: Observed) -> None:
    """Proves the Grafana dashboard is valid JSON with a ${DS_PROMETHEUS} datasource input
    and that every metric its PromQL names is in the exposition after traffic."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    queries = dashboard_queries(dashboard)
    assert all(METRIC_NAME.search(q) for q in queries), "a query names no tally metric"

    account_id = unique()
    await create_account(observed.running, account_id, monthly_allotment=1000)
    await drive_mix(observed.running, account_id)
    await drive_overage(observed.running, unique())
    exposed = (await scrape(observed)).names()
    referenced = {name for q in queries for name in METRIC_NAME.findall(q)}
    missing = referenced - exposed
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"
    panel_text = json.dumps(dashboard)
    for metric in (
        "tally_rpc_requests_total", "tally_rpc_duration_seconds_bucket",
        "tally_units_charged_total", "tally_units_refunded_total",
        "tally_units_reserved_total", "tally_overage_units_total", "tally_open_holds",
        "tally_holds_expired_total", "tally_flusher_events_waiting",
        "tally_flusher_oldest_unflushed_seconds",
        "tally_redis_script_duration_seconds_bucket", "tally_redis_errors_total",
    ):
        assert metric in panel_text, f"no panel shows {metric}"
