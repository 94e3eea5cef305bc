"""Redis Cluster: the client, and each script call sent to its slot's master.

`redis+cluster://[user:password@]host:port[,host:port...]` (or `rediss+cluster://`
for TLS) names a cluster by any of its nodes. redis-py's cluster client keeps
the slot table and serves every command that is not a script call (streams,
scans, tokens, Functions loading on every master). Script calls go through a
ScriptPipeline per master, as on a single Redis: calls of one loop pass share one
write per master, and a replica wait (WAIT) covers each write.

A script call is never repeated unless Redis said it did not run it: MOVED
(the slot moved: the table is refreshed and the call sent to the new master) or
ASK (the slot is migrating: redis-py sends it with ASKING to the node named).
A connection failure fails the call (UNAVAILABLE: it may have run; the caller
retries with its idempotency key) and refreshes the slot table before the next
call, so calls reach a promoted replica as soon as the cluster has one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MaxConnectionsError, MovedError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from tally.store.pool import ConnectionWaitExpired
from tally.store.script_pipeline import ReplicaWait, ReplicaWaitShortfall, ScriptPipeline

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
# Times a call is sent again after MOVED (each after a fresh slot table).
REDIRECTS_MAX = 3
# A slot table refreshed this recently is not refreshed again for a failed call.
REFRESH_MIN_INTERVAL_S = 0.1
# A slot table older than this is refreshed in the background: a replica that came
# back is waited for again (and a master's replicas counted) within this long.
TABLE_MAX_AGE_S = 5.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def connect_cluster(
    url: str, *, socket_timeout_s: float, max_connections: int
) -> RedisCluster:
    """A cluster client that never retries a command (scripts must not run twice),
    with max_connections per node."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {parts.scheme}://")
    seeds = [seed for seed in parts.netloc.rpartition("@")[2].split(",") if seed]
    if not seeds:
        raise ValueError("a Redis Cluster URL names at least one host:port")
    nodes = []
    for seed in seeds:
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Redis Cluster seed {seed!r} is not host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    credentials = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    username, _, password = credentials.partition(":")
    return RedisCluster(
        startup_nodes=nodes,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=CLUSTER_SCHEMES[parts.scheme],
        retry=Retry(NoBackoff(), retries=0),
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        max_connections=max_connections,
        health_check_interval=0,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


class NodeSource:
    """One cluster node's connections (redis-py's own list for that node)."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.max_connections = node.max_connections

    async def acquire(self) -> AbstractConnection:
        try:
            return self.node.acquire_connection()
        except MaxConnectionsError as exc:
            raise ConnectionWaitExpired(0) from exc

    async def release(self, connection: AbstractConnection) -> None:
        self.node.release(connection)  # type: ignore[arg-type]


class ClusterScripts:
    """Sends each script call to the master of its first key's slot.

    With a replica wait of N, a master's writes wait for min(N, its live replicas):
    the replicas the slot table lists (it leaves out the ones the cluster marked
    failed). A replica that is up must confirm every write, so a failover to it
    loses nothing acknowledged; a master with no live replica (its replica died, or
    it was promoted and its old master is down) has nothing it could fail over to,
    and goes on serving on its own AOF rather than refuse every write. A wait that
    fell short refreshes the slot table: a replica that died is then left out once
    the cluster has marked it failed (within its node timeout)."""

    def __init__(
        self, cluster: RedisCluster, window_s: float = 0.0, wait: ReplicaWait | None = None
    ) -> None:
        self.cluster = cluster
        self.window_s = window_s
        self.wait = wait
        self._pipelines: dict[str, tuple[ClusterNode, ScriptPipeline]] = {}
        self._replicas: dict[str, int] | None = None  # master name -> live replicas
        self._stale = False
        self._refreshed_at = time.monotonic()
        self._refreshing: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def execute(self, *command: Any) -> Any:
        """One FCALL / FCALL_RO (`name, numkeys, key, ...`) on its master."""
        for _ in range(REDIRECTS_MAX):
            if self._stale:
                await self.refresh()
            elif time.monotonic() - self._refreshed_at > TABLE_MAX_AGE_S:
                self._refresh_in_background()
            node = self.cluster.nodes_manager.get_node_from_slot(
                self.cluster.keyslot(command[3])
            )
            try:
                return await self._pipeline(node).execute(*command)
            except MovedError:  # (before AskError: MOVED is a kind of ASK to redis-py)
                self._stale = True  # the script did not run: send it to the new master
            except AskError:
                # The slot is migrating and the key is on its new node already: redis-py
                # sends ASKING then the call there (rare: only while slots move).
                return await self.cluster.execute_command(*command)
            except (RedisConnectionError, RedisTimeoutError, ReplicaWaitShortfall):
                self._stale = True  # a failover may be under way, or a replica gone
                raise
        return await self.cluster.execute_command(*command)

    def _pipeline(self, node: ClusterNode) -> ScriptPipeline:
        held = self._pipelines.get(node.name)
        if held is not None and held[0] is node:
            return held[1]
        pipeline = ScriptPipeline(NodeSource(node), self.window_s, self._wait_for(node.name))
        self._pipelines[node.name] = node, pipeline
        return pipeline

    def pipeline_wait(self, master: str) -> ReplicaWait | None:
        """The replica wait the master's writes have now (None: none, or no pipeline)."""
        held = self._pipelines.get(master)
        return None if held is None else held[1].wait

    def _wait_for(self, master: str) -> ReplicaWait | None:
        if self.wait is None:
            return None
        if self._replicas is None:
            self._replicas = live_replicas(self.cluster)
        replicas = min(self.wait.replicas, self._replicas.get(master, 0))
        return ReplicaWait(replicas, self.wait.timeout_ms) if replicas else None

    def _refresh_in_background(self) -> None:
        if self._background:
            return
        self._refreshed_at = time.monotonic()  # one at a time, whatever comes of it
        task = asyncio.ensure_future(self.refresh(due=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def refresh(self, *, due: bool = False) -> None:
        """A fresh slot table when it is stale (at most one refresh at a time, and not
        more often than REFRESH_MIN_INTERVAL_S) or `due` (its age); pipelines of nodes
        that left are closed, the others' replica waits recounted."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not (self._stale or due):
                return  # another call refreshed it meanwhile
            if not due and time.monotonic() - self._refreshed_at < REFRESH_MIN_INTERVAL_S:
                return
            self._refreshed_at = time.monotonic()
            try:
                await self.cluster.nodes_manager.initialize()
            except Exception:  # no node answered: the next call tries again
                return
            self._stale = False
            self._replicas = live_replicas(self.cluster)
            masters = {node.name: node for node in self.cluster.get_primaries()}
            for name, (node, pipeline) in list(self._pipelines.items()):
                if masters.get(name) is not node:
                    await self._pipelines.pop(name)[1].close()
                else:
                    pipeline.wait = self._wait_for(name)


def live_replicas(cluster: RedisCluster) -> dict[str, int]:
    """Each master's live replicas, as the slot table (CLUSTER SLOTS) lists them."""
    replicas: dict[str, set[str]] = {node.name: set() for node in cluster.get_primaries()}
    for primary, *others in cluster.nodes_manager.slots_cache.values():
        replicas.setdefault(primary.name, set()).update(node.name for node in others)
    return {name: len(names) for name, names in replicas.items()}


async def replicas_every_master_has(redis: object) -> int:
    """The fewest live replicas any cluster master has (0 for a single Redis: a
    failover there is not Tally's to manage)."""
    if not isinstance(redis, RedisCluster):
        return 0
    await redis.initialize()
    return min(live_replicas(redis).values(), default=0)
