"""`tally serve`: run the authority until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from tally import app, config, runtime
from tally.cli.daemon import run_daemon
from tally.store.embedded import EmbeddedRedis
from tally.workers import primary

log = logging.getLogger("tally.serve")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the quota authority",
        description="Run the quota authority. Every flag also reads a TALLY_* variable; "
        "a flag wins over its variable.",
    )
    config.add_arguments(parser)
    parser.set_defaults(handler=run)


def _tell_ready(
    address: str, embedded: EmbeddedRedis | None, workers: int, backends: dict[str, str]
) -> None:
    if embedded is not None:
        where = f"embedded {Path(embedded.binary).name} (AOF) under {embedded.folder}"
    else:
        where = "the Redis at --redis-url"
    processes = f" ({workers} worker processes)" if workers > 1 else ""
    print(
        f"tally: serving on {address}{processes} with {where}.\n"
        f"  Runtime: {runtime.describe(backends)}.\n"
        f"  Try: .venv/bin/tally accounts create demo --allotment 5000 "
        f"--target {address}\n"
        f"  Stop with Ctrl-C (in-flight calls drain first).",
        file=sys.stderr,
        flush=True,
    )


async def _announce(authority: app.Authority) -> None:
    _tell_ready(authority.address, authority.embedded, 1, authority.backends)


def _serve(settings: config.Settings) -> Coroutine[Any, Any, None]:
    if settings.workers == 1:
        return app.serve_until_signalled(settings, on_ready=_announce)

    async def announce(address: str, core: app.Core) -> None:
        _tell_ready(address, core.embedded, settings.workers, runtime.backends())

    return primary.serve_until_signalled(settings, on_ready=announce)


def run(args: argparse.Namespace) -> int:
    return run_daemon("serve", args, _serve)
