"""Making, listing and revoking tokens: the ledger first (the durable copy),
then Redis (what every server reads). Used by `tally tokens` and TokenService, and
at start for the bootstrap token file. Each record says who made and who revoked it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tally.auth.principal import Role
from tally.auth.tokens import (
    NAME_CHARS_MAX,
    NewToken,
    TokenRecord,
    matches,
    new_token,
    secret_sha256,
    split_token,
)
from tally.clock import Clock
from tally.domain.errors import InvalidArgument, NotFound
from tally.domain.ids import ACCOUNT_ID
from tally.ledger.ledger import Ledger
from tally.store.token_store import TokenStore

ACCOUNTS_PER_TOKEN_MAX = 100
BOOTSTRAP_NAME = "bootstrap"
BOOTSTRAP_CREATOR = "bootstrap-token-file"


class TokenBook:
    def __init__(self, ledger: Ledger, store: TokenStore, clock: Clock) -> None:
        self.ledger = ledger
        self.store = store
        self.clock = clock

    async def create(
        self, role: Role, accounts: tuple[str, ...], name: str, expires_in_ms: int, by: str
    ) -> NewToken:
        """expires_in_ms: 0 for a token that never expires; by: who asks (created_by)."""
        if len(accounts) > ACCOUNTS_PER_TOKEN_MAX:
            raise InvalidArgument(
                f"a token names at most {ACCOUNTS_PER_TOKEN_MAX} accounts", field_name="accounts"
            )
        for account_id in accounts:
            if not ACCOUNT_ID.fullmatch(account_id):
                raise InvalidArgument(
                    f"account {account_id[:80]!r} is not a valid account id",
                    field_name="accounts",
                )
        if len(name) > NAME_CHARS_MAX:
            raise InvalidArgument(
                f"name is longer than {NAME_CHARS_MAX} characters", field_name="name"
            )
        if expires_in_ms < 0:
            raise InvalidArgument("expires_in must not be negative", field_name="expires_in")
        now_ms = self.clock.now_ms()
        expires_at = now_ms + expires_in_ms if expires_in_ms else 0
        token = new_token(role, accounts, name, now_ms, expires_at, by)
        await self.ledger.put_token(token.record)
        await self.store.put(token.record)
        return token

    async def list(self) -> list[TokenRecord]:
        return await self.ledger.tokens()

    async def revoke(self, token_id: str, by: str) -> TokenRecord:
        record = await self.ledger.revoke_token(token_id, by)
        if record is None:
            raise NotFound(f"token {token_id[:80]!r} not found", field_name="token_id")
        await self.store.put(record)
        return record

    async def bootstrap(self, path: Path) -> TokenRecord:
        """Registers the token written in the file at `path` (Tally's format) as an
        unscoped admin token, once: at a restart the record held stays as it is,
        revoked or not. RuntimeError (never quoting the file) when it holds no
        token, or its id is held by a token with another secret."""
        try:
            parts = split_token(await asyncio.to_thread(path.read_text))
        except (OSError, UnicodeDecodeError) as exc:
            raise RuntimeError(f"cannot read the bootstrap token file {path}: {exc}") from exc
        if parts is None:
            raise RuntimeError(
                f"the bootstrap token file {path} does not hold a Tally token "
                "(tly_tok_<16 hex digits>_<43 URL-safe base64 characters>)"
            )
        token_id, secret = parts
        record = TokenRecord(
            token_id=token_id, secret_sha256=secret_sha256(secret), role=Role.ADMIN,
            accounts=(), name=BOOTSTRAP_NAME, created_at=self.clock.now_ms(), expires_at=0,
            revoked_at=0, created_by=BOOTSTRAP_CREATOR,
        )
        held = await self.ledger.put_token(record)
        if not matches(held, secret):
            raise RuntimeError(
                f"the bootstrap token's id {token_id} belongs to another token; "
                "write a new token to the file"
            )
        await self.store.put(held)
        return held

    async def restore(self) -> int:
        """Puts the ledger's records back into Redis where Redis lost them or
        missed a revocation; returns how many it wrote."""
        in_redis = {record.token_id: record for record in await self.store.all()}
        written = 0
        for record in await self.ledger.tokens():
            held = in_redis.get(record.token_id)
            if held is None or (record.revoked_at and not held.revoked_at):
                await self.store.put(record)
                written += 1
        return written
