"""What the primary hands a worker: its settings travel whole on stdin; its health
lines parse; worker i's metrics endpoint is the primary's port + i."""

from __future__ import annotations

import argparse
import dataclasses

from tally import config
from tally.workers.handoff import WorkerLaunch, parse_serving, serving_line
from tally.workers.primary import worker_metrics_listen


def settings() -> config.Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_sources(parser.parse_args(["--workers", "3"]), {})


def test_a_launch_round_trips_every_setting() -> None:
    """Proves the handoff line decodes to the same settings, index and primary pid."""
    launch = WorkerLaunch(
        dataclasses.replace(settings(), redis_url="redis://:secret@127.0.0.1:1/0"), 2, 4242
    )
    line = launch.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert WorkerLaunch.decode(line) == launch


def test_health_lines_parse_and_other_lines_are_ignored() -> None:
    """Proves `serving 1` / `serving 0` give the primary's health and any other line None."""
    assert parse_serving(serving_line(True)) is True
    assert parse_serving(serving_line(False)) is False
    assert parse_serving(b"hello\n") is None


def test_worker_metrics_endpoints_follow_the_primary_port() -> None:
    """Proves worker i listens on the primary's metrics port + i; port 0 stays 0 (each
    its own free port); no endpoint stays none."""
    assert worker_metrics_listen("127.0.0.1:9464", 1) == "127.0.0.1:9465"
    assert worker_metrics_listen("[::1]:9464", 64) == "[::1]:9528"
    assert worker_metrics_listen("127.0.0.1:0", 2) == "127.0.0.1:0"
    assert worker_metrics_listen("", 1) == ""
