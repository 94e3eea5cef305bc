"""The token records in Redis: one hash (keys.TOKENS_KEY), token id -> record.

Every server reads them here; the ledger holds the durable copy (auth/book.py
writes both, and puts the ledger's back when Redis lost them)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

from tally.auth.tokens import TokenRecord
from tally.domain.errors import Unavailable
from tally.store.keys import TOKENS_KEY


class TokenStore:
    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def get(self, token_id: str) -> TokenRecord | None:
        try:
            stored = await self.redis.hget(TOKENS_KEY, token_id)
        except RedisError as exc:
            raise Unavailable("the token store is unreachable; retry") from exc
        return None if stored is None else TokenRecord.decode(stored)

    async def put(self, record: TokenRecord) -> None:
        await self.redis.hset(TOKENS_KEY, record.token_id, record.encode())

    async def all(self) -> list[TokenRecord]:
        stored = await self.redis.hgetall(TOKENS_KEY)
        return [TokenRecord.decode(value) for value in stored.values()]
