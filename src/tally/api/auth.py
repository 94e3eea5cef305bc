"""Call authentication: every call but health checks and reflection shows a
bearer token (or, under mutual TLS, a client certificate mapped in
--tls-principals, which is asked first) before any work; the call then runs as
its principal (auth/principal.py; api/pipeline.py applies this to each call), if
the role table lets that role call the method (auth/roles.py). Account scopes are
checked where the account is known (the servicers, reports and watches).

A refused call ends UNAUTHENTICATED or PERMISSION_DENIED, counted in
tally_auth_refused_total by reason, before anything is read or written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from tally.api.errors import STATUS_BY_CODE
from tally.api.rpc_metrics import Context
from tally.auth.authenticator import Authenticator
from tally.auth.certificates import CertificatePrincipals
from tally.auth.principal import Principal, running_as
from tally.auth.roles import authorize, may_call
from tally.auth.scope import count_refusal
from tally.domain.errors import TallyError

AUTHORIZATION = "authorization"


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class CallAuth:
    """Who a call is, from its credentials: refused calls are aborted and counted."""

    def __init__(
        self, authenticator: Authenticator, certificates: CertificatePrincipals | None = None
    ) -> None:
        self.authenticator = authenticator
        self.certificates = certificates

    def known(self, full_method: str, context: Context) -> Principal | None:
        """The call's principal when its bearer token was verified moments ago and
        its role may call the method; None: ask principal() (it aborts the call)."""
        if self.certificates is not None:
            return None
        principal = self.authenticator.verified(_authorization(context))
        if principal is None or not may_call(principal, full_method):
            return None
        return principal

    async def principal(self, full_method: str, context: Context) -> Principal:
        """The call's principal, or the call aborted."""
        try:
            principal = (
                self.certificates.principal_from_peer(context.auth_context())
                if self.certificates is not None
                else None
            )
            if principal is None:
                principal = await self.authenticator.principal(_authorization(context))
            authorize(principal, full_method)
            return principal
        except TallyError as error:
            count_refusal(error)
            await context.abort(STATUS_BY_CODE[error.code], error.message)
            raise  # abort raised already; this only tells mypy

    def unary_stream(
        self, full_method: str, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            principal = await self.principal(full_method, context)
            with running_as(principal):
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()

        return handle
