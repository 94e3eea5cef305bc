"""Key layout: the one place key names are written.

Accounts map onto a fixed number of virtual shards (crc32(account_id) %
shards). Every key one script touches carries its shard's hash tag (the prefix
below, e.g. `{s07}`; store/layout.py says which tags a deployment has), so it
lives in one Redis Cluster hash slot.

The templates are data: KeySpace formats them in Python, and the script
composer (store/scripts.py) generates Lua builders from the same templates
for the names the scripts build themselves (LUA_BUILT).

An idempotency record's name carries a fixed-length digest of the account id
and the caller's key, never the key itself: a caller's key cannot shape a key
name (`x}:acct:ghost` would otherwise look like an account to a SCAN).
A reservation id is `<shard tag>.<sequence>.<account id>`: Commit and Refund
need nothing else to find every key. The store makes the sequence before the
call (ReservationIds), so that the record's key is one the script declares.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from dataclasses import dataclass

from tally.domain.errors import InvalidArgument
from tally.domain.ids import ACCOUNT_ID, SEQUENCE
from tally.store.layout import ShardLayout

# Deployment facts (the shard layout, tally/deployment.py); never used by scripts.
META_KEY = "tally:meta"
# Bearer tokens: one hash (token id -> record), so one hash slot; never used by scripts.
TOKENS_KEY = "tally:{auth}:tokens"


@dataclass(frozen=True)
class NameTemplate:
    """How one kind of name is written. `pattern` is a str.format pattern:
    `{field}` is text, `{field:d}` an integer. `name` is what the generated
    Lua builder is called (its parameters are the fields, in order)."""

    name: str
    pattern: str

    def format(self, **fields: str | int) -> str:
        return self.pattern.format(**fields)


# Every key starts with its shard's prefix (the hash tag).
SHARD_PREFIX = NameTemplate("shard_prefix", "tally:{{{tag}}}:")
# account blob (settings, grants, totals)
ACCOUNT_KEY = NameTemplate("account_key", "{prefix}acct:{account_id}")
# zset of the account's open holds by expiry
HOLDS_KEY = NameTemplate("holds_key", "{prefix}holds:{account_id}")
# a closed reservation's record, kept for the closed window
RESERVATION_KEY = NameTemplate("reservation_key", "{prefix}res:{reservation_id}")
# hash of the account's held reservations' records (reservation id -> record), and of
# those a script expired without naming them, until the reaper moves them to their
# own key (store/lua/lib/holds.lua)
HELD_KEY = NameTemplate("held_key", "{prefix}held:{account_id}")
# idempotency record (fingerprint + the call's figures), by idempotency_digest().
# The most numerous key (one per call, kept the idempotency window), so its name
# is short: `tally:{s07}:i:` and 14 digest characters are 28 bytes, which Redis
# keeps in a 32-byte allocation (29 to 44 bytes would take 48); tags are never
# longer than 3 characters under SLOT_RANGE for that reason (store/layout.py).
IDEMPOTENCY_KEY = NameTemplate("idempotency_key", "{prefix}i:{digest}")
# Bytes of BLAKE2b in an idempotency record's name: 80 bits, 14 base64url
# characters. Two (account, key) pairs share a name only if their digests
# collide while both records live in one shard: with n records live (86.4
# million at 1,000 calls/s over a 24 h window, all in one shard at worst) a new
# key meets one with probability n / 2^80 < 1e-16, about once in 400,000 years
# at 1,000 calls/s. Even then the stored fingerprint (64 bits) tells the two
# requests apart: the later call is refused (FAILED_PRECONDITION), never answered
# with the other's figures.
IDEMPOTENCY_DIGEST_BYTES = 10
# one of the account's two usage counter slots (0, 1), each holding one billing
# period's counters (store/lua/lib/usage.lua)
USAGE_KEY = NameTemplate("usage_key", "{prefix}usage:{account_id}:{slot:d}")
USAGE_SLOTS = 2
# zset of the shard's open holds (the reaper's work)
EXPIRIES_KEY = NameTemplate("expiries_key", "{prefix}expiries")
# zset of the shard's accounts by when their next closing is due: the end of
# their billing period or an earlier grant expiry (the period sweeper's work)
CLOSINGS_KEY = NameTemplate("closings_key", "{prefix}closings")
# the shard's event stream
EVENTS_KEY = NameTemplate("events_key", "{prefix}events")
# the shard's copy of the price catalog
PRICES_KEY = NameTemplate("prices_key", "{prefix}prices")
# every price version, for quoted reserves
PRICE_HISTORY_KEY = NameTemplate("price_history_key", "{prefix}price_history")
# the shard's fence {epoch, count}: what a Redis that lost writes is told apart by
# (store/lua/lib/fence.lua)
FENCE_KEY = NameTemplate("fence_key", "{prefix}fence")
# catalog version counter (shard 0 is authoritative)
CATALOG_KEY = NameTemplate("catalog_key", "{prefix}catalog")
# a field of the price history hash: the price of one version of an operation
PRICE_VERSION_FIELD = NameTemplate("price_version_field", "{operation}@{version:d}")
# A per-shard job's lease (store/leases.py: the reaper's, the sweeper's), in the
# shard's slot: a hash {owner, lapses_at}
SHARD_LEASE_KEY = NameTemplate("shard_lease_key", "{prefix}lease:{job}")
# A global job's lease (snapshots, pruning, start-up work): one key each
LEASE_KEY = NameTemplate("lease_key", "tally:{{lease}}:{job}")
# The live processes of a per-shard job (zset owner -> lapses_at): its fair share's count
LEASE_MEMBERS_KEY = NameTemplate("lease_members_key", "tally:{{lease}}:members:{job}")
# A reservation id names its shard and account, so it finds every key alone.
RESERVATION_ID = NameTemplate("reservation_id_for", "{tag}.{sequence:d}.{account_id}")

# Names the scripts write themselves (from the shard tag they are given), none
# of them a key: a reservation id (a value) and a field of the price history.
# The store passes every key a script touches in KEYS.
LUA_BUILT = (RESERVATION_ID, PRICE_VERSION_FIELD)


# Accounts whose shard and keys KeySpace keeps formatted (about 800 bytes each);
# past that the cache starts over.
ACCOUNTS_CACHED = 100_000


@dataclass(frozen=True)
class ReservationRef:
    shard: int
    account_id: str
    reservation_id: str


class KeySpace:
    def __init__(self, layout: ShardLayout) -> None:
        self.layout = layout
        self.shards = layout.shards
        # Formatted once: every call names its shard's tag and prefix.
        self._tags = layout.tags()
        self._prefixes = tuple(SHARD_PREFIX.format(tag=tag) for tag in self._tags)
        self._prices = tuple(PRICES_KEY.format(prefix=p) for p in self._prefixes)
        self._price_history = tuple(PRICE_HISTORY_KEY.format(prefix=p) for p in self._prefixes)
        self._events = tuple(EVENTS_KEY.format(prefix=p) for p in self._prefixes)
        self._expiries = tuple(EXPIRIES_KEY.format(prefix=p) for p in self._prefixes)
        self._closings = tuple(CLOSINGS_KEY.format(prefix=p) for p in self._prefixes)
        self._fences = tuple(FENCE_KEY.format(prefix=p) for p in self._prefixes)
        self._accounts: dict[str, tuple[int, tuple[str, ...]]] = {}

    def shard_of(self, account_id: str) -> int:
        cached = self._accounts.get(account_id)
        if cached is not None:
            return cached[0]
        return zlib.crc32(account_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return self._tags[shard]

    def prefix(self, shard: int) -> str:
        return self._prefixes[shard]

    def account_keys(self, account_id: str) -> list[str]:
        """KEYS 1-9 shared by every account script (store/lua/lib/context.lua,
        new_ctx): account blob, holds zset, the shard's expiries, events,
        closings and fence, the account's usage counter slots and held
        reservations hash. Kept for the
        ACCOUNTS_CACHED accounts last asked: most calls are for an account
        called before."""
        cached = self._accounts.get(account_id)
        if cached is None:
            shard = zlib.crc32(account_id.encode()) % self.shards
            p = self._prefixes[shard]
            cached = shard, (
                ACCOUNT_KEY.format(prefix=p, account_id=account_id),
                HOLDS_KEY.format(prefix=p, account_id=account_id),
                self._expiries[shard],
                self._events[shard],
                self._closings[shard],
                self._fences[shard],
                *(USAGE_KEY.format(prefix=p, account_id=account_id, slot=slot)
                  for slot in range(USAGE_SLOTS)),
                HELD_KEY.format(prefix=p, account_id=account_id),
            )
            if len(self._accounts) >= ACCOUNTS_CACHED:
                self._accounts.clear()
            self._accounts[account_id] = cached
        return list(cached[1])

    def holder_keys(self, account_id: str) -> list[str]:
        """A batch item's account keys (store/lua/lib/batch.lua): account blob,
        holds zset, the account's usage counter slots and held reservations hash."""
        keys = self.account_keys(account_id)
        return [keys[0], keys[1], *keys[6:9]]

    def idempotency(self, account_id: str, key: str) -> str:
        return IDEMPOTENCY_KEY.format(
            prefix=self.prefix(self.shard_of(account_id)),
            digest=idempotency_digest(account_id, key),
        )

    def usage_slots(self, account_id: str) -> list[str]:
        """The account's two usage counter slots (each holds one billing period's
        counters, store/lua/lib/usage.lua)."""
        return self.account_keys(account_id)[6:8]

    def held(self, account_id: str) -> str:
        """The account's held reservations hash (reservation id -> record)."""
        return self.account_keys(account_id)[8]

    def reservation(self, reservation_id: str) -> str:
        ref = self.parse_reservation_id(reservation_id)
        return self.reservation_in(ref.shard, reservation_id)

    def reservation_in(self, shard: int, reservation_id: str) -> str:
        """A reservation's key, its id already known to be of this shard."""
        return RESERVATION_KEY.format(prefix=self.prefix(shard), reservation_id=reservation_id)

    def prices(self, shard: int) -> str:
        return self._prices[shard]

    def price_history(self, shard: int) -> str:
        return self._price_history[shard]

    @staticmethod
    def price_version_field(operation: str, version: int) -> str:
        """The price history's field for one version of an operation's price."""
        return PRICE_VERSION_FIELD.format(operation=operation, version=version)

    @staticmethod
    def price_version_of(field: str) -> tuple[str, int]:
        """(operation, version) of a price history field (operations hold no '@')."""
        operation, _, version = field.rpartition("@")
        return operation, int(version)

    def catalog_meta(self) -> str:
        return CATALOG_KEY.format(prefix=self.prefix(0))

    def events(self, shard: int) -> str:
        return self._events[shard]

    def fence(self, shard: int) -> str:
        return self._fences[shard]

    def expiries(self, shard: int) -> str:
        return self._expiries[shard]

    def closings(self, shard: int) -> str:
        return self._closings[shard]

    def shard_lease(self, shard: int, job: str) -> str:
        return SHARD_LEASE_KEY.format(prefix=self.prefix(shard), job=job)

    @staticmethod
    def lease(job: str) -> str:
        return LEASE_KEY.format(job=job)

    @staticmethod
    def lease_members(job: str) -> str:
        return LEASE_MEMBERS_KEY.format(job=job)

    def parse_reservation_id(self, reservation_id: str) -> ReservationRef:
        parts = reservation_id.split(".", 2)
        if (
            len(parts) != 3
            or not SEQUENCE.fullmatch(parts[1])
            or not ACCOUNT_ID.fullmatch(parts[2])
        ):
            raise InvalidArgument(
                "reservation_id is malformed (expected <shard>.<seq>.<account>)",
                field_name="reservation_id",
            )
        account_id = parts[2]
        shard = self.shard_of(account_id)
        if parts[0] != self.tag(shard):
            raise InvalidArgument(
                "reservation_id does not belong to this deployment's shards",
                field_name="reservation_id",
            )
        return ReservationRef(shard=shard, account_id=account_id, reservation_id=reservation_id)

    def account_pattern(self) -> str:
        """A SCAN pattern matching the account key of every account of every shard."""
        return "tally:{*}:acct:*"

    def account_id_of(self, account_key: str) -> str:
        """The account id an account key names."""
        return account_key.split(":acct:", 1)[1]


def idempotency_digest(account_id: str, key: str) -> str:
    """The account's idempotency key as a fixed-length name part (base64url, no
    padding). Account ids hold no NUL, so (account, key) pairs never collide."""
    digest = hashlib.blake2b(
        f"{account_id}\0{key}".encode(), digest_size=IDEMPOTENCY_DIGEST_BYTES
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
