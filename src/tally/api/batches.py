"""Batch RPCs, item by item: the count bound, per-item validation and statuses.

A batch is many single calls in one: each item is validated as its single RPC
validates it (a bad item gets INVALID_ARGUMENT naming `items[i].<field>` and
changes nothing), goes to the store with the other valid items, and ends with
the status its single RPC would have ended with. The call as a whole fails only
for what concerns the whole call: authentication, an empty batch or too many
items, the store unreachable before anything ran.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from tally.api.errors import STATUS_BY_CODE
from tally.domain.errors import InvalidArgument, ResourceExhausted, TallyError
from tally.domain.limits import BATCH_ITEMS_MAX
from tally_client.v1 import common_pb2

log = logging.getLogger("tally.api")

Item = TypeVar("Item")
Request = TypeVar("Request")
Reply = TypeVar("Reply")
Result = TypeVar("Result")


def check_count(items: Sequence[Item]) -> Sequence[Item]:
    """The items of a batch: 1 to BATCH_ITEMS_MAX."""
    if not items:
        raise InvalidArgument("items must hold at least one item", field_name="items")
    if len(items) > BATCH_ITEMS_MAX:
        raise InvalidArgument(
            f"items may hold at most {BATCH_ITEMS_MAX} items, not {len(items)}",
            field_name="items",
        )
    return items


def validated(
    items: Sequence[Item], validate: Callable[[Item], Request]
) -> list[Request | TallyError]:
    """Each item validated as its single RPC validates it, or its refusal."""
    checked: list[Request | TallyError] = []
    for item in items:
        try:
            checked.append(validate(item))
        except TallyError as error:
            checked.append(error)
    return checked


async def run_valid(
    checked: list[Request | TallyError],
    run: Callable[[list[Request]], Awaitable[Sequence[Reply | Exception]]],
) -> list[Reply | Exception]:
    """Sends the valid items to the store in one call; per item, in order, the
    store's outcome or the item's refusal."""
    valid = [item for item in checked if not isinstance(item, TallyError)]
    answers = iter(await run(valid) if valid else ())
    return [item if isinstance(item, TallyError) else next(answers) for item in checked]


def status(index: int, outcome: Exception | None) -> common_pb2.BatchItemStatus:
    """Item `index`'s status: OK for None, else its error's code, naming the field
    as `items[index].<field>`. An unexpected error is a bug: logged, INTERNAL."""
    if outcome is None:
        return common_pb2.BatchItemStatus(code=0)
    if not isinstance(outcome, TallyError):
        log.error("batch item failed", exc_info=outcome, extra={"item": index})
        return common_pb2.BatchItemStatus(
            code=STATUS_BY_CODE["INTERNAL"].value[0], message="internal error; see the server log"
        )
    item = f"items[{index}]"
    field = f"{item}.{outcome.field_name}" if outcome.field_name else item
    message = outcome.message
    message = (
        f"{item}.{message}" if outcome.field_name and message.startswith(outcome.field_name)
        else f"{item}: {message}"
    )
    result = common_pb2.BatchItemStatus(
        code=STATUS_BY_CODE[outcome.code].value[0], message=message, field=field
    )
    if isinstance(outcome, ResourceExhausted):
        shortfall = outcome.shortfall
        result.insufficient_units.CopyFrom(
            common_pb2.InsufficientUnits(
                account_id=shortfall.account_id,
                operation=shortfall.operation,
                available=shortfall.available,
                required=shortfall.required,
                budget_id=shortfall.budget_id,
            )
        )
    return result


def results(
    outcomes: Sequence[Reply | Exception],
    result_type: Callable[..., Result],
    respond: Callable[[Reply], object],
) -> list[Result]:
    """Each item's result message: its status, and its response when it succeeded."""
    return [
        result_type(status=status(index, outcome))
        if isinstance(outcome, Exception)
        else result_type(status=status(index, None), response=respond(outcome))
        for index, outcome in enumerate(outcomes)
    ]
