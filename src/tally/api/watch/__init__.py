"""WatchUsage: a live, resumable server stream of an account's (or every account's) events.

Every writing Lua script appends the events it caused to its shard's Redis Stream
(`tally:{sNN}:events`); the flusher copies them to the ledger, then trims what the
ledger has from the stream (never anything else). A watch only reads: the streams,
and the ledger for what was already trimmed. The hot path never waits for a watcher.

One account (`account_id` set)
    `position` is the account's event number n (event ids are `<account>/<n>`,
    numbered 1, 2, 3... per account), as decimal text.
    `after_position` empty: from now (only events that happen after the call).
    `"N"`: first every event with n > N (`"0"`: the whole history), then live.
    Events arrive exactly once, in order, without a gap (n grows by 1): those already
    flushed and trimmed from Redis come from the ledger, the rest from the stream. A
    reader slower than the flusher (its next events were trimmed before it read them)
    catches up from the ledger the same way, transparently. A position beyond the
    account's last event is INVALID_ARGUMENT; an unknown account NOT_FOUND.
    Every event type of the account is sent (reserve, commit, late_commit, release,
    expire, refund, charge, purchase, allotment, allotment_expire, grant_expire,
    overage, plan_change, extend, alert...); entries without an account
    (price_change) are not.

Every account (`account_id` empty; meant for admins)
    `position` is an opaque token: per shard, the id of the last stream entry
    delivered and its number in the stream's history (XINFO `entries-added`).
    `after_position` empty: from now; a token: resume right after it.
    Limitation: this watch reads Redis only, so it can resume only while Redis still
    holds the entries after its position. When some of them were already flushed to
    the ledger and trimmed (an old position, a reader slower than the flush interval,
    a Redis wiped or restored from the ledger) it first sends one event of type
    `fell_behind`, whose `alert` says which shards and how many events were missed,
    then continues from the oldest entry Redis still holds. The missed events are in
    the ledger (ListLedgerEntries, or a single-account watch resumed from the last
    position seen for that account). Missed entries are counted exactly: numbers up to
    `entries-added - length` are gone (the flusher only trims a prefix), read in the
    same MULTI as the entries. Events of one shard (so of one account) arrive in
    order; across shards roughly in time order. price_change events (shard 0) come
    with an empty account_id. In a Redis Cluster the one XREAD over every shard
    stream would have to become one per node.

Bounds and flow control
    Reading is pull-based: the next read from Redis (at most `batch` entries per
    stream) or from the ledger (at most `batch` rows) happens only once gRPC has
    taken every event of the previous one, so HTTP/2 flow control holds a slow
    reader back through `yield`; a watcher holds at most one batch (and one ledger
    page), nothing is queued for it anywhere else, and falling behind costs it a
    ledger read (or a `fell_behind`), never the hot path anything.
    Each watch has its own Redis connection, opened with the store's settings but
    outside the store's pool (a blocking XREAD holds its connection for up to
    `block_ms`; watchers must never take connections the hot path needs), and closed
    when the stream ends. At most `max_watchers` watches run at once per server;
    beyond that WatchUsage answers RESOURCE_EXHAUSTED. An idle watch blocks in XREAD
    for at most `block_ms` (1 s, and below the Redis socket timeout) at a time. At
    most LEDGER_READS_MAX watches read the ledger at once (a page each).
    `stop()` (at shutdown) ends every watch within `block_ms` with UNAVAILABLE.
    Needs Redis 7.0+ (`entries-added`), as do the scripts' `#!lua` flags.

Modules
    positions (the two position codecs), reader (cursor arithmetic over the shard
    streams: what was missed, where to resume), service (admission, the two
    algorithms, metrics). Redis is spoken by store/stream_tail.py (`StreamTail`).

Initial metadata
    Once the watch is positioned (after validation, before the first event) the
    server sends initial metadata `tally-position`: the position it starts after.
    Every event that happens after a client has received it is in the stream, and a
    client that gets no event can still resume from it.
"""

from __future__ import annotations

from tally.api.watch.service import POSITION_METADATA, UsageWatch

__all__ = ["POSITION_METADATA", "UsageWatch"]
