"""Entry point of the `tally` command."""

from __future__ import annotations

import argparse
import os
import sys

from tally import __version__
from tally.cli import (
    accounts,
    balances,
    budgets,
    flusher,
    health,
    ledger,
    ops,
    prices,
    purchases,
    reports,
    serve,
    tokens,
    watch,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally", description="Tally: a gRPC quota authority for prepaid usage credits."
    )
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve.register(subparsers)
    flusher.register(subparsers)
    # in the order `tally --help` lists them
    for noun in (accounts, purchases, prices, reports, budgets, ledger, balances):
        noun.register(subparsers)
    health.register(subparsers)
    ops.register(subparsers)
    tokens.register(subparsers)
    watch.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except BrokenPipeError:
        # The reader went away (`tally ledger ... | head`): stop quietly. stdout goes to
        # /dev/null so that Python's flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
