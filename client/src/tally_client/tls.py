"""The TLS a client speaks to a server with: the CA that signed the server's
certificate and, for mutual TLS, the client's own certificate and key.

Shared by both clients (aio.py, sync.py) and every CLI command of the server
(tally.cli.target).
The variables are distinct from the server's (TALLY_TLS_CERT is the server's
certificate), so a server and the commands run beside it can share one
environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

CA_ENV = "TALLY_TLS_CA"
CERT_ENV = "TALLY_TLS_CLIENT_CERT"
KEY_ENV = "TALLY_TLS_CLIENT_KEY"


@dataclass(frozen=True)
class ClientTls:
    """Paths to PEM files; ca empty: the system's trusted roots."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_sources(
        cls, ca: str | None, cert: str | None, key: str | None, environ: Mapping[str, str]
    ) -> ClientTls | None:
        """Flags win over TALLY_TLS_CA / TALLY_TLS_CLIENT_CERT / TALLY_TLS_CLIENT_KEY;
        None (plaintext) when none of them is set."""
        tls = cls(
            ca=ca or environ.get(CA_ENV, ""),
            cert=cert or environ.get(CERT_ENV, ""),
            key=key or environ.get(KEY_ENV, ""),
        )
        return tls if tls.ca or tls.cert else None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )
