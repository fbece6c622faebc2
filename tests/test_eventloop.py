"""ECU_EVENT_LOOP: which loop ``serve`` and ``flush`` run on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ecu_sidecar import eventloop
from ecu_sidecar.settings import Settings, SettingsError


def _settings(choice: str) -> Settings:
    return Settings.from_mapping({"event_loop": ("test", choice)})


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(
    ("choice", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_the_configured_loop_runs_the_coroutine(choice: str, module: str) -> None:
    # uvloop is a dependency on this platform: auto picks it.
    assert eventloop.run(_loop_module(), _settings(choice)).split(".")[0] == module


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert eventloop.run(_loop_module(), _settings("auto")).startswith("asyncio")
    with pytest.raises(SettingsError, match="ECU_EVENT_LOOP: uvloop is not installed"):
        eventloop.run(_loop_module(), _settings("uvloop"))


def test_unknown_choice_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="must be one of auto, uvloop, asyncio"):
        _settings("trio")
