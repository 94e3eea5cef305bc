"""Bearer tokens: their text, their stored record, and how a secret is checked.

A token reads `tly_<token_id>_<secret>`: the id (`tok_` and 16 hex digits) finds
the record; the secret (32 random bytes, URL-safe base64) proves the caller holds
the token. Only the secret's SHA-256 is stored: with 256 bits of entropy nobody
can search for a preimage, so a slow password hash (bcrypt, argon2) would only
slow every lookup down. The token's text is shown once, when it is made, and
never logged; a record never holds it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass

from tally.auth.principal import Principal, Role
from tally.domain.errors import Unauthenticated

TOKEN_PREFIX = "tly_"
SECRET_BYTES = 32
TOKEN_ID_HEX_DIGITS = 16
TOKEN_ID = re.compile(rf"tok_[0-9a-f]{{{TOKEN_ID_HEX_DIGITS}}}")
TOKEN = re.compile(rf"{TOKEN_PREFIX}({TOKEN_ID.pattern})_([A-Za-z0-9_-]{{43}})")
NAME_CHARS_MAX = 200


@dataclass(frozen=True)
class TokenRecord:
    """What is kept of a token (times in ms since the epoch; 0: never)."""

    token_id: str
    secret_sha256: str  # hex
    role: Role
    accounts: tuple[str, ...]  # empty: every account
    name: str
    created_at: int
    expires_at: int
    revoked_at: int
    # who made and who revoked it (a principal id, or the operator for `tally tokens`);
    # defaults for the records Redis held before these were kept
    created_by: str = ""
    revoked_by: str = ""

    def principal(self) -> Principal:
        return Principal(self.token_id, self.role, frozenset(self.accounts))

    def live_at(self, now_ms: int) -> bool:
        return not self.revoked_at and (not self.expires_at or now_ms < self.expires_at)

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> TokenRecord:
        fields = json.loads(text)
        fields["role"] = Role(fields["role"])
        fields["accounts"] = tuple(fields["accounts"])
        return cls(**fields)


@dataclass(frozen=True)
class NewToken:
    """A token just made: `text` is shown once and kept nowhere."""

    text: str
    record: TokenRecord


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(
    role: Role, accounts: tuple[str, ...], name: str, now_ms: int, expires_at: int,
    created_by: str,
) -> NewToken:
    token_id = "tok_" + secrets.token_hex(TOKEN_ID_HEX_DIGITS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = TokenRecord(
        token_id=token_id,
        secret_sha256=secret_sha256(secret),
        role=role,
        accounts=tuple(sorted(set(accounts))),
        name=name,
        created_at=now_ms,
        expires_at=expires_at,
        revoked_at=0,
        created_by=created_by,
    )
    return NewToken(f"{TOKEN_PREFIX}{token_id}_{secret}", record)


def parse_bearer(header: str | None) -> tuple[str, str]:
    """(token_id, secret) from an `authorization` value, or Unauthenticated."""
    if header is None:
        raise Unauthenticated("a bearer token is required", reason="missing")
    scheme, _, text = header.strip().partition(" ")
    parts = split_token(text) if scheme.lower() == "bearer" else None
    if parts is None:
        raise Unauthenticated("the bearer token is malformed", reason="malformed")
    return parts


def split_token(text: str) -> tuple[str, str] | None:
    """(token_id, secret) of a token's text, None when it is not one."""
    match = TOKEN.fullmatch(text.strip())
    return None if match is None else (match.group(1), match.group(2))


def matches(record: TokenRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_sha256, secret_sha256(secret))
