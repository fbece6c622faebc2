"""How a setting's text becomes its value: the error every bad value raises, the kinds of
values (integers and numbers within bounds, booleans, choices, URLs) and the TOML file
ECU_CONFIG_FILE names."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = ["SENTINEL_SCHEME", "UNIX_SCHEME", "SettingsError", "coerce", "int_range", "read_file"]


class SettingsError(ValueError):
    """A configuration value is missing, malformed or out of range."""


#: The scheme of a Redis Sentinel URL in ECU_REDIS_URL.
SENTINEL_SCHEME = "redis+sentinel://"
#: ECU_LISTEN's prefix for a Unix domain socket (grpc's own address syntax).
UNIX_SCHEME = "unix:"


def int_range(lo: int, hi: int) -> dict[str, Any]:
    return {"kind": "int", "lo": lo, "hi": hi}


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"ECU_CONFIG_FILE: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"ECU_CONFIG_FILE: {path} is not valid TOML: {exc}") from exc
    return data


def coerce(origin: str, meta: Mapping[str, Any], value: Any) -> Any:
    kind = meta["kind"]
    text = value.strip() if isinstance(value, str) else value
    if kind == "int":
        if isinstance(text, bool) or not isinstance(text, (int, str)):
            raise SettingsError(f"{origin}: expected an integer, got {value!r}")
        try:
            number = int(text)
        except ValueError:
            raise SettingsError(f"{origin}: expected an integer, got {value!r}") from None
        if not meta["lo"] <= number <= meta["hi"]:
            raise SettingsError(
                f"{origin}: must be between {meta['lo']} and {meta['hi']}, got {number}"
            )
        return number
    if kind == "float":
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise SettingsError(f"{origin}: expected a number, got {value!r}") from None
        if not meta["lo"] <= number <= meta["hi"]:
            raise SettingsError(
                f"{origin}: must be between {meta['lo']} and {meta['hi']}, got {number}"
            )
        return number
    if kind == "bool":
        if isinstance(text, bool):
            return text
        lowered = str(text).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{origin}: expected true or false, got {value!r}")
    if not isinstance(text, str):
        raise SettingsError(f"{origin}: expected a string, got {value!r}")
    if kind == "dsn":
        return text
    if kind == "choice":
        for choice in meta["choices"]:
            if choice.lower() == text.lower():
                return choice
        raise SettingsError(f"{origin}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    if (
        kind == "url"
        and text
        and not text.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME))
    ):
        raise SettingsError(
            f"{origin}: must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}"
        )
    return text
