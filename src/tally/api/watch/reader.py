"""The stream reader: cursors over shard streams, and exactly what was trimmed unread.

Every read is one MULTI of XINFO STREAM (per stream) and XREAD (non-blocking
inside MULTI): numbers up to `entries-added - length` are gone (the flusher
trims a prefix only), so the entries after a cursor are complete iff the
cursor's number is at least that. When nothing is new, an XREAD BLOCK waits
for the next entry; its reply is kept to rescue entries trimmed between it and
the MULTI that follows. `advance` is that arithmetic, without I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from tally.domain.events import StreamEntry, stream_id_order
from tally.store.stream_tail import StreamInfo, StreamTail


@dataclass(frozen=True)
class Cursor:
    """The last stream entry consumed, and its number in its stream's history
    (1 for the first entry ever added; 0 with id "0-0": nothing yet)."""

    id: str = "0-0"
    number: int = 0


@dataclass
class ShardRead:
    """What one read found on one stream."""

    shard: int
    after: Cursor  # where the next read of this stream starts
    missed: int = 0  # entries trimmed before they could be read (a lower bound if not exact)
    exact: bool = True
    reset: bool = False  # the stream was recreated (Redis wiped, or restored from the ledger)
    skip_to: Cursor | None = None  # the position after the missed entries
    entries: list[tuple[Cursor, StreamEntry]] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        return self.reset or self.missed > 0 or not self.exact


class Stopped(Exception):
    """The reader was stopped (the server is shutting down)."""


def advance(
    shard: int,
    cursor: Cursor,
    info: StreamInfo,
    entries: Sequence[StreamEntry],
    held: Sequence[StreamEntry],
) -> ShardRead:
    """What a read from `cursor` found: `entries` (the XREAD after the cursor, read
    with `info`), and the entries of an earlier blocking XREAD (`held`) that may
    hold some of those trimmed since."""
    if info.added < cursor.number or stream_id_order(cursor.id) > stream_id_order(info.last_id):
        # The stream is not the one the cursor was taken from: read it from its start.
        return ShardRead(shard, after=Cursor(), reset=True, skip_to=Cursor())
    read = ShardRead(shard, after=cursor)
    number = cursor.number
    if info.gone > cursor.number:
        # Entries numbered cursor.number+1 .. gone were trimmed. The blocking XREAD
        # before this read may still hold some of them: it began with the oldest
        # entry after the cursor at that time.
        ids = [entry.stream_id for entry in held]
        cut = None  # where the oldest entry Redis still holds sits in `held`
        if info.first_id is not None and info.first_id in ids:
            cut = ids.index(info.first_id)
        rescued = held if cut is None else held[:cut]
        first = info.gone + 1 - len(rescued)
        read.missed = max(0, first - cursor.number - 1)
        # without the oldest held entry in `held`, more may have gone unseen
        read.exact = cut is not None or not rescued
        number = first - 1
        if read.behind:
            read.skip_to = Cursor(cursor.id, number)
        for entry in rescued:
            number += 1
            read.entries.append((Cursor(entry.stream_id, number), entry))
        number = info.gone
    for entry in entries:
        number += 1
        read.entries.append((Cursor(entry.stream_id, number), entry))
    if read.entries:
        read.after = read.entries[-1][0]
    elif read.skip_to is not None:
        read.after = Cursor(cursor.id, info.gone)
    return read


class StreamReader:
    """Reads shard streams from cursors through a watcher's own connection."""

    def __init__(
        self,
        tail: StreamTail,
        shards: Sequence[int],
        cursors: Sequence[Cursor],
        count: int,
        block_ms: int,
        stopping: asyncio.Event,
    ) -> None:
        self.tail = tail
        self.shards = list(shards)
        self.cursors = list(cursors)
        self.count = count
        self.block_ms = block_ms
        self.stopping = stopping

    async def pull(self) -> list[ShardRead]:
        """The next reads with something to send (entries or a gap); waits for them."""
        held: list[list[StreamEntry]] | None = None
        while True:
            if self.stopping.is_set():
                raise Stopped
            infos, replies = await self.tail.read(self._positions(), self.count)
            reads = []
            for index, shard in enumerate(self.shards):
                read = advance(
                    shard, self.cursors[index], infos[index], replies[index],
                    held[index] if held else [],
                )
                self.cursors[index] = read.after
                if read.entries or read.behind:
                    reads.append(read)
            if reads:
                return reads
            held = await self.tail.wait(self._positions(), self.count, self.block_ms)

    def _positions(self) -> list[tuple[int, str]]:
        return [
            (shard, cursor.id) for shard, cursor in zip(self.shards, self.cursors, strict=True)
        ]
