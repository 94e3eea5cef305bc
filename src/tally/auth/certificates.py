"""Client certificates that stand for principals (mutual TLS).

Under mutual TLS (`--tls-client-ca`) gRPC has already verified a client's
certificate against the CA before any call reaches the server; what is left is
who it is. A certificate's identity is its subject common name (CN): every
certificate has one, and gRPC exposes it in the call's auth context as
`x509_common_name`. An operator maps identities to principals in a JSON file
(`--tls-principals PATH`):

    {"worker-eu-1": {"role": "worker", "accounts": ["acct-1", "acct-2"]},
     "ops-console": {"role": "admin"}}

`accounts` may be left out (every account). A certificate whose identity is not
in the file stands for nobody: the call must then bring a token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tally.auth.principal import Principal, Role

# The auth context gRPC gives a servicer: property name -> values.
AuthContext = Mapping[str, Iterable[bytes]]  # what grpc's context.auth_context() gives

IDENTITY_PROPERTY = "x509_common_name"
PRINCIPAL_PREFIX = "cert:"


class CertificatePrincipals:
    """Certificate identity -> Principal, from the `--tls-principals` file."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        self._principals = dict(principals)

    @classmethod
    def load(cls, path: Path) -> CertificatePrincipals:
        """Reads the mapping; a malformed file is refused at start, naming the entry."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"tls_principals: cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"tls_principals: {path} must hold a JSON object")
        return cls({identity: _principal(identity, entry) for identity, entry in raw.items()})

    def principal_from_peer(self, auth_context: AuthContext) -> Principal | None:
        """The principal the call's verified client certificate stands for; None when
        the call has no client certificate or its identity is not mapped."""
        values = list(auth_context.get(IDENTITY_PROPERTY) or ())
        if len(values) != 1:
            return None
        return self._principals.get(values[0].decode("utf-8", "replace"))


def _principal(identity: str, entry: object) -> Principal:
    if not isinstance(entry, dict) or set(entry) - {"role", "accounts"}:
        raise ValueError(
            f"tls_principals: {identity!r} must be an object with 'role' and optional 'accounts'"
        )
    roles = {r.value: r for r in Role}
    role = roles.get(str(entry.get("role")))
    if role is None:
        raise ValueError(
            f"tls_principals: {identity!r} has no valid role ({', '.join(roles)})"
        )
    accounts = entry.get("accounts", [])
    if not isinstance(accounts, list) or not all(
        isinstance(a, str) and a for a in accounts
    ):
        raise ValueError(f"tls_principals: {identity!r}: accounts must be a list of account ids")
    return Principal(PRINCIPAL_PREFIX + identity, role, frozenset(accounts))
