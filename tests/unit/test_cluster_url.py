"""Redis Cluster URLs: every node a seed, credentials and TLS from the URL, and
a clear refusal of what is not host:port."""

from __future__ import annotations

import pytest

from tally.store.cluster import connect_cluster, is_cluster_url


def test_cluster_urls_are_told_from_single_redis_urls() -> None:
    assert is_cluster_url("redis+cluster://10.0.0.1:6379,10.0.0.2:6379")
    assert is_cluster_url("rediss+cluster://cache.internal:6380")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert not is_cluster_url("unix:///run/redis.sock")


async def test_every_node_of_the_url_is_a_seed_with_its_credentials() -> None:
    cluster = connect_cluster(
        "rediss+cluster://tally:s%3Acret@10.0.0.1:6379,10.0.0.2:7000,[::1]:7001",
        socket_timeout_s=2.0, max_connections=8,
    )
    try:
        seeds = [(node.host, node.port) for node in cluster.startup_nodes]
        assert seeds == [("10.0.0.1", 6379), ("10.0.0.2", 7000), ("::1", 7001)]
        kwargs = cluster.get_connection_kwargs()
        assert (kwargs["username"], kwargs["password"]) == ("tally", "s:cret")
        assert cluster.retry.get_retries() == 0  # a script call must never run twice
    finally:
        await cluster.aclose()


@pytest.mark.parametrize("url", [
    "redis+cluster://",
    "redis+cluster://10.0.0.1",
    "redis+cluster://10.0.0.1:port",
    "redis://10.0.0.1:6379",
])
def test_urls_that_name_no_cluster_node_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        connect_cluster(url, socket_timeout_s=1.0, max_connections=1)
