"""TLS and mutual TLS against the real server: plaintext and strangers get in nowhere."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tally.api.transport import certificate_principals, server_transport
from tally.auth.book import TokenBook
from tally.auth.certificates import AuthContext, CertificatePrincipals
from tally.auth.principal import Principal, Role
from tally.store.token_store import TokenStore
from tally_client import RetryPolicy, SyncTallyClient, TallyClient, TallyRpcError
from tally_client.tls import ClientTls
from tally_client.v1 import account_pb2, account_pb2_grpc
from tests.support import RedisProcess, Running, settings, start_running, stop_running, unique
from tests.tls_support import CertificateAuthority, Issued


@dataclass
class Pki:
    ca: CertificateAuthority
    server: Issued
    worker: Issued
    stranger: Issued  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"))
    other = CertificateAuthority(tmp_path_factory.mktemp("other-ca"), "another CA")
    return Pki(
        ca, ca.issue("server", server=True), ca.issue("worker-1", server=False),
        other.issue("worker-1", server=False),
    )


@pytest_asyncio.fixture
async def tls_running(redis_server: RedisProcess, pki: Pki) -> AsyncIterator[Running]:
    running = await start_running(
        redis_server.url, tls_cert=pki.server.cert, tls_key=pki.server.key
    )
    yield running
    await stop_running(running)


@pytest_asyncio.fixture
async def mtls_running(redis_server: RedisProcess, pki: Pki) -> AsyncIterator[Running]:
    running = await start_running(
        redis_server.url, tls_cert=pki.server.cert, tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
    )
    yield running
    await stop_running(running)


def tls_of(pki: Pki, client: Issued | None = None) -> ClientTls:
    if client is None:
        return ClientTls(ca=str(pki.ca.cert))
    return ClientTls(ca=str(pki.ca.cert), cert=str(client.cert), key=str(client.key))


async def make_funded_account(address: str, tls: ClientTls) -> str:
    account_id = unique("tls")
    async with grpc.aio.secure_channel(address, tls.credentials()) as channel:
        await account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
        )
    return account_id


async def ledger_rows(running: Running, account_id: str) -> int:
    await running.authority.flusher.flush_all()
    entries = await running.authority.ledger.entries(account_id)
    return len(entries)


async def refused_purchase(address: str, account_id: str, tls: ClientTls | None) -> TallyRpcError:
    once = RetryPolicy(max_attempts=1)
    async with TallyClient(address, timeout_s=2.0, retry=once, tls=tls) as tally:
        with pytest.raises(TallyRpcError) as refused:
            await tally.purchase(account_id, 50)
    return refused.value


async def test_tls_serves_and_plaintext_is_refused(tls_running: Running, pki: Pki) -> None:
    """A TLS client is served; a plaintext purchase fails UNAVAILABLE and moves nothing."""
    address = tls_running.authority.address
    account_id = await make_funded_account(address, tls_of(pki))
    rows_before = await ledger_rows(tls_running, account_id)

    refused = await refused_purchase(address, account_id, None)

    assert refused.code == grpc.StatusCode.UNAVAILABLE
    async with TallyClient(address, timeout_s=5.0, tls=tls_of(pki)) as tally:
        assert (await tally.balance(account_id)).available == 100
        await tally.purchase(account_id, 7)
        assert (await tally.balance(account_id)).available == 107
    assert await ledger_rows(tls_running, account_id) == rows_before + 1


async def test_mutual_tls_refuses_missing_and_foreign_certificates(
    mtls_running: Running, pki: Pki
) -> None:
    """Under mutual TLS no certificate, or one from another CA, gets no call through;
    the CA's own client certificate does."""
    address = mtls_running.authority.address
    account_id = await make_funded_account(address, tls_of(pki, pki.worker))
    rows_before = await ledger_rows(mtls_running, account_id)

    for tls in (tls_of(pki), tls_of(pki, pki.stranger)):
        refused = await refused_purchase(address, account_id, tls)
        assert refused.code == grpc.StatusCode.UNAVAILABLE

    async with TallyClient(address, timeout_s=5.0, tls=tls_of(pki, pki.worker)) as tally:
        assert (await tally.balance(account_id)).available == 100
    assert await ledger_rows(mtls_running, account_id) == rows_before


async def test_the_synchronous_client_speaks_mutual_tls(mtls_running: Running, pki: Pki) -> None:
    """SyncTallyClient with the CA's client certificate is served; without one it is
    refused. (Run in a thread: the server under test shares this event loop.)"""
    address = mtls_running.authority.address
    account_id = await make_funded_account(address, tls_of(pki, pki.worker))

    def spend(tls: ClientTls) -> int:
        with SyncTallyClient(address, timeout_s=5.0, retry=RetryPolicy(max_attempts=1),
                             tls=tls) as tally:
            with tally.hold(account_id, "image.upscale", 1):
                pass
            return tally.balance(account_id).available

    assert await asyncio.to_thread(spend, tls_of(pki, pki.worker)) == 90
    with pytest.raises(TallyRpcError) as refused:
        await asyncio.to_thread(spend, tls_of(pki))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


class PrincipalEcho(health.aio.HealthServicer):
    """Test-only: records whom each call's certificate stands for, as the auth
    interceptor will ask it."""

    def __init__(self, principals: CertificatePrincipals) -> None:
        super().__init__()
        self.principals = principals
        self.seen: list[Principal | None] = []

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        auth_context: AuthContext = context.auth_context()
        self.seen.append(self.principals.principal_from_peer(auth_context))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_a_mapped_certificate_identity_becomes_the_principal(
    pki: Pki, tmp_path: Path
) -> None:
    """The server's own mutual-TLS transport and the --tls-principals file: a mapped CN
    stands for its role and accounts; an unmapped one for nobody."""
    mapping = tmp_path / "principals.json"
    mapping.write_text(json.dumps({"worker-1": {"role": "worker", "accounts": ["acct-a"]}}))
    configured = settings(
        "redis://unused", tls_cert=pki.server.cert, tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert, tls_principals=mapping,
    )
    principals = certificate_principals(configured)
    assert principals is not None
    transport = server_transport(configured)
    assert transport.credentials is not None
    echo = PrincipalEcho(principals)
    server = grpc.aio.server(options=transport.options)
    health_pb2_grpc.add_HealthServicer_to_server(echo, server)
    port = server.add_secure_port("127.0.0.1:0", transport.credentials)
    await server.start()
    unmapped = pki.ca.issue("nobody", server=False)
    try:
        for client in (pki.worker, unmapped):
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", tls_of(pki, client).credentials()
            ) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop(None)
    assert echo.seen == [Principal("cert:worker-1", Role.WORKER, frozenset({"acct-a"})), None]


def test_a_malformed_principals_file_is_refused_naming_the_entry(tmp_path: Path) -> None:
    """A role that does not exist stops the start, naming the identity."""
    mapping = tmp_path / "principals.json"
    mapping.write_text(json.dumps({"worker-1": {"role": "root"}}))
    with pytest.raises(ValueError, match="'worker-1' has no valid role"):
        CertificatePrincipals.load(mapping)


async def test_cli_commands_speak_tls(tls_running: Running, pki: Pki) -> None:
    """`tally health` reaches a TLS server with --tls-ca, and fails without it."""
    address = tls_running.authority.address

    async def health_exit(*flags: str) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tally.cli.main", "health", "--target", address, *flags,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        return await process.wait()

    assert await health_exit("--tls-ca", str(pki.ca.cert)) == 0
    assert await health_exit() == 1


async def test_a_mapped_client_certificate_is_the_principal_of_every_call(
    redis_server: RedisProcess, pki: Pki, tmp_path: Path
) -> None:
    """Proves that with --auth required and mutual TLS, a client certificate mapped in
    --tls-principals stands for its principal through the real auth interceptor, with no
    token: a worker scoped to account A reserves on A, is PERMISSION_DENIED on account B
    and on admin RPCs, and nothing moves on B."""
    admin_tls = tls_of(pki, pki.ca.issue("ops-1", server=False))  # unmapped: a token is needed
    scoped_account, other_account = unique("mine"), unique("other")
    mapping = tmp_path / "principals.json"
    mapping.write_text(json.dumps({"worker-1": {"role": "worker", "accounts": [scoped_account]}}))
    running = await start_running(
        redis_server.url, tls_cert=pki.server.cert, tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert, tls_principals=str(mapping), auth="required",
    )
    try:
        address = running.authority.address
        store = running.authority.store
        admin = await TokenBook(running.authority.ledger, TokenStore(store.redis), store.clock
                                ).create(Role.ADMIN, (), "test admin", 0, by="test")
        bearer = [("authorization", f"Bearer {admin.text}")]
        async with grpc.aio.secure_channel(address, admin_tls.credentials()) as channel:
            for account_id in (scoped_account, other_account):
                await account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
                    account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100),
                    metadata=bearer,
                )
        async with TallyClient(
            address, timeout_s=5.0, retry=RetryPolicy(max_attempts=1), tls=tls_of(pki, pki.worker)
        ) as worker:
            held = await worker.reserve(scoped_account, "image.upscale", 1)
            assert held.units == 10
            for refused_call in (
                worker.reserve(other_account, "image.upscale", 1),
                worker.purchase(scoped_account, 5),
            ):
                with pytest.raises(TallyRpcError) as refused:
                    await refused_call
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        once = RetryPolicy(max_attempts=1)
        async with TallyClient(address, timeout_s=5.0, retry=once, tls=admin_tls) as anon:
            with pytest.raises(TallyRpcError) as refused:
                await anon.balance(other_account)
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert await ledger_rows(running, other_account) == 2  # plan_change, allotment
    finally:
        await stop_running(running)
