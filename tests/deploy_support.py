"""Reading the shipped deployment files (Dockerfile, deploy/) for the tests that check
them against Tally's own settings and CLI."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from pathlib import Path

from tally import config
from tally.cli import target
from tally.cli.main import build_parser
from tally_client import tls as client_tls

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"

# Variables read by the client commands (the image's `tally health`), not settings.
CLIENT_VARIABLES = frozenset({
    target.TARGET_ENV, target.TOKEN_ENV, target.TOKEN_FILE_ENV,
    client_tls.CA_ENV, client_tls.CERT_ENV, client_tls.KEY_ENV,
})
SETTING_VARIABLES = frozenset(config.env_name(setting) for setting in config.SETTINGS)


def runtime_stage() -> str:
    return DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]


def instructions(stage: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = stage.replace("\\\n", " ")
    pairs = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def image_environment() -> dict[str, str]:
    """The runtime image's ENV, as a process in it sees it (key=value form only)."""
    environment: dict[str, str] = {}
    for word, rest in instructions(runtime_stage()):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, equals, value = pair.partition("=")
                if not equals:
                    raise AssertionError(f"ENV {pair!r}: use the key=value form")
                environment[key] = value
    return environment


def image_entrypoint() -> list[str]:
    for word, rest in instructions(runtime_stage()):
        if word == "ENTRYPOINT":
            return list(shlex.split(rest.strip("[]").replace(",", " ")))
    raise AssertionError("the runtime stage has no ENTRYPOINT")


def image_exposed_ports() -> set[int]:
    return {
        int(port.split("/")[0])
        for word, rest in instructions(runtime_stage()) if word == "EXPOSE"
        for port in rest.split()
    }


def is_known_variable(name: str) -> bool:
    return name in SETTING_VARIABLES or name in CLIENT_VARIABLES


def settings_of(argv: list[str], environ: Mapping[str, str]) -> config.Settings:
    """The settings `tally ARGV` would run with under ENVIRON, through the real CLI
    parser and config.from_sources (which validates them)."""
    args: argparse.Namespace = build_parser().parse_args(argv)
    return config.from_sources(args, environ)
