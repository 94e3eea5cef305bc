"""The event loop a bench server runs on, chosen like `tally serve --event-loop`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

CHOICES = ("auto", "uvloop", "asyncio")


def run(main: Coroutine[Any, Any, None], choice: str) -> None:
    """auto: uvloop when installed, else asyncio."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
