"""Key layout. Every key of an account carries its virtual shard's hash tag.

Accounts map onto a fixed number of virtual shards (crc32(account_id) %
shards). Every key one script touches carries the same `{sNN}` hash tag, so
it lives in one Redis Cluster hash slot:

    tally:{s07}:acct:<account>        account blob (settings, grants, totals)
    tally:{s07}:holds:<account>       zset of the account's open holds by expiry
    tally:{s07}:res:<reservation>     reservation record
    tally:{s07}:idem:<account>:<key>  idempotency record (fingerprint + answer)
    tally:{s07}:expiries              zset of the shard's open holds (the reaper's work)
    tally:{s07}:events                the shard's event stream
    tally:{s07}:prices                the shard's copy of the price catalog
    tally:{s07}:price_history         every price version, for quoted reserves
    tally:{s07}:usage:<account>:<ms>  usage counters of the billing period starting at <ms>
    tally:{s00}:catalog               catalog version counter (shard 0 is authoritative)
    tally:meta                        deployment facts (shard count); never used by scripts

Account ids cannot contain ':' so the idempotency key's name is unambiguous.
A reservation id is `<shard tag>.<sequence>.<account id>`: Commit and Refund
need nothing else to find every key.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from tally.domain.errors import InvalidArgument
from tally.domain.ids import ACCOUNT_ID, SEQUENCE

META_KEY = "tally:meta"


@dataclass(frozen=True)
class ReservationRef:
    shard: int
    account_id: str
    reservation_id: str


class KeySpace:
    def __init__(self, shards: int) -> None:
        if not 1 <= shards <= 4096:
            raise ValueError(f"shards must be between 1 and 4096, got {shards}")
        self.shards = shards
        self._width = max(2, len(str(shards - 1)))

    def shard_of(self, account_id: str) -> int:
        return zlib.crc32(account_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"s{shard:0{self._width}d}"

    def prefix(self, shard: int) -> str:
        return f"tally:{{{self.tag(shard)}}}:"

    def account_keys(self, account_id: str) -> list[str]:
        """KEYS 1-4 shared by every account script."""
        p = self.prefix(self.shard_of(account_id))
        return [f"{p}acct:{account_id}", f"{p}holds:{account_id}", f"{p}expiries", f"{p}events"]

    def idempotency(self, account_id: str, key: str) -> str:
        return f"{self.prefix(self.shard_of(account_id))}idem:{account_id}:{key}"

    def usage(self, account_id: str, period_start_ms: int) -> str:
        """The account's usage counters of one billing period (kept by the scripts)."""
        return f"{self.prefix(self.shard_of(account_id))}usage:{account_id}:{period_start_ms}"

    def reservation(self, reservation_id: str) -> str:
        ref = self.parse_reservation_id(reservation_id)
        return f"{self.prefix(ref.shard)}res:{reservation_id}"

    def prices(self, shard: int) -> str:
        return f"{self.prefix(shard)}prices"

    def price_history(self, shard: int) -> str:
        return f"{self.prefix(shard)}price_history"

    def catalog_meta(self) -> str:
        return f"{self.prefix(0)}catalog"

    def events(self, shard: int) -> str:
        return f"{self.prefix(shard)}events"

    def expiries(self, shard: int) -> str:
        return f"{self.prefix(shard)}expiries"

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
