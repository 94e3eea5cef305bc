"""The Dockerfile as shipped faces a network safely: all interfaces, authentication
required, no unauthenticated override, not root."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def runtime_stage() -> str:
    return DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]


def test_the_image_listens_everywhere_with_authentication_required() -> None:
    """Its environment listens on 0.0.0.0 with TALLY_AUTH=required, never the override."""
    stage = runtime_stage()
    assert "TALLY_LISTEN=0.0.0.0:50051" in stage
    assert "TALLY_AUTH=required" in stage
    assert "ALLOW_REMOTE_WITHOUT_AUTH" not in DOCKERFILE.read_text()


def test_the_image_runs_as_a_user_without_privileges() -> None:
    """The server runs as the tally user, and its health check goes through the CLI
    (which reads the TLS variables)."""
    stage = runtime_stage()
    assert "\nUSER tally\n" in stage
    assert 'CMD ["tally", "health"' in stage
