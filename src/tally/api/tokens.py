"""TokenService: `tally tokens` over gRPC, for unscoped admins (auth/roles.py)."""

from __future__ import annotations

from typing import Any

import grpc

from tally.api import convert
from tally.api.errors import map_errors
from tally.auth.book import TokenBook
from tally.auth.principal import Role, current
from tally.auth.tokens import TokenRecord
from tally.domain.errors import InvalidArgument
from tally_client.v1 import token_pb2, token_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def token_info(record: TokenRecord) -> token_pb2.TokenInfo:
    info = token_pb2.TokenInfo(
        token_id=record.token_id, role=record.role.value, accounts=record.accounts,
        name=record.name, created_at=convert.timestamp(record.created_at),
        created_by=record.created_by, revoked_by=record.revoked_by,
    )
    if record.expires_at:
        info.expires_at.CopyFrom(convert.timestamp(record.expires_at))
    if record.revoked_at:
        info.revoked_at.CopyFrom(convert.timestamp(record.revoked_at))
    return info


class TokenServicer(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, book: TokenBook) -> None:
        self.book = book

    @map_errors
    async def CreateToken(
        self, request: token_pb2.CreateTokenRequest, context: Context
    ) -> token_pb2.CreateTokenResponse:
        if request.role not in {role.value for role in Role}:
            raise InvalidArgument("role must be worker, reader or admin", field_name="role")
        expires_in_ms = request.expires_in.ToMilliseconds() if request.HasField("expires_in") else 0
        token = await self.book.create(
            Role(request.role), tuple(request.accounts), request.name, expires_in_ms,
            by=current().principal_id,
        )
        return token_pb2.CreateTokenResponse(token=token.text, info=token_info(token.record))

    @map_errors
    async def ListTokens(
        self, request: token_pb2.ListTokensRequest, context: Context
    ) -> token_pb2.ListTokensResponse:
        return token_pb2.ListTokensResponse(
            tokens=[token_info(record) for record in await self.book.list()]
        )

    @map_errors
    async def RevokeToken(
        self, request: token_pb2.RevokeTokenRequest, context: Context
    ) -> token_pb2.RevokeTokenResponse:
        record = await self.book.revoke(request.token_id, by=current().principal_id)
        return token_pb2.RevokeTokenResponse(info=token_info(record))
