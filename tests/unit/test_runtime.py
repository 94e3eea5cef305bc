"""--event-loop: parsing, and the loop each choice serves on."""

from __future__ import annotations

import asyncio

import pytest

from tally import runtime


@pytest.mark.parametrize(
    ("text", "choice"), [("auto", "auto"), ("uvloop", "uvloop"), (" AsyncIO ", "asyncio")]
)
def test_event_loop_choices_parse(text: str, choice: str) -> None:
    assert runtime.parse_event_loop(text) == choice


@pytest.mark.parametrize("text", ["", "trio", "uv"])
def test_unknown_event_loops_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not an event loop"):
        runtime.parse_event_loop(text)


def _loop_of(choice: str) -> str:
    async def which() -> str:
        return runtime.running_loop()

    with asyncio.Runner(loop_factory=runtime.loop_factory(choice)) as runner:
        return runner.run(which())


def test_each_choice_serves_on_its_loop() -> None:
    """auto takes uvloop when it is installed (it is a dependency on Linux)."""
    assert runtime.uvloop_installed()
    assert _loop_of("asyncio") == "asyncio"
    assert _loop_of("uvloop") == "uvloop"
    assert _loop_of("auto") == "uvloop"


def test_uvloop_asked_but_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "uvloop_installed", lambda: False)
    assert runtime.loop_factory("auto") is None
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        runtime.loop_factory("uvloop")
