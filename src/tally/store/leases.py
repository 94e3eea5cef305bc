"""Leases: which process of a fleet does which piece of background work.

Any number of `tally serve` and `tally flusher` processes may share one Redis and
one ledger. The reaper and the period sweeper work shard by shard; balance
snapshots, ledger pruning and the once-only start-up work are global. Each piece is
leased in Redis (lease_acquire.lua): a lease is a hash {owner, lapses_at}, owned by one
process (`host-pid-random`) until it lapses, renewed every `ttl / 3` by its owner.

- Per-shard jobs: a lease per shard and job, in the shard's hash slot. A process
  takes at most its fair share, ceil(shards / live processes), counted from the
  job's heartbeat registry (lease_heartbeat.lua, at most LEASE_MEMBERS_MAX
  members); beyond its share it gives leases back (a process joined). So the work
  spreads over the fleet, and a stopped process's shards are taken at the next
  renewal of the others, a dead one's within `ttl + ttl / 3`.
- Global jobs: one lease each; whoever takes it first keeps it while alive.

Correctness never depends on a lease. Two processes may both believe they hold one
(a process paused past its lease, clocks apart by more than the ttl, a Redis that
lost the lease): then both do the same work, and that work is idempotent.
expire_hold.lua and close_period.lua re-check the hold's and the account's state
and write nothing for what is no longer due; a snapshot is one more row of history;
pruning deletes only what nothing needs. Leases keep a fleet of N processes from
doing each piece N times; they are not locks that guard money.

The leases' clock is each process's wall clock (SystemClock), never the business
clock tests move: hosts' clocks must agree to well within the ttl (NTP does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tally import metrics
from tally.clock import Clock, SystemClock
from tally.domain.errors import TallyError
from tally.domain.limits import LEASE_MEMBERS_MAX, LEASE_TTL_MS_MAX
from tally.store.client import ScriptRunner, store_errors
from tally.store.contract import (
    CatalogContext,
    LeaseAcquireRequest,
    LeaseHeartbeatRequest,
    LeaseReleaseRequest,
)
from tally.store.keys import KeySpace

log = logging.getLogger("tally.leases")

# The jobs: per-shard ones, global ones, and the start-up work.
REAPER = "reaper"
SWEEPER = "sweeper"
SNAPSHOT = "snapshot"
PRUNE = "prune"
STARTUP = "startup"
_JOB_NAME = re.compile(r"[a-z0-9_]{1,32}")

LEASE_TTL_MIN_S = 0.1
LEASE_TTL_MAX_S = LEASE_TTL_MS_MAX / 1000
# How often a process waiting for the start-up lease asks again.
STARTUP_POLL_S = 0.1
# Each lease call's Redis timeout: a renewal that cannot reach Redis is given up
# well before the lease would lapse.
CALL_TIMEOUT_S = 5.0


def owner_id() -> str:
    """This process's name as a lease owner: host-pid-random (a restarted process
    with the same pid is another owner)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseSettings:
    ttl_s: float
    members_max: int = LEASE_MEMBERS_MAX

    def __post_init__(self) -> None:
        if not LEASE_TTL_MIN_S <= self.ttl_s <= LEASE_TTL_MAX_S:
            raise ValueError(
                f"lease ttl must be between {LEASE_TTL_MIN_S}s and {LEASE_TTL_MAX_S:.0f}s, "
                f"got {self.ttl_s}s"
            )
        if not 1 <= self.members_max <= LEASE_MEMBERS_MAX:
            raise ValueError(f"members_max must be between 1 and {LEASE_MEMBERS_MAX}")

    @property
    def ttl_ms(self) -> int:
        return round(self.ttl_s * 1000)

    @property
    def renew_s(self) -> float:
        """How often leases are renewed: three tries before one lapses."""
        return self.ttl_s / 3


class LeaseCalls:
    """The lease scripts, called for one owner."""

    def __init__(self, runner: ScriptRunner, owner: str, clock: Clock | None = None) -> None:
        self.runner = runner
        self.owner = owner
        self.clock = clock or SystemClock()

    def _context(self) -> CatalogContext:
        return CatalogContext(now=self.clock.now_ms())

    async def acquire(self, key: str, ttl_ms: int) -> tuple[bool, bool]:
        """(held, taken_over): whether this owner holds the lease now, and whether it
        took it from another owner whose lease had lapsed."""
        request = LeaseAcquireRequest(owner=self.owner, ttl_ms=ttl_ms)
        raw = await self.runner.run(
            request.SCRIPT, [key], request.encode(self._context()), CALL_TIMEOUT_S
        )
        reply = request.decode_reply(raw)
        return bool(reply.held), bool(reply.taken_over)

    async def release(self, key: str) -> bool:
        request = LeaseReleaseRequest(owner=self.owner)
        raw = await self.runner.run(
            request.SCRIPT, [key], request.encode(self._context()), CALL_TIMEOUT_S
        )
        return bool(request.decode_reply(raw).released)

    async def heartbeat(self, registry: str, ttl_ms: int, members_max: int) -> int:
        """Processes alive in the registry, this one included (at most members_max)."""
        request = LeaseHeartbeatRequest(owner=self.owner, ttl_ms=ttl_ms, members_max=members_max)
        raw = await self.runner.run(
            request.SCRIPT, [registry], request.encode(self._context()), CALL_TIMEOUT_S
        )
        return max(1, request.decode_reply(raw).live)

    async def leave(self, registry: str) -> None:
        """Drops this owner from a job's registry (one command: atomic alone)."""
        with store_errors():
            await self.runner.redis.zrem(registry, self.owner)


def _check_job(job: str) -> str:
    if not _JOB_NAME.fullmatch(job):
        raise ValueError(f"lease job {job!r} must be 1 to 32 of a-z, 0-9 and _")
    return job


class ShardLeases:
    """The shards of one per-shard job (reaper, sweeper) this process holds."""

    def __init__(
        self, calls: LeaseCalls, keys: KeySpace, job: str, settings: LeaseSettings
    ) -> None:
        self.calls = calls
        self.keys = keys
        self.job = _check_job(job)
        self.settings = settings
        self._held: set[int] = set()
        self._valid_until = 0.0  # monotonic: past it, nothing is known to be held
        # Each owner starts looking at its own shard, so processes starting together
        # reach for different shards first.
        start = int.from_bytes(calls.owner.encode()[-8:], "big") % keys.shards
        self._order = [(start + i) % keys.shards for i in range(keys.shards)]
        self._gauge = metrics.LEASES_HELD.labels(job=job)
        self._takeovers = metrics.LEASE_TAKEOVERS.labels(job=job)

    def shards(self) -> list[int]:
        """The shards whose lease this process held at its last renewal, while that
        renewal is younger than the ttl; otherwise none."""
        if time.monotonic() >= self._valid_until:
            return []
        return sorted(self._held)

    async def refresh(self) -> None:
        """Heartbeats, renews what it holds, gives back what is beyond its fair share
        and takes free shards up to it. At most 2 x shards script calls."""
        started = time.monotonic()
        ttl_ms = self.settings.ttl_ms
        live = await self.calls.heartbeat(
            self.keys.lease_members(self.job), ttl_ms, self.settings.members_max
        )
        share = math.ceil(self.keys.shards / live)
        held = [shard for shard in self._order if shard in self._held]
        kept: list[int] = []
        for shard in held:
            if await self._acquire(shard, ttl_ms):
                kept.append(shard)
        for shard in kept[share:]:
            await self.calls.release(self.keys.shard_lease(shard, self.job))
        kept = kept[:share]
        for shard in self._order:
            if len(kept) >= share:
                break
            if shard not in kept and await self._acquire(shard, ttl_ms):
                kept.append(shard)
        self._held = set(kept)
        self._valid_until = started + self.settings.ttl_s
        self._gauge.set(len(kept))

    async def _acquire(self, shard: int, ttl_ms: int) -> bool:
        held, taken_over = await self.calls.acquire(self.keys.shard_lease(shard, self.job), ttl_ms)
        if taken_over:
            self._takeovers.inc()
            log.info("took over a lapsed lease", extra={"job": self.job, "shard": shard})
        return held

    async def release(self) -> None:
        """Gives every lease back and leaves the registry: the others take the shards
        at their next renewal."""
        held, self._held, self._valid_until = self._held, set(), 0.0
        self._gauge.set(0)
        for shard in sorted(held):
            await self.calls.release(self.keys.shard_lease(shard, self.job))
        await self.calls.leave(self.keys.lease_members(self.job))


class GlobalLease:
    """One global job's lease (snapshot, prune): held by one process at a time."""

    def __init__(self, calls: LeaseCalls, job: str, settings: LeaseSettings) -> None:
        self.calls = calls
        self.job = _check_job(job)
        self.key = KeySpace.lease(job)
        self.settings = settings
        self._valid_until = 0.0
        self._gauge = metrics.LEASES_HELD.labels(job=job)
        self._takeovers = metrics.LEASE_TAKEOVERS.labels(job=job)

    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    async def refresh(self) -> None:
        started = time.monotonic()
        held, taken_over = await self.calls.acquire(self.key, self.settings.ttl_ms)
        if taken_over:
            self._takeovers.inc()
            log.info("took over a lapsed lease", extra={"job": self.job})
        self._valid_until = started + self.settings.ttl_s if held else 0.0
        self._gauge.set(int(held))

    async def release(self) -> None:
        was_held, self._valid_until = self.held(), 0.0
        self._gauge.set(0)
        if was_held:
            await self.calls.release(self.key)


Lease = ShardLeases | GlobalLease


class LeaseKeeper:
    """The background task renewing a process's leases every `ttl / 3`.

    A renewal that fails on the store is logged and tried at the next interval;
    what was held stays usable until its own lease would lapse (ShardLeases.shards,
    GlobalLease.held), never longer."""

    def __init__(self, leases: Sequence[Lease], settings: LeaseSettings) -> None:
        self.leases = tuple(leases)
        self.settings = settings
        self._stopping = asyncio.Event()

    async def refresh(self) -> None:
        for lease in self.leases:
            await lease.refresh()

    async def run(self) -> None:
        """Renews every renew_s until stopped; the first renewal one renew_s after
        start (the caller's refresh() took the leases)."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.renew_s)
            if self._stopping.is_set():
                break
            try:
                await self.refresh()
            except TallyError as error:
                log.warning("lease renewal failed", extra={"error": error.message})

    def stop(self) -> None:
        self._stopping.set()

    async def release(self) -> None:
        """Gives every lease back (at shutdown); a Redis that cannot be reached
        lets them lapse instead."""
        for lease in self.leases:
            try:
                await lease.release()
            except TallyError as error:
                log.warning("lease release failed; it lapses instead",
                            extra={"job": lease.job, "error": error.message})


@contextlib.asynccontextmanager
async def exclusive(
    calls: LeaseCalls, job: str, settings: LeaseSettings, wait_s: float
) -> AsyncIterator[None]:
    """Runs the block while holding a global lease, renewed every `ttl / 3`: the
    once-only start-up work of concurrent starts runs one at a time. Waits at most
    `wait_s` for another holder to finish (or lapse), then raises RuntimeError."""
    key = KeySpace.lease(_check_job(job))
    deadline = time.monotonic() + wait_s
    waited = False
    while not (await calls.acquire(key, settings.ttl_ms))[0]:
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"another process has held the {job} lease for {wait_s:.0f}s; "
                "is it stuck? (it lapses lease_ttl after that process dies)"
            )
        if not waited:
            log.info("waiting for another process's start-up work", extra={"job": job})
            waited = True
        await asyncio.sleep(STARTUP_POLL_S)

    async def renew() -> None:
        while True:
            await asyncio.sleep(settings.renew_s)
            with contextlib.suppress(TallyError):
                await calls.acquire(key, settings.ttl_ms)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        with contextlib.suppress(TallyError):
            await calls.release(key)
