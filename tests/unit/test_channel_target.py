"""The client's target for one address, several, or a DNS name (tally_client.channel)."""

from __future__ import annotations

import pytest

from tally_client.channel import channel_target


def test_one_address_or_a_grpc_target_is_used_as_given() -> None:
    """Proves a single address, a one-element list and a dns:/// target pass unchanged."""
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target(["tally.internal:50051"]) == "tally.internal:50051"
    assert channel_target("dns:///tally.internal:50051") == "dns:///tally.internal:50051"


def test_several_ip_addresses_become_one_address_list() -> None:
    """Proves several IPv4 (or bracketed IPv6) literals become gRPC's ipv4: (ipv6:)
    address list, which round_robin balances over."""
    assert channel_target(["10.0.0.1:50051", "10.0.0.2:50052"]) == (
        "ipv4:10.0.0.1:50051,10.0.0.2:50052")
    assert channel_target(["[::1]:50051", "[fd00::2]:50051"]) == (
        "ipv6:[::1]:50051,[fd00::2]:50051")


@pytest.mark.parametrize("addresses", [
    [],
    ["10.0.0.1:50051", "tally.internal:50051"],  # a host name: one dns:/// target instead
    ["10.0.0.1:50051", "[::1]:50051"],  # families mixed
    ["10.0.0.1:50051", "::1:50051"],  # IPv6 without brackets is ambiguous
    ["10.0.0.1:50051", "10.0.0.2"],  # no port
])
def test_addresses_gRPC_cannot_list_together_are_refused(addresses: list[str]) -> None:
    """Proves no address, host names among several, mixed families, an unbracketed IPv6
    address or a missing port are refused with a message saying what to use."""
    with pytest.raises(ValueError, match="address"):
        channel_target(addresses)
