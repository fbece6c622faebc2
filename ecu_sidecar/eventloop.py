"""The event loop ``serve`` and ``flush`` run on (ECU_EVENT_LOOP): uvloop where installed.

uvloop cuts the sidecar's CPU per RPC by about a tenth and grpc.aio runs on it unchanged
(docs/benchmarks.md has the measurement). It is a dependency on Linux and macOS; elsewhere, or
with ECU_EVENT_LOOP=asyncio, the standard library's loop runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ecu_sidecar.settings import Settings, SettingsError

__all__ = ["loop_factory", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory(settings: Settings) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name, factory) of the loop ECU_EVENT_LOOP asks for. Raises SettingsError when it
    asks for uvloop and uvloop is not installed."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise SettingsError(
                    "ECU_EVENT_LOOP: uvloop is not installed (pip install uvloop, or set "
                    "ECU_EVENT_LOOP=asyncio)"
                ) from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """``asyncio.run(main)`` on the configured loop."""
    try:
        name, factory = loop_factory(settings)
    except SettingsError:
        main.close()  # never to run: not "never awaited" either
        raise
    log.debug("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
