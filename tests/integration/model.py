"""A plain-Python model of Tally's accounts, for the stateful property test.

It knows nothing of Redis or gRPC: it holds each account's grants, holds and
totals and says what every call must answer, straight from the design notes
and the semantics the Lua scripts document:

- grants are consumed earliest expiry first; among equal expiries
  ALLOTMENT before PROMOTIONAL before PURCHASE, then oldest first;
- a hold takes its units from the grants (ALLOW: the rest as held overage);
  a commit charges the first units it took and gives the rest back to the
  grants they came from; a refund gives units back newest-taken first;
  units given back to a grant that has expired since count as expired, and
  a grant dropped while exhausted, still valid, takes its units back through
  a live grant of its kind and expiry, or comes back (granted 0, as a new
  grant in the consumption order);
- a hold expires when now >= expires_at; a commit after that is late: it
  takes what the grants have and records the rest as overage;
- a new period's allotment appears when the account is touched in it; the
  old allotment expires; overage of the closed period is invoiced (it
  becomes granted units), and refunded later it comes back as a
  PROMOTIONAL credit (every credit in one live credit grant); exhausted grants
  leave the account at the period end;
- AUTO_PURCHASE buys packs so that after a spend `available` stays at or
  above the threshold, at most `overage_limit` units per period, into one
  live auto-purchase grant;
- idempotency records lapse `window_ms` after they were written (by the
  clock); the same key with another request is FAILED_PRECONDITION.

Every public operation is atomic: on a ModelError the model is left as it
was. The model is always "touched" up to `now_ms` (advance_to applies every
expiry and period change at once), as the server's scripts do before they
look at an account.
"""

from __future__ import annotations

import calendar
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, TypeVar

import grpc

DAY_MS = 86_400_000
NEVER_MS = 2**62  # sorts a grant without expiry after every dated one
KIND_RANK = {"ALLOTMENT": 1, "PROMOTIONAL": 2, "PURCHASE": 3}
AUTO_PACKS_MAX = 1000
EPOCH = date(1970, 1, 1)

HELD, COMMITTED, RELEASED, EXPIRED = "HELD", "COMMITTED", "RELEASED", "EXPIRED"
DENY, ALLOW, AUTO_PURCHASE = "DENY", "ALLOW", "AUTO_PURCHASE"


class ModelError(Exception):
    """The status the server must answer; for RESOURCE_EXHAUSTED also what it reports."""

    def __init__(
        self, code: grpc.StatusCode, *, available: int | None = None, required: int | None = None
    ) -> None:
        super().__init__(code.name)
        self.code = code
        self.available = available
        self.required = required


# --- calendar --------------------------------------------------------------


def _day(now_ms: int) -> date:
    return EPOCH + timedelta(days=now_ms // DAY_MS)


def day_of_month(now_ms: int) -> int:
    return _day(now_ms).day


def _anchor_ms(year: int, month: int, anchor_day: int) -> int:
    last_day = calendar.monthrange(year, month)[1]
    return (date(year, month, min(anchor_day, last_day)) - EPOCH).days * DAY_MS


def period_bounds(now_ms: int, anchor_day: int) -> tuple[int, int]:
    """[start, end) of the calendar-month period holding now, anchored at a day."""
    today = _day(now_ms)
    year, month = today.year, today.month
    if now_ms < _anchor_ms(year, month, anchor_day):
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return _anchor_ms(year, month, anchor_day), _anchor_ms(next_year, next_month, anchor_day)


# --- state -----------------------------------------------------------------


@dataclass
class Grant:
    grant_id: int
    seq: int
    kind: str
    units_granted: int
    units_remaining: int
    expires_at_ms: int  # 0: never
    reference: str = ""

    def order(self) -> tuple[int, int, int]:
        return (self.expires_at_ms or NEVER_MS, KIND_RANK[self.kind], self.seq)


@dataclass
class Move:
    """Units taken from one grant by a hold or a charge; `refunded` of them given back."""

    grant_id: int
    kind: str
    expires_at_ms: int
    units: int
    refunded: int = 0


@dataclass
class Reservation:
    account_id: str
    operation: str
    quantity: int
    unit_price: int
    units: int
    state: str
    expires_at_ms: int
    moves: list[Move]
    overage: int  # held as overage (ALLOW)
    from_charge: bool = False
    rid: str = ""
    units_charged: int = 0
    units_released: int = 0
    charged_quantity: int = 0
    charge_moves: list[Move] = field(default_factory=list)
    overage_charged: int = 0
    overage_refunded: int = 0
    units_refunded: int = 0
    charge_period_ms: int = 0
    late: bool = False
    closed_at_ms: int = 0  # an expired hold closed when it expired


@dataclass
class Account:
    account_id: str
    policy: str
    allotment: int
    overage_limit: int
    ap_units: int
    ap_threshold: int
    anchor_day: int
    period_start_ms: int
    period_end_ms: int
    grants: list[Grant] = field(default_factory=list)
    held: int = 0
    overage_held: int = 0
    overage_used: int = 0
    period_consumed: int = 0
    auto_purchased: int = 0
    total_granted: int = 0
    total_charged: int = 0
    total_refunded: int = 0
    total_expired: int = 0
    # the period the server has written to Redis (any successful write applies it)
    persisted_period_start_ms: int = 0

    def settings(self) -> tuple[int, str, int, int, int]:
        return (self.allotment, self.policy, self.overage_limit, self.ap_units, self.ap_threshold)

    def grants_remaining(self) -> int:
        return sum(g.units_remaining for g in self.grants)

    def available(self) -> int:
        return self.grants_remaining() - self.overage_used - self.overage_held

    def spendable(self) -> int:
        """What a reserve or charge may take now, overage headroom included."""
        if self.policy == ALLOW:
            headroom = self.overage_limit - self.overage_used - self.overage_held
            return self.grants_remaining() + max(0, headroom)
        return max(0, self.available())

    def find(self, grant_id: int) -> Grant | None:
        return next((g for g in self.grants if g.grant_id == grant_id), None)


@dataclass
class IdemRecord:
    fingerprint: tuple[Any, ...]
    expires_at_ms: int
    answer: Any = None  # the first response, kept by the test to compare replays
    rid: str = ""


@dataclass
class Outcome:
    """What a successful call must answer (the fields the model predicts)."""

    replay: IdemRecord | None = None  # an idempotent replay of this first call
    replayed: bool = False  # a commit answered again (by reservation id)
    reservation: Reservation | None = None
    units: int = 0
    units_released: int = 0
    overage_units: int = 0
    late: bool = False
    units_refundable: int = 0
    expires_at_ms: int = 0
    grant: Grant | None = None


T = TypeVar("T")


def atomic(method: Callable[..., T]) -> Callable[..., T]:
    """Runs a model operation all or nothing: a ModelError restores the state."""

    @functools.wraps(method)
    def wrapper(self: Model, *args: Any, **kwargs: Any) -> T:
        saved = copy.deepcopy(self.__dict__)
        try:
            return method(self, *args, **kwargs)
        except ModelError:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    return wrapper


class Model:
    def __init__(
        self, now_ms: int, prices: dict[str, int], idem_window_ms: int, retention_ms: int
    ) -> None:
        self.now_ms = now_ms
        self.prices = dict(prices)
        self.idem_window_ms = idem_window_ms
        self.retention_ms = retention_ms  # a reservation is NOT_FOUND this long after it closed
        self.accounts: dict[str, Account] = {}
        self.reservations: dict[str, Reservation] = {}
        self.idem: dict[tuple[str, str], IdemRecord] = {}
        self.seq = 0

    # --- helpers -------------------------------------------------------------

    def wrote(self, account_id: str) -> None:
        """The server wrote the account at now_ms: its current period is in Redis."""
        acct = self.accounts[account_id]
        acct.persisted_period_start_ms = acct.period_start_ms

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _add_grant(
        self, acct: Account, kind: str, units: int, expires_at_ms: int, granted: int | None = None,
        grant_id: int | None = None, reference: str = "",
    ) -> Grant:
        seq = self._next_seq()
        grant = Grant(seq if grant_id is None else grant_id, seq, kind,
                      units if granted is None else granted, units, expires_at_ms, reference)
        acct.grants.append(grant)
        acct.grants.sort(key=Grant.order)
        return grant

    def _merge_units(
        self, acct: Account, kind: str, units: int, expires_at_ms: int, granted: int,
        reference: str | None, new_reference: str = "", grant_id: int | None = None,
    ) -> None:
        """Units into the first live grant of that kind and expiry (and reference, unless
        None), else a new grant (the server's merge_units; the model never has GRANTS_MAX
        grants)."""
        for g in acct.grants:
            if (g.kind == kind and g.expires_at_ms == expires_at_ms
                    and reference in (None, g.reference)):
                g.units_granted += granted
                g.units_remaining += units
                return
        self._add_grant(acct, kind, units, expires_at_ms, granted=granted, grant_id=grant_id,
                        reference=new_reference if reference is None else reference)

    def _return_units(self, acct: Account, mv: Move, units: int) -> None:
        """Units back to the grant a move took them from (see the module notes)."""
        grant = acct.find(mv.grant_id)
        if grant is not None:
            grant.units_remaining += units
        elif mv.expires_at_ms == 0 or mv.expires_at_ms > self.now_ms:
            self._merge_units(acct, mv.kind, units, mv.expires_at_ms, granted=0, reference=None,
                              new_reference="restored", grant_id=mv.grant_id)
        else:
            acct.total_expired += units

    def _give_back(self, acct: Account, moves: list[Move]) -> None:
        for mv in reversed(moves):
            self._return_units(acct, mv, mv.units)

    def _take(self, acct: Account, units: int) -> tuple[list[Move], int]:
        moves = []
        for g in acct.grants:
            n = min(g.units_remaining, units)
            if n > 0:
                g.units_remaining -= n
                moves.append(Move(g.grant_id, g.kind, g.expires_at_ms, n))
                units -= n
        return moves, units

    def _release(self, acct: Account, res: Reservation, state: str) -> None:
        self._give_back(acct, res.moves)
        acct.held -= res.units
        acct.overage_held -= res.overage
        res.state = state
        res.closed_at_ms = res.expires_at_ms if state == EXPIRED else self.now_ms

    def _touch(self, acct: Account) -> None:
        for res in self.reservations.values():
            if (res.account_id == acct.account_id and res.state == HELD
                    and res.expires_at_ms <= self.now_ms):
                self._release(acct, res, EXPIRED)
        for g in list(acct.grants):
            if g.expires_at_ms and g.expires_at_ms <= self.now_ms:
                acct.total_expired += g.units_remaining
                acct.grants.remove(g)
        if self.now_ms < acct.period_end_ms:
            return
        acct.total_granted += acct.overage_used  # invoiced: paid units now
        acct.overage_used = 0
        acct.grants = [g for g in acct.grants if g.units_remaining > 0]
        acct.period_start_ms, acct.period_end_ms = period_bounds(self.now_ms, acct.anchor_day)
        acct.period_consumed = acct.auto_purchased = 0
        if acct.allotment > 0:
            self._add_grant(acct, "ALLOTMENT", acct.allotment, acct.period_end_ms)
            acct.total_granted += acct.allotment

    def _auto_pack_units(self, acct: Account, units: int) -> int:
        """Units AUTO_PURCHASE buys before spending `units` (0: none)."""
        if acct.policy != AUTO_PURCHASE or acct.ap_units <= 0:
            return 0
        after = acct.available() - units
        if after >= acct.ap_threshold:
            return 0
        packs = -(-(acct.ap_threshold - after) // acct.ap_units)
        cap_packs = (acct.overage_limit - acct.auto_purchased) // acct.ap_units
        return max(0, min(packs, cap_packs, AUTO_PACKS_MAX)) * acct.ap_units

    def _allocate(self, acct: Account, units: int) -> tuple[list[Move], int]:
        spendable_before = acct.spendable()
        bought = self._auto_pack_units(acct, units)
        if bought:
            self._merge_units(acct, "PURCHASE", bought, 0, bought, reference="auto-purchase")
            acct.total_granted += bought
            acct.auto_purchased += bought
        if units > acct.spendable():
            raise ModelError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, available=spendable_before, required=units
            )
        return self._take(acct, units)

    def _account(self, account_id: str) -> Account:
        acct = self.accounts.get(account_id)
        if acct is None:
            raise ModelError(grpc.StatusCode.NOT_FOUND)
        return acct

    def _price(self, operation: str) -> int:
        price = self.prices.get(operation)
        if price is None:
            raise ModelError(grpc.StatusCode.NOT_FOUND)
        return price

    def _idem(self, account_id: str, key: str, fingerprint: tuple[Any, ...]) -> IdemRecord | None:
        record = self.idem.get((account_id, key))
        if record is None or record.expires_at_ms <= self.now_ms:
            return None
        if record.fingerprint != fingerprint:
            raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
        return record

    def _remember(self, account_id: str, key: str, fingerprint: tuple[Any, ...]) -> IdemRecord:
        record = IdemRecord(fingerprint, self.now_ms + self.idem_window_ms)
        self.idem[(account_id, key)] = record
        return record

    def _reservation(self, rid: str) -> Reservation:
        res = self.reservations.get(rid)
        if res is None:
            raise ModelError(grpc.StatusCode.NOT_FOUND)
        closed_at_ms = res.expires_at_ms if res.state == HELD else res.closed_at_ms
        if closed_at_ms + self.retention_ms <= self.now_ms:
            raise ModelError(grpc.StatusCode.NOT_FOUND)
        return res

    # --- time ----------------------------------------------------------------

    def advance_to(self, now_ms: int) -> None:
        if now_ms < self.now_ms:
            raise ValueError("the model's clock never goes back")
        self.now_ms = now_ms
        for acct in self.accounts.values():
            self._touch(acct)

    # --- operations ----------------------------------------------------------

    @atomic
    def create_account(
        self, account_id: str, policy: str, allotment: int, overage_limit: int,
        ap_units: int, ap_threshold: int,
    ) -> bool:
        """Returns True when the same account already existed (a replay)."""
        if policy == AUTO_PURCHASE and ap_units <= 0:
            raise ModelError(grpc.StatusCode.INVALID_ARGUMENT)
        existing = self.accounts.get(account_id)
        if existing is not None:
            if existing.settings() != (allotment, policy, overage_limit, ap_units, ap_threshold):
                raise ModelError(grpc.StatusCode.ALREADY_EXISTS)
            return True
        anchor_day = day_of_month(self.now_ms)
        start_ms, end_ms = period_bounds(self.now_ms, anchor_day)
        acct = Account(account_id, policy, allotment, overage_limit, ap_units, ap_threshold,
                       anchor_day, start_ms, end_ms)
        if allotment > 0:
            self._add_grant(acct, "ALLOTMENT", allotment, end_ms)
            acct.total_granted = allotment
        self.accounts[account_id] = acct
        self.wrote(account_id)
        return False

    @atomic
    def update_account(
        self, account_id: str, policy: str, allotment: int, overage_limit: int,
        ap_units: int, ap_threshold: int,
    ) -> None:
        """A plan change: at once, except the allotment, which the next period uses."""
        acct = self._account(account_id)
        if policy == AUTO_PURCHASE and ap_units <= 0:
            raise ModelError(grpc.StatusCode.INVALID_ARGUMENT)
        acct.policy, acct.allotment, acct.overage_limit = policy, allotment, overage_limit
        acct.ap_units, acct.ap_threshold = ap_units, ap_threshold
        self.wrote(account_id)

    @atomic
    def reserve(
        self, account_id: str, operation: str, quantity: int, ttl_ms: int, key: str
    ) -> Outcome:
        quantity = quantity or 1
        acct = self._account(account_id)
        fingerprint = ("Reserve", account_id, operation, quantity, ttl_ms)
        replay = self._idem(account_id, key, fingerprint)
        if replay is not None:
            return Outcome(replay=replay)
        price = self._price(operation)
        units = price * quantity
        moves, short = self._allocate(acct, units)
        res = Reservation(account_id, operation, quantity, price, units, HELD,
                          self.now_ms + ttl_ms, moves, short)
        acct.held += units
        acct.overage_held += short
        self._remember(account_id, key, fingerprint)
        self.wrote(account_id)
        return Outcome(reservation=res, units=units, expires_at_ms=res.expires_at_ms)

    @atomic
    def charge(self, account_id: str, operation: str, quantity: int, key: str) -> Outcome:
        quantity = quantity or 1
        acct = self._account(account_id)
        fingerprint = ("Charge", account_id, operation, quantity)
        replay = self._idem(account_id, key, fingerprint)
        if replay is not None:
            return Outcome(replay=replay)
        price = self._price(operation)
        units = price * quantity
        moves, short = self._allocate(acct, units)
        res = Reservation(account_id, operation, quantity, price, units, COMMITTED, 0, [], 0,
                          closed_at_ms=self.now_ms, from_charge=True, units_charged=units,
                          charged_quantity=quantity, charge_moves=moves, overage_charged=short,
                          charge_period_ms=acct.period_start_ms)
        acct.overage_used += short
        acct.total_charged += units
        acct.period_consumed += units
        self._remember(account_id, key, fingerprint)
        self.wrote(account_id)
        return Outcome(reservation=res, units=units, overage_units=short)

    def bind(self, account_id: str, key: str, res: Reservation, rid: str, answer: Any) -> None:
        """Files a new reservation under the id the server gave it, with its first answer."""
        res.rid = rid
        self.reservations[rid] = res
        record = self.idem[(account_id, key)]
        record.rid, record.answer = rid, answer

    def keep_answer(self, account_id: str, key: str, answer: Any) -> None:
        self.idem[(account_id, key)].answer = answer

    @atomic
    def commit(self, rid: str, quantity: int | None) -> Outcome:
        res = self._reservation(rid)
        acct = self.accounts[res.account_id]
        wanted = res.quantity if quantity is None else quantity
        if wanted > res.quantity:
            raise ModelError(grpc.StatusCode.INVALID_ARGUMENT)
        if res.state == COMMITTED:
            if wanted != res.charged_quantity:
                raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
            return Outcome(reservation=res, units=res.units_charged,
                           units_released=res.units_released, overage_units=res.overage_charged,
                           late=res.late, replayed=True)
        if res.state == RELEASED:
            raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
        units = res.unit_price * wanted
        if res.state == EXPIRED:
            moves, short = self._take(acct, units)
            late, released = True, 0
        else:
            from_grants = min(units, res.units - res.overage)
            moves, rest = _split(res.moves, from_grants)
            self._give_back(acct, rest)
            acct.held -= res.units
            acct.overage_held -= res.overage
            short, late, released = units - from_grants, False, res.units - units
        acct.overage_used += short
        acct.total_charged += units
        acct.period_consumed += units
        res.state, res.late, res.units_released = COMMITTED, late, released
        res.closed_at_ms = self.now_ms
        res.units_charged, res.charged_quantity, res.charge_moves = units, wanted, moves
        res.overage_charged, res.charge_period_ms = short, acct.period_start_ms
        self.wrote(res.account_id)
        return Outcome(reservation=res, units=units, units_released=released,
                       overage_units=short, late=late)

    @atomic
    def refund(self, account_id: str, rid: str, units: int | None, key: str) -> Outcome:
        fingerprint = ("Refund", rid, -1 if units is None else units)
        replay = self._idem(account_id, key, fingerprint)
        if replay is not None:
            return Outcome(replay=replay)
        res = self._reservation(rid)
        acct = self.accounts[res.account_id]
        refunded = 0
        if res.state == HELD:
            if units is not None and units != res.units:
                raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
            self._release(acct, res, RELEASED)
            refunded = res.units
        elif res.state == COMMITTED:
            refundable = res.units_charged - res.units_refunded
            wanted = refundable if units is None else units
            if wanted > refundable:
                raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
            self._refund_charge(acct, res, wanted)
            refunded = wanted
        elif units is not None:
            raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
        refundable_after = 0
        if res.state == COMMITTED:
            refundable_after = res.units_charged - res.units_refunded
        self._remember(account_id, key, fingerprint)
        self.wrote(account_id)
        return Outcome(reservation=res, units=refunded, units_refundable=refundable_after)

    def _refund_charge(self, acct: Account, res: Reservation, units: int) -> None:
        same_period = res.charge_period_ms == acct.period_start_ms
        from_overage = min(units, res.overage_charged - res.overage_refunded)
        res.overage_refunded += from_overage
        if from_overage and same_period:
            acct.overage_used -= from_overage
        elif from_overage:
            self._merge_units(acct, "PROMOTIONAL", from_overage, 0, from_overage,
                              reference="refund credit")
        rest = units - from_overage
        for mv in reversed(res.charge_moves):
            n = min(mv.units - mv.refunded, rest)
            if n <= 0:
                continue
            mv.refunded += n
            rest -= n
            self._return_units(acct, mv, n)
        res.units_refunded += units
        acct.total_refunded += units
        if same_period:
            acct.period_consumed -= units

    @atomic
    def purchase(self, account_id: str, units: int, expires_at_ms: int, key: str) -> Outcome:
        acct = self._account(account_id)
        fingerprint = ("PurchaseUnits", units, expires_at_ms)
        replay = self._idem(account_id, key, fingerprint)
        if replay is not None:
            return Outcome(replay=replay)
        if expires_at_ms and expires_at_ms <= self.now_ms:
            raise ModelError(grpc.StatusCode.INVALID_ARGUMENT)
        grant = self._add_grant(acct, "PURCHASE", units, expires_at_ms)
        acct.total_granted += units
        self._remember(account_id, key, fingerprint)
        self.wrote(account_id)
        return Outcome(grant=copy.copy(grant))

    @atomic
    def extend(self, rid: str, ttl_ms: int) -> Outcome:
        res = self._reservation(rid)
        if res.state != HELD:
            raise ModelError(grpc.StatusCode.FAILED_PRECONDITION)
        res.expires_at_ms = self.now_ms + ttl_ms
        self.wrote(res.account_id)
        return Outcome(reservation=res, units=res.units, expires_at_ms=res.expires_at_ms)

    @atomic
    def quote(self, account_id: str, operation: str, quantity: int) -> tuple[int, bool, int]:
        """(units, affordable, available); moves nothing (the packs are not bought)."""
        acct = self._account(account_id)
        units = self._price(operation) * (quantity or 1)
        spendable_before = acct.spendable()
        probe = copy.deepcopy(acct)
        bought = self._auto_pack_units(probe, units)
        probe.grants.append(Grant(0, 0, "PURCHASE", bought, bought, 0))
        return units, units <= probe.spendable(), spendable_before


def _split(moves: list[Move], units: int) -> tuple[list[Move], list[Move]]:
    """The first `units` of a hold's moves (charged) and the rest (given back)."""
    charged, rest = [], []
    for mv in moves:
        n = min(mv.units, units)
        if n > 0:
            charged.append(Move(mv.grant_id, mv.kind, mv.expires_at_ms, n))
        if mv.units - n > 0:
            rest.append(Move(mv.grant_id, mv.kind, mv.expires_at_ms, mv.units - n))
        units -= n
    return charged, rest
