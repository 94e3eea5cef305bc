"""What the primary tells a worker, and how they talk afterwards.

The primary writes one JSON line on the worker's stdin: its settings (with the
resolved Redis URL, listen address and metrics endpoint), its index and the
primary's pid. Settings travel on stdin, never on the command line, because they
may hold passwords (`ps` shows every argument to every user).

Afterwards, primary -> worker (stdin): `serving 1` / `serving 0`, the primary's
health (its background tasks up, no shard fenced, every worker started); end
of file: the primary is gone. Worker -> primary (stdout): `ready`, once its
server takes calls.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tally.config import Settings

READY = b"ready\n"
SERVING_PREFIX = b"serving "
# The handoff line is a few kilobytes; anything far longer is not one.
HANDOFF_BYTES_MAX = 64 * 1024


@dataclass(frozen=True)
class WorkerLaunch:
    settings: Settings
    index: int  # 1..workers
    primary_pid: int

    def encode(self) -> bytes:
        body = {"settings": asdict(self.settings), "index": self.index,
                "primary_pid": self.primary_pid}
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerLaunch:
        body = json.loads(line)
        settings = Settings(**body["settings"])
        settings.validate()
        return cls(settings, int(body["index"]), int(body["primary_pid"]))


def serving_line(serving: bool) -> bytes:
    return SERVING_PREFIX + (b"1\n" if serving else b"0\n")


def parse_serving(line: bytes) -> bool | None:
    """The primary's health from a line; None for a line that is not a health line."""
    if not line.startswith(SERVING_PREFIX):
        return None
    return line[len(SERVING_PREFIX):].strip() == b"1"
