"""What the store must ask every Redis node, not any one: on a Redis Cluster a
keyless command goes to one node of redis-py's choosing, so a setting read
there says nothing of the others."""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster


async def config_values(redis: Any, parameter: str) -> dict[str, str]:
    """Per node (its host:port; a single Redis: ""), the value of one CONFIG
    parameter. On a cluster: every node, replicas too (a replica becomes the
    master at a failover, with its own settings)."""
    if not isinstance(redis, RedisCluster):
        return {"": _value(await redis.config_get(parameter), parameter)}
    await redis.initialize()  # the node table is empty before the client's first command
    return {
        node.name: _value(await redis.config_get(parameter, target_nodes=node), parameter)
        for node in redis.get_nodes()
    }


def _value(reply: dict[Any, Any], parameter: str) -> str:
    value = reply.get(parameter) or reply.get(parameter.encode())
    return value.decode() if isinstance(value, bytes) else str(value)
