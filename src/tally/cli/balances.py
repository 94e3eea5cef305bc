"""`tally balance`: an account's balance, its period and its grants."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tally.cli import output
from tally.cli.target import Api, Subparsers, add_account_command
from tally_client.v1 import common_pb2, quota_pb2


def balance_rows(balance: common_pb2.Balance) -> list[tuple[str, object]]:
    return [
        ("available", balance.available),
        ("held", balance.held),
        ("overage used / limit", f"{balance.overage_used} / {balance.overage_limit}"),
        ("period start", output.iso(balance.period_start)),
        ("period end", output.iso(balance.period_end)),
        ("period consumed", balance.period_consumed),
    ]


def grant_table(grants: Sequence[common_pb2.Grant]) -> str:
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


def get_balance(api: Api, account_id: str) -> common_pb2.Balance:
    return api.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id), timeout=api.timeout_s
    ).balance


def _balance(args: argparse.Namespace, api: Api) -> int:
    balance = get_balance(api, args.account_id)

    def text() -> str:
        head = output.fields([("account", balance.account_id), *balance_rows(balance)])
        return f"{head}\n\n{grant_table(balance.grants)}"

    output.emit(args, output.message_dict(balance), text)
    return 0


def register(subparsers: Subparsers) -> None:
    add_account_command(
        subparsers, "balance", _balance, help="an account's balance and grants",
        description="Show an account's balance, its period and its grants in consumption order.",
    )
