"""Account scope checks for the call being served, and the count of refusals.

Servicers, reports and watches call `require_account` with the account a
request names (or that its reservation id holds) before reading or writing
anything, so a scoped principal learns nothing of other accounts, not even
whether they exist."""

from __future__ import annotations

from prometheus_client import Counter

from tally import metrics
from tally.auth.principal import current
from tally.domain.errors import PermissionDenied, TallyError, Unauthenticated

AUTH_REFUSED = Counter(
    "tally_auth_refused_total",
    "Calls refused by authentication, the role table or an account scope, by reason "
    "(missing, malformed, unknown, expired, revoked, role, account_scope)",
    ["reason"],
    registry=metrics.REGISTRY,
)


def count_refusal(error: TallyError) -> None:
    if isinstance(error, Unauthenticated | PermissionDenied):
        AUTH_REFUSED.labels(reason=error.reason).inc()


def require_account(account_id: str) -> None:
    """PermissionDenied (counted) when the call's principal may not touch the account."""
    try:
        current().require_account(account_id)
    except PermissionDenied as error:
        count_refusal(error)
        raise


def visible(account_id: str) -> bool:
    """Whether the call's principal may see the account's rows and events."""
    return current().may_touch(account_id)
