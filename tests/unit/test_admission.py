"""Admission on its own: a free slot is taken at once, a full server makes callers wait
in turn, and what cannot be admitted is shed with the reason it is counted under."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tally.api.admission import Admission, AdmissionLimits, Shed

BUSY = "server busy: 1 calls in flight; retry with the same idempotency key"


async def test_a_waiting_call_takes_the_slot_a_leaving_call_frees() -> None:
    """Proves that with the only slot taken a second caller waits, and gets the slot as
    soon as the first leaves (counted in_flight and waiting meanwhile)."""
    admission = Admission(AdmissionLimits(max_in_flight=1, queue_max=1, wait_s=60.0))
    await admission.enter(None)
    second = asyncio.create_task(admission.enter(None))
    await asyncio.sleep(0)  # the second caller runs up to its wait for the slot
    assert (admission.in_flight, admission.waiting) == (1, 1)
    admission.leave()
    await second
    assert (admission.in_flight, admission.waiting) == (1, 0)
    admission.leave()
    assert admission.in_flight == 0


@pytest.mark.parametrize(
    ("limits", "time_remaining_s", "code", "reason"),
    [
        (AdmissionLimits(1, 0, 60.0), None, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
        (AdmissionLimits(1, 1, 0.0), None, grpc.StatusCode.RESOURCE_EXHAUSTED, "wait_expired"),
        (AdmissionLimits(1, 1, 60.0), 0.0, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    ],
)
async def test_what_cannot_be_admitted_is_shed(
    limits: AdmissionLimits, time_remaining_s: float | None, code: grpc.StatusCode,
    reason: str,
) -> None:
    """Proves a call finding every slot taken is shed when the queue is full, when its
    wait for a slot runs out, or when its deadline passes first (DEADLINE_EXCEEDED), with
    the "server busy" message, and leaves no slot or waiting place behind."""
    admission = Admission(limits)
    await admission.enter(None)
    with pytest.raises(Shed) as shed:
        await admission.enter(time_remaining_s)
    assert (shed.value.code, shed.value.reason) == (code, reason)
    assert BUSY in shed.value.message
    assert (admission.in_flight, admission.waiting) == (1, 0)
    admission.leave()
    await admission.enter(None)  # the slot is free again
    assert admission.in_flight == 1
