"""`tally ledger`: an account's durable ledger entries, oldest first."""

from __future__ import annotations

import argparse

from tally.cli import arguments, output
from tally.cli.target import Api, Subparsers, add_account_command
from tally.domain.limits import LEDGER_PAGE_SIZE_MAX
from tally_client.v1 import account_pb2


def _ledger(args: argparse.Namespace, api: Api) -> int:
    """Every page of the account's entries (up to --limit), oldest first."""
    request = account_pb2.ListLedgerEntriesRequest(
        account_id=args.account_id,
        types=args.type or [],
        page_size=min(args.limit, LEDGER_PAGE_SIZE_MAX),
    )
    arguments.copy_time_range(args, request)
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

    output.emit(
        args,
        {"account_id": args.account_id, "entries": [output.message_dict(e) for e in entries]},
        text,
    )
    return 0


def register(subparsers: Subparsers) -> None:
    ledger = add_account_command(
        subparsers, "ledger", _ledger, help="an account's ledger entries",
        description="List an account's durable ledger entries, oldest first.",
    )
    ledger.add_argument(
        "--type", action="append", metavar="TYPE", help="only entries of this type; repeatable"
    )
    arguments.add_time_range(ledger)
    ledger.add_argument(
        "--limit", type=int, default=1000, metavar="N", help="at most N entries (default 1000)"
    )
