"""Argument types shared by the admin commands (a bad value is a usage error: exit 2)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def timestamp(text: str) -> Timestamp:
    """ISO 8601; a time without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid ISO 8601 time {text!r} (e.g. 2027-01-31T00:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def add_time_range(parser: argparse.ArgumentParser) -> None:
    """--from and --to, read into args.start and args.end (None when not given)."""
    parser.add_argument("--from", dest="start", type=timestamp, default=None, metavar="ISO8601")
    parser.add_argument("--to", dest="end", type=timestamp, default=None, metavar="ISO8601")


class TimeRanged(Protocol):
    """A request with a `start` and an `end` (unset: open)."""

    @property
    def start(self) -> Timestamp: ...

    @property
    def end(self) -> Timestamp: ...


def copy_time_range(args: argparse.Namespace, request: TimeRanged) -> None:
    """Sets the request's bounds from --from and --to, those given."""
    if args.start is not None:
        request.start.CopyFrom(args.start)
    if args.end is not None:
        request.end.CopyFrom(args.end)
