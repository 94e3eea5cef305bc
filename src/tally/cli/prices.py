"""`tally prices list | set`: the price of each operation."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tally.cli import output
from tally.cli.target import Api, Subparsers, add_command, add_noun
from tally_client.v1 import catalog_pb2


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

    output.emit(args, output.message_dict(reply), text)
    return 0


def _prices_set(args: argparse.Namespace, api: Api) -> int:
    price = api.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(
            operation=args.operation, units_per_quantity=args.units_per_quantity
        ),
        timeout=api.timeout_s,
    ).price
    output.emit(args, output.message_dict(price), lambda: _price_table([price]))
    return 0


def register(subparsers: Subparsers) -> None:
    actions = add_noun(
        subparsers, "prices", help="list and set operation prices",
        description="List and set the price of each operation.",
    )
    add_command(
        actions, "list", _prices_list, help="every operation's price",
        description="List every operation's price.",
    )
    setting = add_command(
        actions, "set", _prices_set, help="set an operation's price",
        description="Set an operation's price in units per quantity. Holds keep the price "
        "they were made with.",
    )
    setting.add_argument("operation", metavar="OPERATION")
    setting.add_argument("units_per_quantity", type=int, metavar="UNITS_PER_QUANTITY")
