"""From an `authorization` value to a Principal, with a short-lived cache.

Each server keeps what it looked up for `cache_ttl_s` (--token-cache-ttl), unknown
tokens included, so a revocation (or a new token) reaches every server within
that time without a restart, and a flood of calls costs one Redis read per token
per period: the calls that miss the cache together share the one read in flight
for their token (a cache period ending under load would otherwise send every
call in flight to Redis at once). Expiry is checked on every call against the
clock."""

from __future__ import annotations

import asyncio

from tally.auth.principal import Principal
from tally.auth.tokens import TokenRecord, matches, parse_bearer
from tally.clock import Clock
from tally.domain.errors import Unauthenticated
from tally.store.token_store import TokenStore

CACHE_ENTRIES_MAX = 10_000  # token ids remembered at once; more empty the cache


class Authenticator:
    def __init__(self, store: TokenStore, clock: Clock, cache_ttl_s: float) -> None:
        self.store = store
        self.clock = clock
        self.cache_ttl_ms = round(cache_ttl_s * 1000)
        self._cache: dict[str, tuple[int, TokenRecord | None]] = {}  # id -> (until, record)
        # authorization value -> (until, record, principal): values that matched their
        # record, so that a caller's next calls skip parsing and hashing the token.
        self._verified: dict[str, tuple[int, TokenRecord, Principal]] = {}
        # token id -> the Redis read in flight for it (as many as calls in flight, at most)
        self._reading: dict[str, asyncio.Future[TokenRecord | None]] = {}

    def verified(self, authorization: str | None) -> Principal | None:
        """The principal of an authorization value that matched its record within
        the cache period and is still live now; None: ask principal()."""
        entry = self._verified.get(authorization) if authorization is not None else None
        if entry is None:
            return None
        until, record, principal = entry
        now_ms = self.clock.now_ms()
        if now_ms >= until or not record.live_at(now_ms):
            return None
        return principal

    async def principal(self, authorization: str | None) -> Principal:
        """The principal a bearer token stands for; Unauthenticated (reason missing,
        malformed, unknown, expired or revoked) otherwise. The message never says
        which of unknown, expired or revoked it was."""
        token_id, secret = parse_bearer(authorization)
        now_ms = self.clock.now_ms()
        record = await self._record(token_id, now_ms)
        if record is None or not matches(record, secret):
            raise Unauthenticated("the bearer token is not valid", reason="unknown")
        if record.revoked_at:
            raise Unauthenticated("the bearer token is not valid", reason="revoked")
        if not record.live_at(now_ms):
            raise Unauthenticated("the bearer token is not valid", reason="expired")
        principal = record.principal()
        if authorization is not None:
            if len(self._verified) >= CACHE_ENTRIES_MAX:
                self._verified.clear()
            self._verified[authorization] = (self._cache[token_id][0], record, principal)
        return principal

    async def _record(self, token_id: str, now_ms: int) -> TokenRecord | None:
        cached = self._cache.get(token_id)
        if cached is not None and now_ms < cached[0]:
            return cached[1]
        reading = self._reading.get(token_id)
        if reading is None:
            reading = asyncio.ensure_future(self.store.get(token_id))
            self._reading[token_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(token_id, None))
        # shielded: a caller that gives up (its deadline) does not cancel the others' read
        record = await asyncio.shield(reading)
        if len(self._cache) >= CACHE_ENTRIES_MAX:
            self._cache.clear()
        self._cache[token_id] = (now_ms + self.cache_ttl_ms, record)
        return record
