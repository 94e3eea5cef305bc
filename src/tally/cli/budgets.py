"""`tally budgets set | list | delete`: spend limits per period inside an account."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tally.cli import output
from tally.cli.target import Api, Subparsers, add_account_command, add_noun
from tally_client.v1 import account_pb2, common_pb2


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
    output.emit(args, output.message_dict(reply), lambda: _budget_table([reply]))
    return 0


def _budgets_list(args: argparse.Namespace, api: Api) -> int:
    reply = api.accounts.ListBudgets(
        account_pb2.ListBudgetsRequest(account_id=args.account_id), timeout=api.timeout_s
    )
    output.emit(args, output.message_dict(reply), lambda: _budget_table(reply.budgets))
    return 0


def _budgets_delete(args: argparse.Namespace, api: Api) -> int:
    reply = api.accounts.DeleteBudget(
        account_pb2.DeleteBudgetRequest(account_id=args.account_id, budget_id=args.budget_id),
        timeout=api.timeout_s,
    ).budget
    output.emit(args, output.message_dict(reply), lambda: f"deleted {reply.budget_id}")
    return 0


def register(subparsers: Subparsers) -> None:
    actions = add_noun(
        subparsers, "budgets", help="spend limits per period inside an account",
        description="Spend limits per billing period on an operation or a label value.",
    )
    budget_set = add_account_command(
        actions, "set", _budgets_set, help="set a budget",
        description="Set a budget: SCOPE is operation:<name> or label:<key>=<value>.",
    )
    budget_set.add_argument("scope", metavar="SCOPE")
    budget_set.add_argument("limit", type=int, metavar="UNITS_PER_PERIOD")
    add_account_command(actions, "list", _budgets_list, help="list budgets")
    budget_delete = add_account_command(actions, "delete", _budgets_delete, help="delete a budget")
    budget_delete.add_argument("budget_id", metavar="BUDGET_ID")
