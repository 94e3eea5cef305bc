"""`tally accounts create | show | update`."""

from __future__ import annotations

import argparse

from tally.cli import arguments, output
from tally.cli.balances import balance_rows, get_balance, grant_table
from tally.cli.target import Api, Subparsers, add_account_command, add_noun
from tally_client.v1 import account_pb2, common_pb2

POLICIES: dict[str, common_pb2.OveragePolicy.ValueType] = {
    "deny": common_pb2.OVERAGE_POLICY_DENY,
    "allow": common_pb2.OVERAGE_POLICY_ALLOW,
    "auto_purchase": common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
}


def _policy(text: str) -> common_pb2.OveragePolicy.ValueType:
    name = text.strip().lower().replace("-", "_")
    if name not in POLICIES:
        raise argparse.ArgumentTypeError(
            f"invalid policy {text!r} (choose from {', '.join(POLICIES)})"
        )
    return POLICIES[name]


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


def _account_text(account: account_pb2.Account, note: str = "") -> str:
    text = output.fields(_account_rows(account))
    return f"{text}\n{note}" if note else text


# --- handlers ----------------------------------------------------------------


def get_account(api: Api, account_id: str) -> account_pb2.Account:
    return api.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=account_id), timeout=api.timeout_s
    ).account


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
    output.emit(
        args,
        output.message_dict(account),
        lambda: _account_text(account, note if account.replayed else ""),
    )
    return 0


def _show(args: argparse.Namespace, api: Api) -> int:
    account = get_account(api, args.account_id)
    balance = get_balance(api, args.account_id)

    def text() -> str:
        return "\n\n".join(
            [
                output.fields(_account_rows(account) + balance_rows(balance)),
                grant_table(balance.grants),
            ]
        )

    output.emit(
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
    output.emit(args, output.message_dict(account), lambda: _account_text(account))
    return 0


# --- the parsers ---------------------------------------------------------------


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


def _label_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--label", type=arguments.label, action="append", metavar="KEY=VALUE", help=help
    )


def register(subparsers: Subparsers) -> None:
    actions = add_noun(
        subparsers, "accounts", help="create, show and update accounts",
        description="Create, show and update accounts.",
    )

    create = add_account_command(
        actions, "create", _create, help="create an account",
        description="Create an account. Creating it again with the same settings is a no-op.",
    )
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
    _label_flag(create, "a label; repeat for more")

    add_account_command(
        actions, "show", _show, help="an account's settings and balance",
        description="Show an account's settings and its balance.",
    )

    update = add_account_command(
        actions, "update", _update, help="change an account's plan, overage or labels",
        description="Change an account. Only the flags given change; a new allotment applies "
        "from the next billing period.",
    )
    update.add_argument(
        "--allotment",
        type=int,
        default=None,
        metavar="N",
        help="units per billing period, from the next period on",
    )
    _plan_flags(update, update=True)
    _label_flag(update, "a label to set; repeat for more")
    update.add_argument(
        "--replace-labels",
        action="store_true",
        help="replace all labels with the --label ones (none: clear them)",
    )
