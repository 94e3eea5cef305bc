"""The load generator's hand-built requests and reply reading agree with protobuf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.loadgen import batch_outcomes, first_string, request_prefix, with_key
from bench.servers import hiredis_shadow, python_env
from tally_client.v1 import common_pb2, quota_pb2


def test_a_reserve_request_built_by_hand_parses_as_one() -> None:
    raw = with_key(request_prefix("acct-é" * 30, "image.generate.sdxl", 300), b"k" * 128)
    parsed = quota_pb2.ReserveRequest.FromString(raw)
    assert (parsed.account_id, parsed.operation, parsed.quantity, parsed.idempotency_key) \
        == ("acct-é" * 30, "image.generate.sdxl", 300, "k" * 128)
    charge = quota_pb2.ChargeRequest.FromString(raw)  # same field numbers
    assert (charge.account_id, charge.quantity) == ("acct-é" * 30, 300)


def test_the_reservation_id_is_read_from_a_full_reply() -> None:
    reply = quota_pb2.ReserveResponse(
        reservation_id="s07.123." + "a" * 200, units=5, replayed=True,
        balance=common_pb2.Balance(account_id="a", available=-3))
    assert first_string(reply.SerializeToString()) == ("s07.123." + "a" * 200).encode()


def test_batch_outcomes_read_each_items_code_and_response() -> None:
    # the batch messages' wire shape (shared_contracts.md), written with the
    # message types every checkout has: results = 1 {status = 1 {code = 1}, response = 2}
    ok = quota_pb2.ReserveResponse(reservation_id="r1", units=1).SerializeToString()
    status_refused = b"\x08\x08"  # code = 8 (RESOURCE_EXHAUSTED)
    results = [b"\x12" + bytes((len(ok),)) + ok,
               b"\x0a" + bytes((len(status_refused),)) + status_refused]
    reply = b"".join(b"\x0a" + bytes((len(r),)) + r for r in results)
    assert batch_outcomes(reply) == [(0, ok), (8, b"")]
    assert first_string(batch_outcomes(reply)[0][1]) == b"r1"


def test_the_hiredis_shadow_makes_redis_py_fall_back(tmp_path: Path) -> None:
    probe = "import redis.utils; print(redis.utils.HIREDIS_AVAILABLE)"
    on = subprocess.run([sys.executable, "-c", probe], env=python_env(),
                        capture_output=True, text=True, check=True).stdout.strip()
    off = subprocess.run([sys.executable, "-c", probe],
                         env=python_env(hiredis_shadow(tmp_path / "shadow")),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert (on, off) == ("True", "False")
