"""The principal a call runs as, and the one place its rights are decided.

Authentication (a bearer token, or a client certificate under mutual TLS) turns a
call's credentials into a Principal; the server's auth interceptor sets it for the
call (`running_as`), and everything below asks `current()`. With `--auth off` every
call runs as ANONYMOUS, an admin of every account (loopback only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from enum import StrEnum

from tally.domain.errors import PermissionDenied


class Role(StrEnum):
    WORKER = "worker"  # QuotaService
    READER = "reader"  # balances, accounts, prices, usage, ledger entries
    ADMIN = "admin"  # everything, tokens included


@dataclass(frozen=True)
class Principal:
    """principal_id: a token id (`tok_...`), `cert:<identity>` for a client certificate,
    or `anonymous`. accounts: the accounts it may see and touch (empty: every one)."""

    principal_id: str
    role: Role
    accounts: frozenset[str] = frozenset()

    @property
    def scoped(self) -> bool:
        return bool(self.accounts)

    def may_touch(self, account_id: str) -> bool:
        return not self.accounts or account_id in self.accounts

    def require_account(self, account_id: str) -> None:
        """Refuses an account outside the scope, saying nothing of whether it exists."""
        if not self.may_touch(account_id):
            raise PermissionDenied(
                "this principal may not act on that account", reason="account_scope"
            )


ANONYMOUS = Principal("anonymous", Role.ADMIN)

_CURRENT: ContextVar[Principal] = ContextVar("tally_principal", default=ANONYMOUS)


def current() -> Principal:
    """The principal of the call being served (ANONYMOUS outside a call, or with auth off)."""
    return _CURRENT.get()


def bind_principal(principal: Principal) -> Token[Principal]:
    """Serves what follows as `principal` until unbind_principal(the token returned)."""
    return _CURRENT.set(principal)


def unbind_principal(token: Token[Principal]) -> None:
    _CURRENT.reset(token)


@contextlib.contextmanager
def running_as(principal: Principal) -> Iterator[None]:
    """Serves the enclosed work as `principal` (api/pipeline.py binds it per call)."""
    token = bind_principal(principal)
    try:
        yield
    finally:
        unbind_principal(token)
