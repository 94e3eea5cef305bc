"""A real Redis Cluster for tests: Debian's redis-server in cluster mode on free
ports, joined by `redis-cli --cluster create`, every node stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support import RedisProcess, free_port

CLUSTER_START_TIMEOUT_S = 30.0
# How long a master may be unreachable before its replica is promoted: short, so a
# failover test waits seconds, not the 15 s default.
NODE_TIMEOUT_MS = 1000


class RedisClusterProcesses:
    """`masters` masters with `replicas` replicas each, as `redis-cli --cluster
    create` lays them out (equal, contiguous slot ranges). Settings as the
    authority needs them: AOF always, noeviction."""

    def __init__(self, folder: Path, masters: int = 3, replicas: int = 0) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed (apt-get install -y redis-tools)")
        self.masters = masters
        self.replicas = replicas
        self.nodes = [
            RedisProcess(
                folder / f"node{i}",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                # the bus port defaults to port + 10000, past 65535 for a high free port
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica whose master went quiet for long still takes over: the
                # test kills masters on purpose
                "--cluster-replica-validity-factor", "0",
                # a replica's first sync starts at once, not after the default 5 s
                "--repl-diskless-sync-delay", "0",
            )
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """The cluster URL Tally takes: every node as a seed."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=CLUSTER_START_TIMEOUT_S,
            )
            self.wait_ok(replicas=self.replicas)
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout_s: float = CLUSTER_START_TIMEOUT_S, replicas: int = 0) -> None:
        """Until every live node says the cluster is ok, knows every master and
        `replicas` replicas of each."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._ok(node, replicas) for node in self.live()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def _ok(self, node: RedisProcess, replicas: int) -> bool:
        """The node sees the whole cluster; a replica is in sync with its master
        (WAIT counts only replicas that are)."""
        try:
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                info = client.cluster("info")
                slots = client.execute_command("CLUSTER SLOTS")  # [start, end, master, *replicas]
                replication = client.info("replication")
        except redis.RedisError:
            return False
        in_sync = replication.get("role") == "master" or (
            replication.get("master_link_status") == "up"
            and not replication.get("master_sync_in_progress")
        )
        replicated = all(len(entry) - 3 >= replicas for entry in slots)
        return (
            info.get("cluster_state") == "ok" and len(slots) == self.masters and in_sync
            and replicated
        )

    def live(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def master_of_key(self, key: str) -> RedisProcess:
        return self.master_of_slot(key_slot(key.encode()))

    def master_holding(self, pattern: str) -> RedisProcess:
        """The master holding a key that matches `pattern` (whatever the key layout)."""
        for node in self.live():
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                if client.execute_command("ROLE")[0] == b"master" and next(
                    client.scan_iter(match=pattern), None
                ) is not None:
                    return node
        raise RuntimeError(f"no master holds a key matching {pattern!r}")

    def replica_of(self, master: RedisProcess) -> RedisProcess:
        """A live replica of the master (as the master's own slot table lists it)."""
        with redis.Redis(port=master.port, socket_timeout=1) as client:
            for _start, _end, owner, *replicas in client.execute_command("CLUSTER SLOTS"):
                if int(owner[1]) == master.port and replicas:
                    port = int(replicas[0][1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"the master on {master.port} has no replica")

    def master_of_slot(self, slot: int) -> RedisProcess:
        """The live node serving `slot` as master now."""
        for node in self.live():
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no live node knows slot {slot}")

    def kill_and_fail_over(self, master: RedisProcess, timeout_s: float = 30.0) -> RedisProcess:
        """SIGKILL a master, then wait until a replica took its slots over; the new master."""
        slot = self.first_slot(master)
        master.kill()
        return self.wait_promoted(master, slot, timeout_s)

    def wait_promoted(
        self, master: RedisProcess, slot: int, timeout_s: float = 30.0
    ) -> RedisProcess:
        """After `master` (which served `slot`) died: waits until a replica took its
        slots over, and the cluster is ok again; the new master."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                promoted = self.master_of_slot(slot)
            except (RuntimeError, redis.RedisError):
                promoted = master
            if promoted is not master:
                self.wait_ok(max(1.0, deadline - time.monotonic()))
                return promoted
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from the master on {master.port}")
            time.sleep(0.1)

    def rejoin(self, node: RedisProcess, timeout_s: float = 30.0) -> None:
        """Restarts a killed node (its cluster config kept): it comes back as a
        replica of whoever took its slots; waits until every master has its
        replicas in sync again."""
        node.start()
        self.wait_ok(timeout_s, replicas=self.replicas)

    def first_slot(self, master: RedisProcess) -> int:
        with redis.Redis(port=master.port, socket_timeout=1) as client:
            for start, _end, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(owner[1]) == master.port:
                    return int(start)
        raise RuntimeError(f"the node on {master.port} is not a master")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def started_cluster(
    folder: Path, masters: int = 3, replicas: int = 0
) -> Iterator[RedisClusterProcesses]:
    """A started cluster, every node stopped on the way out (a SIGSTOPped one too)."""
    cluster = RedisClusterProcesses(folder, masters, replicas)
    cluster.start()
    try:
        yield cluster
    finally:
        for node in cluster.live():  # a stopped process would not hear SIGTERM
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGCONT)
        cluster.stop()
