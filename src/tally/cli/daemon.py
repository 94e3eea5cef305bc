"""Running a long-lived command (`tally serve`, `tally flusher`) from its settings:
the exit codes and messages both share."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from tally import config, logs, runtime
from tally.redaction import redact
from tally.store.embedded import RedisNotInstalled

Main = Callable[[config.Settings], Coroutine[Any, Any, None]]


def run_daemon(command: str, args: argparse.Namespace, main: Main) -> int:
    """0 after a graceful stop; 2 for settings that cannot work, 3 when the embedded
    Redis has no redis-server to run, 1 when it could not start or keep running."""
    try:
        settings = config.from_sources(args)
    except ValueError as exc:
        print(f"tally {command}: {redact(str(exc))}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=runtime.loop_factory(settings.event_loop)) as runner:
            runner.run(main(settings))
    except RedisNotInstalled as exc:
        print(f"tally {command}: {redact(str(exc))}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"tally {command}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0
