"""The watch's cursor arithmetic: what a read from a cursor missed, and where it resumes."""

from __future__ import annotations

from tally.api.watch.positions import decode_token, encode_token
from tally.api.watch.reader import Cursor, advance
from tally.domain.events import StreamEntry, decode
from tally.store.stream_tail import StreamInfo


def entry(stream_id: str, seq: int) -> StreamEntry:
    return decode(0, stream_id, {b"type": b"charge", b"event_id": f"a/{seq}".encode()})


def info(added: int, length: int, first_id: str | None, last_id: str) -> StreamInfo:
    return StreamInfo(added=added, length=length, first_id=first_id, last_id=last_id)


def numbered(read_entries: list[tuple[Cursor, StreamEntry]]) -> list[tuple[str, int]]:
    return [(cursor.id, cursor.number) for cursor, _ in read_entries]


def test_entries_after_a_complete_cursor_are_numbered_on_from_it() -> None:
    """Proves a cursor at or past the trimmed prefix misses nothing: the next entries
    get the following numbers and the cursor moves to the last one."""
    read = advance(0, Cursor("10-0", 3), info(5, 3, "10-0", "12-0"),
                   [entry("11-0", 4), entry("12-0", 5)], [])
    assert not read.behind and read.missed == 0
    assert numbered(read.entries) == [("11-0", 4), ("12-0", 5)]
    assert read.after == Cursor("12-0", 5)


def test_nothing_new_keeps_the_cursor() -> None:
    """Proves a read that finds nothing and missed nothing leaves the cursor where it was."""
    read = advance(0, Cursor("12-0", 5), info(5, 3, "10-0", "12-0"), [], [])
    assert not read.behind and read.entries == [] and read.after == Cursor("12-0", 5)


def test_trimmed_entries_are_counted_exactly_and_skipped() -> None:
    """Proves entries trimmed after the cursor (numbers up to added - length) are
    counted as missed, the skip position is after them, and the rest follow."""
    # 10 added, 4 left (numbers 7..10): numbers 3..6 are gone for a cursor at 2
    read = advance(0, Cursor("2-0", 2), info(10, 4, "7-0", "10-0"),
                   [entry("7-0", 7), entry("8-0", 8)], [])
    assert read.behind and read.exact and read.missed == 4 and not read.reset
    assert read.skip_to == Cursor("2-0", 6)
    assert numbered(read.entries) == [("7-0", 7), ("8-0", 8)]
    assert read.after == Cursor("8-0", 8)


def test_a_trim_with_nothing_left_resumes_after_the_trimmed_prefix() -> None:
    """Proves a stream trimmed empty behind the cursor moves the cursor's number to the
    trimmed prefix, so the same entries are not counted missed twice."""
    read = advance(0, Cursor("2-0", 2), info(6, 0, None, "6-0"), [], [])
    assert read.missed == 4 and read.after == Cursor("2-0", 6)


def test_entries_held_from_a_blocking_read_are_rescued() -> None:
    """Proves entries a blocking XREAD returned before they were trimmed are sent
    rather than missed: only what lies between them and the oldest kept entry is."""
    held = [entry("3-0", 3), entry("4-0", 4), entry("7-0", 7)]
    # numbers 3..6 gone; the oldest kept entry (7-0) is in the held reply
    read = advance(0, Cursor("2-0", 2), info(8, 2, "7-0", "8-0"), [entry("7-0", 7),
                   entry("8-0", 8)], held)
    assert read.exact and read.missed == 2  # 3 and 4 rescued as 5 and 6: 2 unseen before
    assert [c.number for c, _ in read.entries] == [5, 6, 7, 8]
    assert read.after == Cursor("8-0", 8)


def test_held_entries_without_the_oldest_kept_one_make_the_count_inexact() -> None:
    """Proves that when the blocking read's reply does not reach the oldest kept entry,
    the missed count is only a lower bound (not exact)."""
    held = [entry("3-0", 3)]
    read = advance(0, Cursor("2-0", 2), info(8, 2, "7-0", "8-0"), [entry("7-0", 7)], held)
    assert not read.exact and read.behind
    assert numbered(read.entries)[0] == ("3-0", 6)


def test_a_recreated_stream_is_read_from_its_start() -> None:
    """Proves a cursor beyond what the stream ever held (Redis wiped or restored)
    reports a reset and restarts from the beginning."""
    for stream in (info(2, 2, "1-0", "2-0"), info(9, 2, "1-0", "2-0")):
        read = advance(0, Cursor("5-0", 5), stream, [entry("1-0", 1)], [])
        assert read.reset and read.behind and read.entries == []
        assert read.after == Cursor() and read.skip_to == Cursor()


def test_all_accounts_tokens_round_trip() -> None:
    """Proves an all-accounts position decodes to the cursors it was made of."""
    cursors = [Cursor("1700000000000-3", 42), Cursor()]
    assert decode_token(encode_token(cursors), 2) == cursors
