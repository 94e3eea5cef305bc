"""The gRPC service config shipped with the protos: one copy, it parses, and it retries
UNAVAILABLE on every service the protos define (and names no other)."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import tally_client.v1
from tally_client.channel import service_config

PROTOS_COPY = Path(__file__).parents[2] / "protos" / "tally" / "v1" / "service_config.json"


def proto_services() -> set[str]:
    """Full names of the services in every generated module of tally_client.v1."""
    names: set[str] = set()
    for module in pkgutil.iter_modules(tally_client.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"tally_client.v1.{module.name}").DESCRIPTOR
            names |= {service.full_name for service in descriptor.services_by_name.values()}
    return names


def test_the_packaged_config_is_the_one_beside_the_protos() -> None:
    """Proves the client reads the file from protos/ (copied by gen_stubs.py), not a stale one."""
    assert service_config() == PROTOS_COPY.read_text("utf-8")


def test_every_service_of_the_protos_retries_unavailable() -> None:
    """Proves each service of the protos has a retry policy for UNAVAILABLE only, within
    gRPC's limit of 5 attempts, and that the config names no service the protos lack."""
    config = json.loads(service_config())
    covered: set[str] = set()
    for method_config in config["methodConfig"]:
        policy = method_config["retryPolicy"]
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert 2 <= policy["maxAttempts"] <= 5
        for name in method_config["name"]:
            assert set(name) == {"service"}, f"a whole service, not one method: {name}"
            covered.add(name["service"])
    services = proto_services()
    assert len(services) == 5
    assert covered == services
