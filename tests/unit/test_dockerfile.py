"""The Dockerfile as shipped faces a network safely: all interfaces, authentication
required, no unauthenticated override, not root; it holds Tally alone and serves its
metrics on the port it exposes."""

from __future__ import annotations

import re

from tally.addresses import is_loopback
from tests.deploy_support import (
    DOCKERFILE,
    image_entrypoint,
    image_environment,
    image_exposed_ports,
    instructions,
    is_known_variable,
    runtime_stage,
    settings_of,
)


def test_the_image_listens_everywhere_with_authentication_required() -> None:
    """Its environment listens on 0.0.0.0 with TALLY_AUTH=required, never the override."""
    environment = image_environment()
    assert environment["TALLY_LISTEN"] == "0.0.0.0:50051"
    assert environment["TALLY_AUTH"] == "required"
    assert "ALLOW_REMOTE_WITHOUT_AUTH" not in DOCKERFILE.read_text()


def test_the_image_runs_as_a_user_without_privileges() -> None:
    """The server runs as the tally user, and its health check goes through the CLI
    (which reads the TLS variables)."""
    stage = runtime_stage()
    assert "\nUSER tally\n" in stage
    assert 'CMD ["tally", "health"' in stage


def test_the_image_holds_tally_alone() -> None:
    """No Redis (redis-server or valkey) is installed in the runtime stage, and the
    client and the server go in without extras (`./client .`, not `.[...]`)."""
    for word, rest in instructions(runtime_stage()):
        if word == "RUN":
            assert "redis" not in rest.lower() and "valkey" not in rest.lower(), rest
    build_stage = " ".join(
        rest for word, rest in instructions(DOCKERFILE.read_text().rsplit("\nFROM ", 1)[0])
        if word == "RUN"
    )
    assert re.search(
        r"pip install --no-cache-dir -c constraints\.txt \./client \.(\s|$)", build_stage
    )
    assert ".[" not in build_stage


def test_every_variable_of_the_image_is_a_real_setting() -> None:
    """Each TALLY_* in the image's ENV names a setting of tally/config.py (a typo would
    be silently ignored at run time)."""
    names = [name for name in image_environment() if name.startswith("TALLY_")]
    assert names
    for name in names:
        assert is_known_variable(name), name


def test_metrics_are_served_on_every_interface_on_an_exposed_port() -> None:
    """The image's own settings, read by Tally's config as `tally serve` would (with a
    Redis URL, which the image needs), bind /metrics beyond loopback with
    metrics_allow_remote on, on a port the image EXPOSEs beside the gRPC port."""
    assert image_entrypoint() == ["tally", "serve"]
    environment = image_environment() | {"TALLY_REDIS_URL": "redis://redis:6379/0"}
    settings = settings_of(image_entrypoint()[1:], environment)
    host, _, port = settings.metrics_listen.rpartition(":")
    assert host == "0.0.0.0" and not is_loopback(settings.metrics_listen)
    assert settings.metrics_allow_remote is True
    exposed = image_exposed_ports()
    assert int(port) in exposed
    assert int(settings.listen.rpartition(":")[2]) in exposed
    assert settings.auth == "required"


def test_the_image_names_no_redis_of_its_own() -> None:
    """The image leaves TALLY_REDIS_URL to the deployment: a default baked in would point
    every container at a Redis nobody runs."""
    assert "TALLY_REDIS_URL" not in image_environment()
