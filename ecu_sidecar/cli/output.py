"""What the ``ecu-sidecar`` command reads and prints: amounts (integer µECU, or ECU with a
suffix, converted exactly), times, and its output as aligned text or one JSON object."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ecu_sidecar.model import UECU_PER_ECU, HoldState

__all__ = [
    "UsageError",
    "columns",
    "emit",
    "format_ecu",
    "money",
    "parse_uecu",
    "plain",
    "scope_json",
    "scope_line",
    "table",
    "when",
]

_UECU = re.compile(r"([0-9]+)\s*(?:uECU|µECU)?", re.IGNORECASE)
_ECU = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*ECU", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- amounts -----------------------------------------------------------------------------------


def parse_uecu(text: str) -> int:
    """An amount as integer µECU: ``1500`` / ``1500uECU``, or ECU with a suffix: ``2.5ECU``."""
    value = text.strip()
    if m := _UECU.fullmatch(value):
        return int(m.group(1))
    if m := _ECU.fullmatch(value):
        uecu = Decimal(m.group(1)) * UECU_PER_ECU
        if uecu != uecu.to_integral_value():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number of uECU (1 ECU = {UECU_PER_ECU} uECU)"
            )
        return int(uecu)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an amount: give integer uECU (2500000) or ECU with a suffix (2.5ECU)"
    )


def format_ecu(uecu: int) -> str:
    """µECU as exact ECU, trailing zeros dropped: 2500000 -> '2.5'."""
    sign = "-" if uecu < 0 else ""
    whole, frac = divmod(abs(uecu), UECU_PER_ECU)
    return f"{sign}{whole}" + (f".{frac:06d}".rstrip("0") if frac else "")


def money(uecu: int) -> str:
    return f"{uecu} uECU ({format_ecu(uecu)} ECU)"


class UsageError(Exception):
    """A bad command line or input file: printed as ``error: ...``, exit status 2."""


def when(unix_ms: int) -> str:
    stamp = (_EPOCH + timedelta(milliseconds=unix_ms)).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# -- output ------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Outcomes as JSON-ready values: hold states by name, other enums by value."""
    if isinstance(value, HoldState):
        return value.name.lower()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def emit(args: argparse.Namespace, data: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(plain(data), sort_keys=True))
    else:
        print("\n".join(lines))


def table(rows: Sequence[tuple[str, object]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def columns(header: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> list[str]:
    """An aligned text table; columns in ``right`` are right-aligned (numbers)."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        out = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(out).rstrip()

    return [fmt(cells[0]), *[fmt(row) for row in cells[1:]]]


def scope_line(kind: str, s: Any) -> str:
    cap = "uncapped" if s.cap_uecu is None else f"cap {s.cap_uecu}"
    left = "" if s.cap_uecu is None else f" available {s.available_uecu}"
    return f"{kind} {s.id}: {cap} held {s.held_uecu} used {s.used_uecu}{left} (uECU)"


def scope_json(s: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(s), "available_uecu": s.available_uecu}
