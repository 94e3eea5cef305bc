"""How the server meets the network: TLS or mutual TLS, and the HTTP/2 limits.

Each limit is a named setting (config.py) with a documented default: the
largest request read, the calls open at once per connection, the fastest
keepalive pings tolerated, and how long a connection may live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from tally.auth.certificates import CertificatePrincipals
from tally.config import Settings

# Replies may be larger than requests (a page of ledger entries).
SEND_TO_RECEIVE_RATIO = 4
# Pings faster than keepalive_min_interval tolerated before the connection is closed
# (GOAWAY "too_many_pings").
PING_STRIKES_MAX = 2


@dataclass(frozen=True)
class ServerTransport:
    """credentials None: plaintext (loopback use, or TLS terminated in front)."""

    credentials: grpc.ServerCredentials | None
    options: tuple[tuple[str, int], ...]
    reflection: bool
    # identities client certificates stand for (the auth interceptor asks them first)
    principals: CertificatePrincipals | None = None


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    pair = (_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))
    if not settings.tls_client_ca:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(settings.tls_client_ca, "tls_client_ca"),
        require_client_auth=True,
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def server_options(settings: Settings) -> tuple[tuple[str, int], ...]:
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length",
         SEND_TO_RECEIVE_RATIO * settings.max_receive_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.keepalive_min_interval)),
        ("grpc.http2.max_ping_strikes", PING_STRIKES_MAX),
        # Several workers share the port; one server alone refuses to share it, so a
        # second `tally serve` on the same port fails instead of taking half the calls.
        ("grpc.so_reuseport", int(settings.workers > 1)),
    ]
    if settings.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace)),
        ]
    return tuple(options)


def server_transport(settings: Settings) -> ServerTransport:
    return ServerTransport(
        server_credentials(settings), server_options(settings), settings.reflection,
        certificate_principals(settings),
    )


def certificate_principals(settings: Settings) -> CertificatePrincipals | None:
    """The identities client certificates stand for; None without a mapping file."""
    if not settings.tls_principals:
        return None
    return CertificatePrincipals.load(Path(settings.tls_principals))
