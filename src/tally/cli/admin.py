"""Admin commands: accounts, purchases, prices and balances, over gRPC.

Every command takes `--target` (default: $TALLY_TARGET, else 127.0.0.1:50051),
`--timeout` (seconds) and `--json`. Without `--json` the answer is an aligned
plain-text table; with it, one JSON object on stdout. A refused call prints
`tally: <CODE>: <details>` on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tally.cli import output
from tally.v1 import (
    account_pb2,
    account_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    common_pb2,
    quota_pb2,
    quota_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
# Calls whose outcome is unknown to the caller: a purchase may have happened.
AMBIGUOUS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
POLICIES: dict[str, common_pb2.OveragePolicy.ValueType] = {
    "deny": common_pb2.OVERAGE_POLICY_DENY,
    "allow": common_pb2.OVERAGE_POLICY_ALLOW,
    "auto_purchase": common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
}

Handler = Callable[[argparse.Namespace, "Api"], int]


# --- argument types (a bad value is a usage error: exit 2) -------------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _policy(text: str) -> common_pb2.OveragePolicy.ValueType:
    name = text.strip().lower().replace("-", "_")
    if name not in POLICIES:
        raise argparse.ArgumentTypeError(
            f"invalid policy {text!r} (choose from {', '.join(POLICIES)})"
        )
    return POLICIES[name]


def _timestamp(text: str) -> Timestamp:
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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


# --- the connection ----------------------------------------------------------


@dataclass
class Api:
    """Blocking stubs on one channel, with the per-call timeout."""

    channel: grpc.Channel
    timeout_s: float

    @property
    def accounts(self) -> account_pb2_grpc.AccountServiceStub:
        return account_pb2_grpc.AccountServiceStub(self.channel)

    @property
    def quota(self) -> quota_pb2_grpc.QuotaServiceStub:
        return quota_pb2_grpc.QuotaServiceStub(self.channel)

    @property
    def catalog(self) -> catalog_pb2_grpc.CatalogServiceStub:
        return catalog_pb2_grpc.CatalogServiceStub(self.channel)


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Api]:
    target = args.target or os.environ.get("TALLY_TARGET") or DEFAULT_TARGET
    channel = grpc.insecure_channel(target)
    try:
        yield Api(channel, args.timeout)
    finally:
        channel.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Wraps a handler: connects, and turns every gRPC error into one line."""

    def run(args: argparse.Namespace) -> int:
        try:
            with _connect(args) as api:
                return handler(args, api)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            print(f"tally: {code.name}: {_one_line(details or 'no details')}", file=sys.stderr)
            hint = getattr(args, "retry_hint", None)
            if hint and code in AMBIGUOUS:
                print(hint, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("tally: interrupted", file=sys.stderr)
            return 130

    return run


def _emit(args: argparse.Namespace, as_json: dict[str, Any], as_text: Callable[[], str]) -> None:
    print(output.dumps(as_json) if args.json else as_text())


# --- rendering ---------------------------------------------------------------


def _policy_name(value: int) -> str:
    return common_pb2.OveragePolicy.Name(common_pb2.OveragePolicy.ValueType(value))


def _account_rows(account: account_pb2.Account) -> list[tuple[str, object]]:
    return [
        ("account", account.account_id),
        ("monthly allotment", account.monthly_allotment),
        ("overage policy", _policy_name(account.overage_policy)),
        ("overage limit", account.overage_limit),
        ("auto-purchase units", account.auto_purchase_units),
        ("auto-purchase threshold", account.auto_purchase_threshold),
        ("billing anchor day", account.billing_anchor_day),
        ("labels", output.labels(account.labels)),
        ("created at", output.iso(account.created_at)),
        ("alerts", _alerts_text(account.alerts)),
        ("period", f"{output.iso(account.period_start)} .. {output.iso(account.period_end)}"),
    ]


def _alerts_text(alerts: common_pb2.AlertSettings) -> str:
    parts = [f"{p}% used" for p in alerts.allotment_used_percent]
    if alerts.balance_below:
        parts.append(f"below {alerts.balance_below}")
    if alerts.overage_started:
        parts.append("overage")
    return ", ".join(parts) or "-"


def _balance_rows(balance: common_pb2.Balance) -> list[tuple[str, object]]:
    return [
        ("available", balance.available),
        ("held", balance.held),
        ("overage used / limit", f"{balance.overage_used} / {balance.overage_limit}"),
        ("period start", output.iso(balance.period_start)),
        ("period end", output.iso(balance.period_end)),
        ("period consumed", balance.period_consumed),
    ]


def _grant_table(grants: Sequence[common_pb2.Grant]) -> str:
    if not grants:
        return "(no live grants)"
    return output.table(
        ["GRANT", "KIND", "GRANTED", "REMAINING", "EXPIRES", "REFERENCE"],
        [
            [
                g.grant_id,
                common_pb2.GrantKind.Name(g.kind),
                g.units_granted,
                g.units_remaining,
                output.iso(g.expires_at, unset="never"),
                g.reference or "-",
            ]
            for g in grants
        ],
    )


def _account_text(account: account_pb2.Account, note: str = "") -> str:
    text = output.fields(_account_rows(account))
    return f"{text}\n{note}" if note else text


# --- handlers ----------------------------------------------------------------


def _create(args: argparse.Namespace, api: Api) -> int:
    request = account_pb2.CreateAccountRequest(
        account_id=args.account_id,
        monthly_allotment=args.allotment,
        overage_policy=args.policy,
        overage_limit=args.overage_limit,
        labels=dict(args.label or []),
        auto_purchase_units=args.auto_purchase_units,
        auto_purchase_threshold=args.auto_purchase_threshold,
        billing_anchor_day=args.anchor_day,
        alerts=_alerts(args),
    )
    account = api.accounts.CreateAccount(request, timeout=api.timeout_s).account
    note = "(the account already existed with these settings; nothing changed)"
    _emit(
        args,
        output.message_dict(account),
        lambda: _account_text(account, note if account.replayed else ""),
    )
    return 0


def _show(args: argparse.Namespace, api: Api) -> int:
    account = api.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=args.account_id), timeout=api.timeout_s
    ).account
    balance = api.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=args.account_id), timeout=api.timeout_s
    ).balance

    def text() -> str:
        return "\n\n".join(
            [
                output.fields(_account_rows(account) + _balance_rows(balance)),
                _grant_table(balance.grants),
            ]
        )

    _emit(
        args,
        {"account": output.message_dict(account), "balance": output.message_dict(balance)},
        text,
    )
    return 0


def _update(args: argparse.Namespace, api: Api) -> int:
    request = account_pb2.UpdateAccountRequest(
        account_id=args.account_id,
        labels=dict(args.label or []),
        replace_labels=args.replace_labels,
    )
    if args.allotment is not None:
        request.monthly_allotment = args.allotment
    if args.policy is not None:
        request.overage_policy = args.policy
    if args.overage_limit is not None:
        request.overage_limit = args.overage_limit
    if args.auto_purchase_units is not None:
        request.auto_purchase_units = args.auto_purchase_units
    if args.auto_purchase_threshold is not None:
        request.auto_purchase_threshold = args.auto_purchase_threshold
    alerts = _alerts(args)
    if alerts is not None:
        request.alerts.CopyFrom(alerts)
    account = api.accounts.UpdateAccount(request, timeout=api.timeout_s).account
    _emit(args, output.message_dict(account), lambda: _account_text(account))
    return 0


def _purchase(args: argparse.Namespace, api: Api) -> int:
    key = args.idempotency_key or str(uuid.uuid4())
    if not args.idempotency_key:
        args.retry_hint = (
            f"tally: the purchase may or may not have been recorded; retry with "
            f"--idempotency-key {key} to apply it at most once"
        )
    request = account_pb2.PurchaseUnitsRequest(
        account_id=args.account_id,
        units=args.units,
        idempotency_key=key,
        reference=args.reference,
    )
    if args.expires_at is not None:
        request.expires_at.CopyFrom(args.expires_at)
    grant = api.accounts.PurchaseUnits(request, timeout=api.timeout_s).grant

    def text() -> str:
        return output.fields(
            [
                ("account", args.account_id),
                ("grant", grant.grant_id),
                ("kind", common_pb2.GrantKind.Name(grant.kind)),
                ("units granted", grant.units_granted),
                ("units remaining", grant.units_remaining),
                ("expires at", output.iso(grant.expires_at, unset="never")),
                ("reference", grant.reference or "-"),
                ("idempotency key", key),
            ]
        )

    _emit(
        args,
        {
            "account_id": args.account_id,
            "idempotency_key": key,
            "grant": output.message_dict(grant),
        },
        text,
    )
    return 0


def _price_table(prices: Sequence[catalog_pb2.Price]) -> str:
    return output.table(
        ["OPERATION", "UNITS/QTY", "VERSION", "EFFECTIVE AT"],
        [
            [p.operation, p.units_per_quantity, p.version, output.iso(p.effective_at)]
            for p in prices
        ],
    )


def _prices_list(args: argparse.Namespace, api: Api) -> int:
    reply = api.catalog.ListPrices(catalog_pb2.ListPricesRequest(), timeout=api.timeout_s)
    prices = sorted(reply.prices, key=lambda p: p.operation)

    def text() -> str:
        table = _price_table(prices) if prices else "(no prices)"
        return f"{table}\n\ncatalog version {reply.catalog_version}"

    _emit(args, output.message_dict(reply), text)
    return 0


def _prices_set(args: argparse.Namespace, api: Api) -> int:
    price = api.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(
            operation=args.operation, units_per_quantity=args.units_per_quantity
        ),
        timeout=api.timeout_s,
    ).price
    _emit(args, output.message_dict(price), lambda: _price_table([price]))
    return 0


def _balance(args: argparse.Namespace, api: Api) -> int:
    balance = api.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=args.account_id), timeout=api.timeout_s
    ).balance

    def text() -> str:
        head = output.fields([("account", balance.account_id), *_balance_rows(balance)])
        return f"{head}\n\n{_grant_table(balance.grants)}"

    _emit(args, output.message_dict(balance), text)
    return 0


def _ledger(args: argparse.Namespace, api: Api) -> int:
    """Every page of the account's entries (up to --limit), oldest first."""
    request = account_pb2.ListLedgerEntriesRequest(
        account_id=args.account_id, types=args.type or [], page_size=min(args.limit, 1000)
    )
    if args.start is not None:
        request.start.CopyFrom(args.start)
    if args.end is not None:
        request.end.CopyFrom(args.end)
    entries: list[account_pb2.LedgerEntry] = []
    while len(entries) < args.limit:
        reply = api.accounts.ListLedgerEntries(request, timeout=api.timeout_s)
        entries.extend(reply.entries)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    entries = entries[: args.limit]

    def text() -> str:
        if not entries:
            return "(no ledger entries)"
        return output.table(
            ["AT", "TYPE", "OPERATION", "QTY", "UNITS", "AVAILABLE AFTER", "RESERVATION"],
            [
                [
                    output.iso(e.occurred_at), e.type, e.operation or "-", e.quantity, e.units,
                    e.available_after, e.reservation_id or "-",
                ]
                for e in entries
            ],
        )

    _emit(
        args,
        {"account_id": args.account_id, "entries": [output.message_dict(e) for e in entries]},
        text,
    )
    return 0


def _budget_table(budgets: Sequence[common_pb2.Budget]) -> str:
    if not budgets:
        return "(no budgets)"
    return output.table(
        ["BUDGET", "LIMIT/PERIOD", "USED OR HELD", "LEFT"],
        [[b.budget_id, b.limit_units, b.used_units, max(0, b.limit_units - b.used_units)]
         for b in budgets],
    )


def _budgets_set(args: argparse.Namespace, api: Api) -> int:
    scope, _, rest = args.scope.partition(":")
    budget = common_pb2.Budget(limit_units=args.limit)
    if scope == "operation" and rest:
        budget.operation = rest
    elif scope == "label" and "=" in rest:
        budget.label_key, _, budget.label_value = rest.partition("=")
    else:
        print("tally: SCOPE is operation:<name> or label:<key>=<value>", file=sys.stderr)
        return 2
    reply = api.accounts.SetBudget(
        account_pb2.SetBudgetRequest(account_id=args.account_id, budget=budget),
        timeout=api.timeout_s,
    ).budget
    _emit(args, output.message_dict(reply), lambda: _budget_table([reply]))
    return 0


def _budgets_list(args: argparse.Namespace, api: Api) -> int:
    reply = api.accounts.ListBudgets(
        account_pb2.ListBudgetsRequest(account_id=args.account_id), timeout=api.timeout_s
    )
    _emit(args, output.message_dict(reply), lambda: _budget_table(reply.budgets))
    return 0


def _budgets_delete(args: argparse.Namespace, api: Api) -> int:
    reply = api.accounts.DeleteBudget(
        account_pb2.DeleteBudgetRequest(account_id=args.account_id, budget_id=args.budget_id),
        timeout=api.timeout_s,
    ).budget
    _emit(args, output.message_dict(reply), lambda: f"deleted {reply.budget_id}")
    return 0


def _anchored(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _period_bounds(text: str, anchor_day: int) -> tuple[Timestamp, Timestamp]:
    """`2026-11` -> the billing period that starts in that month (on the account's
    anchor day; the calendar month for day 1 or an all-accounts report)."""
    try:
        month = datetime.strptime(text, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid month {text!r} (e.g. 2026-11)") from None
    next_year, next_month = (month.year + 1, 1) if month.month == 12 else (
        month.year, month.month + 1)
    first, last = Timestamp(), Timestamp()
    first.FromDatetime(_anchored(month.year, month.month, anchor_day))
    last.FromDatetime(_anchored(next_year, next_month, anchor_day))
    return first, last


def _report(args: argparse.Namespace, api: Api) -> int:
    request = usage_pb2.GetUsageReportRequest(
        account_id=args.account_id,
        group_by=[g.strip().upper() if not g.strip().lower().startswith("label:")
                  else "LABEL:" + g.strip()[6:] for g in args.by.split(",") if g.strip()],
    )
    if args.period:
        anchor_day = 1
        if args.account_id:
            account = api.accounts.GetAccount(
                account_pb2.GetAccountRequest(account_id=args.account_id), timeout=api.timeout_s
            ).account
            anchor_day = account.billing_anchor_day
        start, end = _period_bounds(args.period, anchor_day)
        request.start.CopyFrom(start)
        request.end.CopyFrom(end)
    if args.start is not None:
        request.start.CopyFrom(args.start)
    if args.end is not None:
        request.end.CopyFrom(args.end)
    report = usage_pb2_grpc.UsageServiceStub(api.channel).GetUsageReport(
        request, timeout=api.timeout_s
    ).report
    if args.format == "json" or args.json:
        print(output.dumps(output.message_dict(report)))
        return 0
    headers = ["BUCKET", "ACCOUNT", "OPERATION", "LABELS", "QUANTITY", "UNITS", "COUNT"]
    table_rows = [
        [output.iso(r.bucket_start), r.account_id or "-", r.operation or "-",
         output.labels(r.labels), r.quantity, r.units, r.count]
        for r in report.rows
    ]
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([h.lower() for h in headers])
        writer.writerows(table_rows)
        return 0
    print(output.table(headers, table_rows) if table_rows else "(no usage)")
    print(f"\ntotal: {report.total_units} units, quantity {report.total_quantity}, "
          f"{report.total_count} charges ({output.iso(report.start)} .. {output.iso(report.end)})")
    if report.HasField("period"):
        p = report.period
        print("\n" + output.fields([
            ("period", f"{output.iso(p.period_start)} .. {output.iso(p.period_end)}"),
            ("allotment", p.allotment), ("used", p.used), ("remaining", p.remaining),
            ("purchased", p.purchased), ("overage", p.overage), ("expired", p.expired),
            ("held", p.held),
        ]))
    if report.HasField("forecast"):
        f = report.forecast
        print("\n" + output.fields([
            (f"burn rate ({f.window_days}-day)", f"{f.units_per_day} units/day"),
            ("runs out", output.iso(f.runs_out_at, unset="not this period")),
            ("projected period use", f.projected_period_consumption),
            ("projected overage", f.projected_overage),
        ]))
    return 0


# --- the parsers ---------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--target",
        default=None,
        help=f"host:port of the authority (default: $TALLY_TARGET, else {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT_S:g})",
    )
    group.add_argument("--json", action="store_true", help="print one JSON object")
    return common


def _alert_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("alerts (each raised once per billing period)")
    group.add_argument(
        "--alert-percent", type=int, action="append", metavar="P",
        help="alert when P%% of the allotment is used (holds included); repeatable",
    )
    group.add_argument(
        "--alert-below", type=int, default=None, metavar="N",
        help="alert when available falls below N units",
    )
    group.add_argument(
        "--alert-overage", action="store_true", help="alert when overage starts"
    )


def _alerts(args: argparse.Namespace) -> common_pb2.AlertSettings | None:
    if args.alert_percent is None and args.alert_below is None and not args.alert_overage:
        return None
    return common_pb2.AlertSettings(
        allotment_used_percent=args.alert_percent or [],
        balance_below=args.alert_below or 0,
        overage_started=args.alert_overage,
    )


def _plan_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    _alert_flags(parser)
    default = None if update else 0
    parser.add_argument(
        "--policy",
        type=_policy,
        default=None if update else common_pb2.OVERAGE_POLICY_DENY,
        metavar="{deny,allow,auto_purchase}",
        help="what happens when the grants run out" + ("" if update else " (default: deny)"),
    )
    parser.add_argument(
        "--overage-limit",
        type=int,
        default=default,
        metavar="N",
        help="overage (or auto-purchase) units allowed per period",
    )
    parser.add_argument(
        "--auto-purchase-units",
        type=int,
        default=default,
        metavar="N",
        help="pack size bought under the auto_purchase policy",
    )
    parser.add_argument(
        "--auto-purchase-threshold",
        type=int,
        default=default,
        metavar="N",
        help="buy a pack when available would fall below N",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _common()

    accounts = subparsers.add_parser(
        "accounts",
        help="create, show and update accounts",
        description="Create, show and update accounts.",
    )
    actions = accounts.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = actions.add_parser(
        "create",
        parents=[common],
        help="create an account",
        description="Create an account. Creating it again with the same settings is a no-op.",
    )
    create.add_argument("account_id", metavar="ACCOUNT_ID")
    create.add_argument(
        "--allotment", type=int, required=True, metavar="N", help="units granted per billing period"
    )
    _plan_flags(create, update=False)
    create.add_argument(
        "--anchor-day",
        type=int,
        default=0,
        metavar="D",
        help="day of the month (1-31) periods start on (default: today's)",
    )
    create.add_argument(
        "--label",
        type=_label,
        action="append",
        metavar="KEY=VALUE",
        help="a label; repeat for more",
    )
    create.set_defaults(handler=_run(_create))

    show = actions.add_parser(
        "show",
        parents=[common],
        help="an account's settings and balance",
        description="Show an account's settings and its balance.",
    )
    show.add_argument("account_id", metavar="ACCOUNT_ID")
    show.set_defaults(handler=_run(_show))

    update = actions.add_parser(
        "update",
        parents=[common],
        help="change an account's plan, overage or labels",
        description="Change an account. Only the flags given change; a new allotment applies "
        "from the next billing period.",
    )
    update.add_argument("account_id", metavar="ACCOUNT_ID")
    update.add_argument(
        "--allotment",
        type=int,
        default=None,
        metavar="N",
        help="units per billing period, from the next period on",
    )
    _plan_flags(update, update=True)
    update.add_argument(
        "--label",
        type=_label,
        action="append",
        metavar="KEY=VALUE",
        help="a label to set; repeat for more",
    )
    update.add_argument(
        "--replace-labels",
        action="store_true",
        help="replace all labels with the --label ones (none: clear them)",
    )
    update.set_defaults(handler=_run(_update))

    purchase = subparsers.add_parser(
        "purchase",
        parents=[common],
        help="add purchased units to an account",
        description="Add purchased units to an account. Without --idempotency-key a fresh "
        "key is made and printed, so a failed call can be retried with it safely.",
    )
    purchase.add_argument("account_id", metavar="ACCOUNT_ID")
    purchase.add_argument("units", type=int, metavar="UNITS")
    purchase.add_argument("--reference", default="", metavar="REF", help="the invoice or order id")
    purchase.add_argument(
        "--expires-at",
        type=_timestamp,
        default=None,
        metavar="ISO8601",
        help="when the units expire (default: never; no offset means UTC)",
    )
    purchase.add_argument(
        "--idempotency-key",
        default=None,
        metavar="KEY",
        help="retry a purchase with the key it printed",
    )
    purchase.set_defaults(handler=_run(_purchase))

    prices = subparsers.add_parser(
        "prices",
        help="list and set operation prices",
        description="List and set the price of each operation.",
    )
    price_actions = prices.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = price_actions.add_parser(
        "list",
        parents=[common],
        help="every operation's price",
        description="List every operation's price.",
    )
    listing.set_defaults(handler=_run(_prices_list))
    setting = price_actions.add_parser(
        "set",
        parents=[common],
        help="set an operation's price",
        description="Set an operation's price in units per quantity. Holds keep the price "
        "they were made with.",
    )
    setting.add_argument("operation", metavar="OPERATION")
    setting.add_argument("units_per_quantity", type=int, metavar="UNITS_PER_QUANTITY")
    setting.set_defaults(handler=_run(_prices_set))

    report = subparsers.add_parser(
        "report",
        parents=[common],
        help="usage by operation, label, day or hour; period summary and forecast",
        description="Usage report. The current billing period is exact in real time; "
        "earlier time comes from the ledger. Bounds are whole UTC hours.",
    )
    report.add_argument("account_id", metavar="ACCOUNT_ID", nargs="?", default="",
                        help="omit for every account (from the ledger; needs --from)")
    report.add_argument("--period", default=None, metavar="YYYY-MM",
                        help="the account's billing period that starts in that month")
    report.add_argument("--from", dest="start", type=_timestamp, default=None, metavar="ISO8601")
    report.add_argument("--to", dest="end", type=_timestamp, default=None, metavar="ISO8601")
    report.add_argument("--by", default="operation", metavar="KEYS",
                        help="comma-separated: operation, label:<key>, day, hour "
                        "(default: operation)")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(handler=_run(_report))

    budgets = subparsers.add_parser(
        "budgets", help="spend limits per period inside an account",
        description="Spend limits per billing period on an operation or a label value.",
    )
    budget_actions = budgets.add_subparsers(dest="action", metavar="ACTION", required=True)
    budget_set = budget_actions.add_parser(
        "set", parents=[common], help="set a budget",
        description="Set a budget: SCOPE is operation:<name> or label:<key>=<value>.",
    )
    budget_set.add_argument("account_id", metavar="ACCOUNT_ID")
    budget_set.add_argument("scope", metavar="SCOPE")
    budget_set.add_argument("limit", type=int, metavar="UNITS_PER_PERIOD")
    budget_set.set_defaults(handler=_run(_budgets_set))
    budget_list = budget_actions.add_parser("list", parents=[common], help="list budgets")
    budget_list.add_argument("account_id", metavar="ACCOUNT_ID")
    budget_list.set_defaults(handler=_run(_budgets_list))
    budget_delete = budget_actions.add_parser("delete", parents=[common], help="delete a budget")
    budget_delete.add_argument("account_id", metavar="ACCOUNT_ID")
    budget_delete.add_argument("budget_id", metavar="BUDGET_ID")
    budget_delete.set_defaults(handler=_run(_budgets_delete))

    ledger = subparsers.add_parser(
        "ledger",
        parents=[common],
        help="an account's ledger entries",
        description="List an account's durable ledger entries, oldest first.",
    )
    ledger.add_argument("account_id", metavar="ACCOUNT_ID")
    ledger.add_argument(
        "--type", action="append", metavar="TYPE", help="only entries of this type; repeatable"
    )
    ledger.add_argument("--from", dest="start", type=_timestamp, default=None, metavar="ISO8601")
    ledger.add_argument("--to", dest="end", type=_timestamp, default=None, metavar="ISO8601")
    ledger.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="at most N entries (default 1000)"
    )
    ledger.set_defaults(handler=_run(_ledger))

    balance = subparsers.add_parser(
        "balance",
        parents=[common],
        help="an account's balance and grants",
        description="Show an account's balance, its period and its grants in consumption order.",
    )
    balance.add_argument("account_id", metavar="ACCOUNT_ID")
    balance.set_defaults(handler=_run(_balance))
