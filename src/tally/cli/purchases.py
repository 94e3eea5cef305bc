"""`tally purchase`: add purchased units to an account, at most once per key."""

from __future__ import annotations

import argparse
import uuid

from tally.cli import arguments, output
from tally.cli.target import Api, Subparsers, add_account_command
from tally_client.v1 import account_pb2, common_pb2


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

    output.emit(
        args,
        {
            "account_id": args.account_id,
            "idempotency_key": key,
            "grant": output.message_dict(grant),
        },
        text,
    )
    return 0


def register(subparsers: Subparsers) -> None:
    purchase = add_account_command(
        subparsers, "purchase", _purchase, help="add purchased units to an account",
        description="Add purchased units to an account. Without --idempotency-key a fresh "
        "key is made and printed, so a failed call can be retried with it safely.",
    )
    purchase.add_argument("units", type=int, metavar="UNITS")
    purchase.add_argument("--reference", default="", metavar="REF", help="the invoice or order id")
    purchase.add_argument(
        "--expires-at",
        type=arguments.timestamp,
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
