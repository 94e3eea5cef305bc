"""The role table: which roles may call each method (admin may call every one).

A method missing from the table is admin-only. Global methods (prices, tokens)
act on no account, so only an unscoped admin may call them; a scoped admin
manages its own accounts (create, update, purchases, budgets) and no other."""

from __future__ import annotations

from tally.auth.principal import Principal, Role
from tally.domain.errors import PermissionDenied

_QUOTA = "/tally.v1.QuotaService/"
_ACCOUNT = "/tally.v1.AccountService/"
_CATALOG = "/tally.v1.CatalogService/"
_USAGE = "/tally.v1.UsageService/"
_TOKEN = "/tally.v1.TokenService/"

_WORKER = frozenset({Role.WORKER, Role.ADMIN})
_READER = frozenset({Role.READER, Role.ADMIN})
_WORKER_OR_READER = frozenset({Role.WORKER, Role.READER, Role.ADMIN})

ROLES_BY_METHOD: dict[str, frozenset[Role]] = {
    **{_QUOTA + m: _WORKER for m in (
        "Reserve", "Charge", "Commit", "Refund", "Extend", "Quote",
        "ReserveBatch", "CommitBatch", "RefundBatch",
    )},
    _QUOTA + "GetBalance": _WORKER_OR_READER,
    _ACCOUNT + "GetAccount": _READER,
    _ACCOUNT + "ListLedgerEntries": _READER,
    _CATALOG + "ListPrices": _READER,
    _USAGE + "GetUsageReport": _READER,
    _USAGE + "WatchUsage": _READER,
}
ADMIN_ONLY = frozenset({Role.ADMIN})
UNSCOPED_ONLY = frozenset(
    {_CATALOG + "SetPrice", _TOKEN + "CreateToken", _TOKEN + "ListTokens", _TOKEN + "RevokeToken"}
)
# Calls that need no token: health checks and reflection.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def needs_token(full_method: str) -> bool:
    return not full_method.startswith(OPEN_SERVICES)


def authorize(principal: Principal, full_method: str) -> None:
    """PermissionDenied when the principal's role may not call the method."""
    if principal.role not in ROLES_BY_METHOD.get(full_method, ADMIN_ONLY):
        raise PermissionDenied("this principal's role may not call this method", reason="role")
    if principal.scoped and full_method in UNSCOPED_ONLY:
        raise PermissionDenied(
            "this method needs a principal of every account", reason="account_scope"
        )


def may_call(principal: Principal, full_method: str) -> bool:
    """Whether authorize() lets the principal call the method."""
    return principal.role in ROLES_BY_METHOD.get(full_method, ADMIN_ONLY) and not (
        principal.scoped and full_method in UNSCOPED_ONLY
    )
