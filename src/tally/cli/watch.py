"""`tally watch`: a live view of an account's events (or every account's), over gRPC.

    tally watch ACCOUNT [--after N] [--json] [--target HOST:PORT]
    tally watch --all [--after POSITION] [--json] [--target HOST:PORT]

One line per event as it happens: the time (ISO 8601, UTC), the position, the
type, the operation, the units it moved, the balance available after it, the
reservation and, for alerts, which threshold. `--json` prints one JSON object
per line instead (every UsageEvent field). `--after N` resumes after the
account's event N (`--after 0`: its whole history first); `--all` takes the
opaque positions an all-accounts watch prints. Ctrl-C (or SIGTERM) stops it
and exits 0, telling on stderr the position to resume from.

`--target` defaults to $TALLY_TARGET, else 127.0.0.1:50051. A refused call
prints `tally: <CODE>: <details>` on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import grpc

from tally.cli import output
from tally.cli.target import add_target_flag, one_line, open_channel, report_rpc_error
from tally_client.v1 import usage_pb2, usage_pb2_grpc

POSITION_METADATA = "tally-position"  # tally.api.watch: where the watch starts
COLUMNS = (
    ("AT", 24, "<"),
    ("POS", 6, ">"),
    ("TYPE", 16, "<"),
    ("OPERATION", 20, "<"),
    ("UNITS", 9, ">"),
    ("AVAILABLE", 11, ">"),
    ("RESERVATION", 28, "<"),
)


class _Stop(Exception):
    """SIGTERM: stop like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    raise _Stop


def _cell(value: object, width: int, align: str) -> str:
    text = str(value)
    return f"{text:{align}{width}}"


def header(all_accounts: bool) -> str:
    cells = [_cell(name, width, align) for name, width, align in COLUMNS]
    if all_accounts:
        cells[1] = _cell("ACCOUNT", 24, "<")
    return "  ".join([*cells, "ALERT"]).rstrip()


def line(event: usage_pb2.UsageEvent, all_accounts: bool) -> str:
    """One event as one aligned line of text."""
    values: list[object] = [
        output.iso(event.occurred_at),
        (event.account_id or "-") if all_accounts else event.position,
        event.type,
        event.operation or "-",
        event.units,
        event.available_after if event.account_id else "-",
        event.reservation_id or "-",
    ]
    cells = [_cell(v, width, align) for v, (_, width, align) in zip(values, COLUMNS, strict=True)]
    if all_accounts:
        cells[1] = _cell(values[1], 24, "<")
    return "  ".join([*cells, one_line(event.alert) or "-"]).rstrip()


def _json_line(event: usage_pb2.UsageEvent) -> str:
    return json.dumps(output.message_dict(event), separators=(",", ":"))


def _print(text: str) -> None:
    print(text, flush=True)


def _resume_hint(args: argparse.Namespace, position: str) -> str:
    who = "--all" if args.all else args.account_id
    return f"tally: resume with: tally watch {who} --after {position}"


def _watch(args: argparse.Namespace) -> int:
    request = usage_pb2.WatchUsageRequest(
        account_id="" if args.all else args.account_id, after_position=args.after
    )
    position = args.after
    channel = open_channel(args)
    call: Any = None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        call = usage_pb2_grpc.UsageServiceStub(channel).WatchUsage(request)
        started = {key: str(value) for key, value in call.initial_metadata() or ()}
        if POSITION_METADATA in started:  # positioned (else the call failed: see below)
            position = started[POSITION_METADATA]
            if not args.json:
                _print(header(args.all))
        for event in (response.event for response in call):
            position = event.position
            _print(_json_line(event) if args.json else line(event, args.all))
        return 0  # the server ended the stream (it does not, unless it stops)
    except (KeyboardInterrupt, _Stop):
        if call is not None:
            call.cancel()
        if position:
            print(_resume_hint(args, position), file=sys.stderr)
        return 0
    except grpc.RpcError as error:
        code = report_rpc_error(error)
        if position and code not in (
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
        ):
            print(_resume_hint(args, position), file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`tally watch ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        channel.close()


def _handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.all == bool(args.account_id):
            parser.error("give either an ACCOUNT or --all")
        return _watch(args)

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="follow an account's events live",
        description="Follow an account's events (or every account's, with --all) as they "
        "happen: one line each, or one JSON object each with --json. Ctrl-C stops.",
    )
    parser.add_argument("account_id", nargs="?", default="", metavar="ACCOUNT")
    parser.add_argument(
        "--all", action="store_true", help="every account's events (admins)"
    )
    parser.add_argument(
        "--after",
        default="",
        metavar="POSITION",
        help="resume after this position: an account's event number (0: its whole history "
        "first), or a position --all printed (default: from now)",
    )
    add_target_flag(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per event")
    parser.set_defaults(handler=_handler(parser))


def main(argv: list[str] | None = None) -> int:
    """`python -m tally.cli.watch` runs `tally watch` on its own."""
    parser = argparse.ArgumentParser(prog="tally")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["watch", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
