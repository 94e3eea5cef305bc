"""Settings: flags win over TALLY_* variables, which win over defaults; durations parse;
bad values are a ValueError that names the flag or variable they came from."""

from __future__ import annotations

import argparse

import pytest

from tally import config


def parse(argv: list[str], environ: dict[str, str] | None = None) -> config.Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_sources(parser.parse_args(argv), {} if environ is None else environ)


def test_defaults_apply_without_flags_or_variables() -> None:
    """Proves every setting takes its declared default when neither flag nor variable is set."""
    settings = parse([])
    for setting in config.SETTINGS:
        assert getattr(settings, setting.name) == setting.default, setting.name
    assert settings.listen == "127.0.0.1:50051"
    assert settings.shards == 0  # the recorded layout's count; a new deployment's default
    assert settings.hold_ttl_default == 300.0


def test_every_setting_has_a_flag_and_a_variable() -> None:
    """Proves each setting is reachable as --kebab-case flag and as TALLY_UPPER variable,
    and the flag's help names the variable."""
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for setting in config.SETTINGS:
        action = actions[setting.name]
        assert action.option_strings == ["--" + setting.name.replace("_", "-")]
        assert config.env_name(setting) == "TALLY_" + setting.name.upper()
        assert config.env_name(setting) in (action.help or "")


def test_variables_win_over_defaults() -> None:
    """Proves TALLY_* variables replace the defaults, each parsed to its type."""
    settings = parse([], {
        "TALLY_SHARDS": "32",
        "TALLY_HOLD_TTL_DEFAULT": "2m",
        "TALLY_DEFAULT_CATALOG": "false",
        "TALLY_REDIS_URL": "redis://example:6379/2",
        "TALLY_LOG_FORMAT": "text",
    })
    assert settings.shards == 32
    assert settings.hold_ttl_default == 120.0
    assert settings.default_catalog is False
    assert settings.redis_url == "redis://example:6379/2"
    assert settings.log_format == "text"


def test_flags_win_over_variables() -> None:
    """Proves a flag wins over its variable, setting by setting, while other variables
    still apply; a flag's value is used even when the variable's would not parse."""
    environ = {
        "TALLY_SHARDS": "not-a-number",
        "TALLY_HOLD_TTL_DEFAULT": "2m",
        "TALLY_REAPER_INTERVAL": "5s",
        "TALLY_DEFAULT_CATALOG": "true",
        "TALLY_LISTEN": "127.0.0.1:1111",
    }
    settings = parse(
        ["--shards", "8", "--hold-ttl-default", "90s", "--default-catalog", "no",
         "--listen", "127.0.0.1:2222"],
        environ,
    )
    assert settings.shards == 8
    assert settings.hold_ttl_default == 90.0
    assert settings.default_catalog is False
    assert settings.listen == "127.0.0.1:2222"
    assert settings.reaper_interval == 5.0  # no flag: the variable applies


def test_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves from_sources reads os.environ by default, and flags still win over it."""
    monkeypatch.setenv("TALLY_SHARDS", "24")
    monkeypatch.setenv("TALLY_REAPER_BATCH", "7")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.from_sources(parser.parse_args(["--reaper-batch", "9"]))
    assert (settings.shards, settings.reaper_batch) == (24, 9)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0),
     ("1.5h", 5400.0), ("250ms", 0.25), ("10", 10.0), (" 45s ", 45.0), ("0s", 0.0)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    """Proves the duration forms 500ms, 30s, 5m, 1h, 2d (and bare seconds) parse exactly."""
    assert config.parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "-1s", "1 h", "ms", "1h30m", "1e3s", "5M"])
def test_bad_durations_are_refused(text: str) -> None:
    """Proves text that is not a duration is a ValueError that shows the text and examples."""
    with pytest.raises(ValueError, match="is not a duration") as refused:
        config.parse_duration_s(text)
    assert repr(text) in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        ([], {"TALLY_SHARDS": "abc"}, "TALLY_SHARDS"),
        ([], {"TALLY_SHARDS": "1.5"}, "TALLY_SHARDS"),
        (["--shards", "abc"], {}, "--shards"),
        ([], {"TALLY_REAPER_INTERVAL": "soon"}, "TALLY_REAPER_INTERVAL"),
        (["--hold-ttl-max", "1 h"], {}, "--hold-ttl-max"),
        ([], {"TALLY_IDEMPOTENCY_WINDOW": "-5m"}, "TALLY_IDEMPOTENCY_WINDOW"),
        ([], {"TALLY_DEFAULT_CATALOG": "maybe"}, "TALLY_DEFAULT_CATALOG"),
        (["--token-cache-ttl", "soon"], {}, "--token-cache-ttl"),
        ([], {"TALLY_REDIS_MAX_CONNECTIONS": "many"}, "TALLY_REDIS_MAX_CONNECTIONS"),
    ],
)
def test_unparsable_values_name_their_source(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    """Proves a value that does not parse is a ValueError naming the flag or variable."""
    with pytest.raises(ValueError) as refused:
        parse(argv, environ)
    assert str(refused.value).startswith(named + ":"), str(refused.value)


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        ([], {"TALLY_REDIS_APPENDFSYNC": "sometimes"}, "redis_appendfsync"),
        (["--log-format", "xml"], {}, "log_format"),
        ([], {"TALLY_REAPER_BATCH": "0"}, "reaper_batch"),
        ([], {"TALLY_PERIOD_SWEEP_BATCH": "0"}, "period_sweep_batch"),
        (["--redis-max-connections", "-1"], {}, "redis_max_connections"),
        (["--max-in-flight", "0"], {}, "max_in_flight"),
        (["--redis-pipeline-window", "11ms"], {}, "redis_pipeline_window"),
        ([], {"TALLY_ADMISSION_QUEUE": "-1"}, "admission_queue"),
        (["--listen", "50051"], {}, "listen"),
        ([], {"TALLY_LISTEN": "127.0.0.1:http"}, "listen"),
        (["--hold-ttl-min", "10m"], {}, "hold_ttl"),  # above the 5m default
        (["--hold-ttl-default", "2h"], {}, "hold_ttl"),  # above the 1h maximum
        ([], {"TALLY_HOLD_TTL_MIN": "0s", "TALLY_HOLD_TTL_DEFAULT": "1s"}, "hold_ttl_min"),
    ],
)
def test_values_that_parse_but_cannot_work_are_refused(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    """Proves values that parse but cannot work are a ValueError naming the setting."""
    with pytest.raises(ValueError) as refused:
        parse(argv, environ)
    assert named in str(refused.value).replace("-", "_").replace(" ", "_"), str(refused.value)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"TALLY_SHARDS": "-3"}, "shards"),
        ({"TALLY_SHARDS": "4097"}, "shards"),
        ({"TALLY_IDEMPOTENCY_WINDOW": "0s"}, "idempotency_window"),
        ({"TALLY_REDIS_TIMEOUT": "0s"}, "redis_timeout"),
        ({"TALLY_REAPER_INTERVAL": "0ms"}, "reaper_interval"),
        ({"TALLY_PERIOD_SWEEP_INTERVAL": "0ms"}, "period_sweep_interval"),
        ({"TALLY_BACKGROUND_FAILURES_MAX": "0"}, "background_failures_max"),
        ({"TALLY_BACKGROUND_STABLE_AFTER": "0s"}, "background_stable_after"),
    ],
)
def test_settings_the_server_cannot_run_with_are_refused_up_front(
    environ: dict[str, str], named: str
) -> None:
    """Proves settings that would only fail later (a shard count KeySpace rejects, a zero
    idempotency window every script refuses, a zero Redis timeout, a reaper that never
    sleeps) are refused when the settings are read, naming the setting."""
    with pytest.raises(ValueError) as refused:
        parse([], environ)
    assert named in str(refused.value).lower().replace("-", "_"), str(refused.value)


def test_workers_are_bounded_from_1_to_64() -> None:
    """Proves --workers takes 1 (the default) to 64 (WORKERS_MAX) and refuses 0 and 65
    with a message naming the flag; TALLY_WORKERS alike."""
    assert parse([]).workers == 1
    assert parse(["--workers", str(config.WORKERS_MAX)]).workers == 64
    assert parse([], {"TALLY_WORKERS": "64"}).workers == 64
    for bad in ("0", "65"):
        with pytest.raises(ValueError, match=r"--workers \(TALLY_WORKERS\) must be between 1 "
                                             rf"and 64, got {bad}"):
            parse(["--workers", bad])
    with pytest.raises(ValueError, match="--workers"):
        parse([], {"TALLY_WORKERS": "65"})


def test_workers_metrics_endpoints_must_fit_below_port_65536() -> None:
    """Proves worker i's metrics port (metrics_listen's + i) must exist: 65535 - 64 is
    the highest base for 64 workers; port 0 (any free port) is always accepted."""
    assert parse(["--workers", "64", "--metrics-listen", "127.0.0.1:65471"]).workers == 64
    with pytest.raises(ValueError, match="would pass port 65535"):
        parse(["--workers", "64", "--metrics-listen", "127.0.0.1:65472"])
    assert parse(["--workers", "64", "--metrics-listen", "127.0.0.1:0"]).workers == 64


def test_the_pipeline_window_is_accepted_up_to_its_bound() -> None:
    assert parse([]).redis_pipeline_window == 0.0
    assert parse(["--redis-pipeline-window", "10ms"]).redis_pipeline_window == 0.010
    assert parse([], {"TALLY_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    assert parse([]).event_loop == "auto"


def test_the_replica_wait_is_auto_by_default_and_bounded() -> None:
    assert parse([]).redis_wait_replicas is None  # auto
    assert parse(["--redis-wait-replicas", "auto"]).redis_wait_replicas is None
    assert parse(["--redis-wait-replicas", "0"]).redis_wait_replicas == 0
    assert parse(["--redis-wait-replicas", str(config.REDIS_WAIT_REPLICAS_MAX)]) \
        .redis_wait_replicas == config.REDIS_WAIT_REPLICAS_MAX
    for refused in (str(config.REDIS_WAIT_REPLICAS_MAX + 1), "-1"):
        with pytest.raises(ValueError, match="redis_wait_replicas must be between 0 and 5"):
            parse(["--redis-wait-replicas", refused])
    with pytest.raises(ValueError, match="redis_wait_replicas needs redis_pipeline on"):
        parse(["--redis-wait-replicas", "1", "--redis-pipeline", "off"])


def test_the_replica_wait_timeout_is_accepted_up_to_its_bound() -> None:
    assert parse([]).redis_wait_timeout == 0.5
    assert parse(["--redis-wait-timeout", "10s"]).redis_wait_timeout == 10.0
    for refused in ("10001ms", "0s"):
        with pytest.raises(ValueError, match="redis_wait_timeout must be above 0"):
            parse(["--redis-wait-timeout", refused])


@pytest.mark.parametrize("shards", [0, 1, 4096])
def test_shards_take_0_for_the_recorded_count_and_1_to_4096(shards: int) -> None:
    """Proves --shards takes 0 (unset: the count the deployment records, the default for a
    new one) and 1 to 4096 (SHARDS_MAX) at both bounds."""
    assert parse(["--shards", str(shards)]).shards == shards


def test_the_lease_ttl_is_accepted_at_its_bounds_and_refused_beyond() -> None:
    """Proves --lease-ttl takes 100ms to 1h (15s by default) and refuses what is beyond,
    naming the setting."""
    assert parse([]).lease_ttl == 15.0
    assert parse(["--lease-ttl", "100ms"]).lease_ttl == 0.1
    assert parse(["--lease-ttl", "1h"]).lease_ttl == 3600.0
    for bad in ("99ms", "3601s"):
        with pytest.raises(ValueError, match="lease_ttl must be between"):
            parse(["--lease-ttl", bad])


def test_the_flusher_command_reads_known_settings_only() -> None:
    """Proves every flag of `tally flusher` is a setting, and the rest of its settings
    come from their variables (the flusher still reads TALLY_SHUTDOWN_GRACE)."""
    from tally.cli.flusher import FLUSHER_SETTINGS

    assert set(FLUSHER_SETTINGS) <= {setting.name for setting in config.SETTINGS}
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, FLUSHER_SETTINGS)
    args = parser.parse_args(["--flush-interval", "2s"])
    settings = config.from_sources(args, {"TALLY_SHUTDOWN_GRACE": "3s"})
    assert (settings.flush_interval, settings.shutdown_grace) == (2.0, 3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--listen", "127.0.0.1:1"])
