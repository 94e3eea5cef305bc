"""The channel both clients open: one address or several, the published service
config (round-robin balancing, gRPC's own retries of UNAVAILABLE), TLS."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from importlib import resources

import grpc

from tally_client.tls import ClientTls


def service_config() -> str:
    """The gRPC service config (JSON) of every Tally service, shipped with the stubs."""
    return resources.files("tally_client.v1").joinpath("service_config.json").read_text("utf-8")


def channel_options() -> list[tuple[str, str]]:
    return [("grpc.service_config", service_config())]


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target of one address, or of several `host:port` addresses (IP
    literals: gRPC's `ipv4:` or `ipv6:` address lists; a host name must be one
    `dns:///name:port` target, which balances over all its addresses)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("no address to connect to")
    if len(addresses) == 1:
        return addresses[0]
    families = {_ip_family(address) for address in addresses}
    if len(families) != 1 or None in families:
        raise ValueError(
            "several addresses must all be IPv4 or all IPv6 literals (host:port, "
            "[v6]:port); for host names use one dns:///name:port target"
        )
    return f"{families.pop()}:{','.join(addresses)}"


def _ip_family(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    try:
        version = ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).version
    except ValueError:
        return None
    if version == 6 and not host.startswith("["):
        return None
    return "ipv4" if version == 4 else "ipv6"


def call_metadata(
    metadata: Sequence[tuple[str, str]] | None, token: str | None
) -> tuple[tuple[str, str], ...] | None:
    """What every call sends: the caller's metadata and the bearer token."""
    sent = [*(metadata or ()), *([("authorization", f"Bearer {token}")] if token else [])]
    return tuple(sent) if sent else None


def sync_channel(target: str, tls: ClientTls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, tls.credentials(), options=channel_options())


def aio_channel(
    target: str,
    tls: ClientTls | None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(
            target, options=channel_options(), interceptors=interceptors
        )
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=channel_options(), interceptors=interceptors
    )
