"""What the server runs on: the event loop (--event-loop) and the native backends
its hot path depends on (hiredis for Redis replies, upb for protobuf), reported
once at start (a log line and the tally_runtime_info metric), never per call."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

from google.protobuf.internal import api_implementation
from redis._parsers import _AsyncHiredisParser
from redis.asyncio import connection as redis_connection

EVENT_LOOPS = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def parse_event_loop(text: str) -> str:
    choice = text.strip().lower()
    if choice not in EVENT_LOOPS:
        raise ValueError(f"{text!r} is not an event loop (one of {', '.join(EVENT_LOOPS)})")
    return choice


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str) -> LoopFactory | None:
    """The factory of the loop to serve on; None: asyncio's own. `auto` takes uvloop
    when it is installed; `uvloop` without it installed is refused."""
    if choice == "asyncio" or (choice == "auto" and not uvloop_installed()):
        return None
    if not uvloop_installed():
        raise RuntimeError("--event-loop uvloop: uvloop is not installed (pip install uvloop)")
    import uvloop

    factory: LoopFactory = uvloop.new_event_loop
    return factory


def running_loop() -> str:
    """'uvloop' or 'asyncio': the loop this coroutine runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def backends() -> dict[str, str]:
    """What the hot path runs on, to be reported once (call it inside the loop)."""
    hiredis = redis_connection.DefaultParser is _AsyncHiredisParser
    return {
        "event_loop": running_loop(),
        "redis_parser": "hiredis" if hiredis else "python",
        "protobuf": api_implementation.Type(),
    }


def describe(found: dict[str, str]) -> str:
    """One line: 'event loop uvloop, Redis replies hiredis, protobuf upb'."""
    return (
        f"event loop {found['event_loop']}, Redis replies {found['redis_parser']}, "
        f"protobuf {found['protobuf']}"
    )
