"""The event loop for shardflow's own processes (workers, the bench's load generator).

uvloop when it is installed (``pip install shardflow[fast]``, or uvloop alone): the
worker and the load generator spend much of their CPU in the event loop and the socket
calls asyncpg makes through it, and uvloop's are cheaper (measured on the bench, same
cluster, A/B twice: worker CPU 368 -> 272 us per workflow). ``SHARDFLOW_LOOP=asyncio``
keeps the standard loop, e.g. to compare or to debug with asyncio's debug mode.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's (not installed, or
    ``SHARDFLOW_LOOP=asyncio``)."""
    choice = os.environ.get("SHARDFLOW_LOOP", "auto")
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"SHARDFLOW_LOOP must be auto, uvloop or asyncio, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("SHARDFLOW_LOOP=uvloop but uvloop is not installed "
                              "(pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never started: no "was never awaited" warning on top
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
