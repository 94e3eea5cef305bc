"""The auth interceptor: every call but health checks and reflection shows a
bearer token (or, under mutual TLS, a client certificate mapped in
--tls-principals, which is asked first) before any work; the call then runs as
its principal
(auth/principal.py `running_as`), if the role table lets that role call the
method (auth/roles.py). Account scopes are checked where the account is known
(the servicers, reports and watches).

A refused call ends UNAUTHENTICATED or PERMISSION_DENIED, counted in
tally_auth_refused_total by reason, before anything is read or written.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tally.api.errors import STATUS_BY_CODE
from tally.api.interceptors import Context, Handler, WrappingInterceptor
from tally.auth.authenticator import Authenticator
from tally.auth.certificates import CertificatePrincipals
from tally.auth.principal import Principal, running_as
from tally.auth.roles import authorize, needs_token
from tally.auth.scope import count_refusal
from tally.domain.errors import TallyError

AUTHORIZATION = "authorization"


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class AuthInterceptor(WrappingInterceptor):
    def __init__(
        self, authenticator: Authenticator, certificates: CertificatePrincipals | None = None
    ) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.certificates = certificates

    async def _principal(self, full_method: str, context: Context) -> Principal:
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

    def wrap(self, full_method: str, handler: Handler) -> Handler:
        if not needs_token(full_method):
            return handler
        if not handler.response_streaming and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(full_method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(full_method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary_unary(
        self, full_method: str, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def handle(request: Any, context: Context) -> Any:
            principal = await self._principal(full_method, context)
            with running_as(principal):
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                return response

        return handle

    def _unary_stream(
        self, full_method: str, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            principal = await self._principal(full_method, context)
            with running_as(principal):
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()

        return handle
