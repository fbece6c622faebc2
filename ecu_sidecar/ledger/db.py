"""What every part of the ledger works through: a backend, a clock, and transactions that
are run again when they lose a race; and the argument checks the parts share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ecu_sidecar.ledger.backends import Backend, Retry, Tx
from ecu_sidecar.ledger.events import MAX_VALUE
from ecu_sidecar.ledger.types import LedgerArgumentError, LedgerUnavailable
from ecu_sidecar.validation import ID_PATTERN

__all__ = ["Database", "check_id", "check_int", "check_limit", "ensure_org"]

#: A transaction that lost a deadlock or serialization race is run again this many times.
ATTEMPTS = 5


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Database:
    """One backend and one clock: ``write`` and ``read`` run a function in one transaction."""

    def __init__(self, backend: Backend, clock: Callable[[], int] | None = None) -> None:
        self.backend = backend
        self.clock = clock or _wall_clock_ms

    @property
    def dialect(self) -> str:
        """'postgresql' or 'sqlite'."""
        return self.backend.dialect

    def write(self, fn: Callable[[Tx], Any]) -> Any:
        """``fn`` in one write transaction, run again when the transaction lost a race."""
        return self._run(fn, write=True)

    def read(self, fn: Callable[[Tx], Any]) -> Any:
        """``fn`` in one read-only transaction (one snapshot), run again when it lost a race."""
        return self._run(fn, write=False)

    def _run(self, fn: Callable[[Tx], Any], *, write: bool) -> Any:
        for attempt in range(ATTEMPTS):
            try:
                with self.backend.transaction(write=write) as tx:
                    return fn(tx)
            except Retry as exc:
                if attempt == ATTEMPTS - 1:
                    raise LedgerUnavailable(
                        f"transaction lost {ATTEMPTS} races in a row: {exc}"
                    ) from exc
        raise AssertionError("unreachable")


def ensure_org(tx: Tx, org: str, at_ms: int) -> None:
    """The organization's row, created at ``at_ms`` unless it exists."""
    tx.run(
        "INSERT INTO organizations (org_id, created_at_ms) VALUES (?, ?) "
        "ON CONFLICT (org_id) DO NOTHING",
        (org, at_ms),
    )


def check_id(name: str, value: str, limit: int) -> None:
    """Raise LedgerArgumentError unless ``value`` is 1-``limit`` of [A-Za-z0-9._-]."""
    if not isinstance(value, str) or not value or len(value) > limit:
        raise LedgerArgumentError(f"{name}: expected 1-{limit} characters, got {value!r}")
    if not ID_PATTERN.fullmatch(value):
        raise LedgerArgumentError(f"{name}: may contain only [A-Za-z0-9._-], got {value!r}")


def check_int(name: str, value: int, *, low: int = 0) -> None:
    """Raise LedgerArgumentError unless ``value`` is an integer in [low, MAX_VALUE]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LedgerArgumentError(f"{name}: expected an integer, got {type(value).__name__}")
    if not low <= value <= MAX_VALUE:
        raise LedgerArgumentError(f"{name}: must be between {low} and {MAX_VALUE}, got {value}")


def check_limit(limit: int) -> int:
    """A row limit: a positive integer."""
    check_int("limit", limit, low=1)
    return limit
