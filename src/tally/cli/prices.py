"""`tally prices list | set`: the price of each operation."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tally.cli import output
from tally.cli.target import Api, connection_flags, run
from tally.v1 import catalog_pb2


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


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = connection_flags()
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
    listing.set_defaults(handler=run(_prices_list))
    setting = price_actions.add_parser(
        "set",
        parents=[common],
        help="set an operation's price",
        description="Set an operation's price in units per quantity. Holds keep the price "
        "they were made with.",
    )
    setting.add_argument("operation", metavar="OPERATION")
    setting.add_argument("units_per_quantity", type=int, metavar="UNITS_PER_QUANTITY")
    setting.set_defaults(handler=run(_prices_set))
