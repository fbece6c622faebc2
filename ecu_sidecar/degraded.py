"""Opt-in degraded mode: a bounded local allowance while Redis is unreachable.

The default is fail-closed: with Redis down every call answers UNAVAILABLE. With
ECU_DEGRADED_ALLOWANCE_UECU > 0 a sidecar may instead *grant locally*, per organization, at
most that many µECU of holds while Redis is unreachable — the explicit, configured bound of
overspend per sidecar and organization. Every local decision is appended to a journal on local
disk and fsynced **before** it is answered, so it survives a SIGKILL of the sidecar.

When Redis answers again, the journal is replayed in order:

- a local hold that was committed → the ``degraded_commit`` script bills the actual amount
  (never dropped; the balance may go negative by at most the allowance) and emits a commit
  event flagged ``degraded`` for the ledger;
- a local hold that was released → nothing to bill;
- a local hold still open → reserved in Redis for real (if Redis cannot cover it, it stays
  local until its commit or release is replayed);
- a commit of a hold that lives in Redis (made before the outage) → the normal commit script.

Each replayed entry is marked done in the journal; a fully replayed journal is truncated.
Replays are idempotent (reservation ids, event ids), so a crash during replay only repeats.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Journal", "LocalHold"]

log = logging.getLogger(__name__)


@dataclass
class LocalHold:
    """A hold granted locally while Redis was unreachable."""

    org: str
    reservation_id: str
    amount_uecu: int
    team: str = ""
    project: str = ""
    user: str = ""
    job: str = ""
    model: str = ""
    deadline_ms: int = 0
    state: str = "A"
    """A active, C committed, R released."""
    actual_uecu: int = 0
    usage: tuple[int, int, int] = (0, 0, 0)
    done: bool = False
    """Replayed into Redis."""


@dataclass
class Journal:
    """The append-only, fsynced journal of degraded-mode decisions, and its in-memory view."""

    path: str
    allowance_uecu: int
    holds: dict[tuple[str, str], LocalHold] = field(default_factory=dict)
    remote_commits: list[dict[str, Any]] = field(default_factory=list)
    """Commits of Redis holds answered while Redis was down, waiting for replay."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, path: str, allowance_uecu: int) -> Journal:
        """Load the journal (what a previous process decided and did not replay yet)."""
        journal = cls(path, allowance_uecu)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            journal._apply(json.loads(line))
                        except (ValueError, KeyError):
                            log.error("degraded journal %s: skipping a torn line", path)
        return journal

    # -- decisions (each fsynced before it is answered) -------------------------------------

    def used(self, org: str) -> int:
        """µECU of this organization's allowance taken by local holds not yet replayed."""
        total = 0
        for hold in self.holds.values():
            if hold.org == org and not hold.done and hold.state != "R":
                total += max(hold.amount_uecu, hold.actual_uecu)
        return total

    def reserve(self, hold: LocalHold) -> LocalHold | None:
        """Grant ``hold`` locally if it fits in the allowance; None when it does not. A replay
        of a known reservation id answers the recorded hold."""
        with self._lock:
            known = self.holds.get((hold.org, hold.reservation_id))
            if known is not None:
                return known
            if self.used(hold.org) + hold.amount_uecu > self.allowance_uecu:
                return None
            self._write({"op": "reserve", **_hold_fields(hold)})
            self.holds[(hold.org, hold.reservation_id)] = hold
            return hold

    def settle(
        self, org: str, rid: str, op: str, actual: int = 0, usage: tuple[int, int, int] = (0, 0, 0)
    ) -> LocalHold | None:
        """Commit (op 'commit') or release ('release') a local hold; None if not local."""
        with self._lock:
            hold = self.holds.get((org, rid))
            if hold is None:
                return None
            if hold.state == "A":
                self._write(
                    {"op": op, "org": org, "rid": rid, "actual": actual, "usage": list(usage)}
                )
                hold.state = "C" if op == "commit" else "R"
                hold.actual_uecu = actual
                hold.usage = usage
            return hold

    def remote_commit(self, org: str, rid: str, actual: int, usage: tuple[int, int, int]) -> None:
        """Record a commit of a hold that lives in Redis, to replay when Redis returns."""
        with self._lock:
            entry = {
                "op": "remote_commit",
                "org": org,
                "rid": rid,
                "actual": actual,
                "usage": list(usage),
                "n": len(self.remote_commits),
            }
            self._write(entry)
            self.remote_commits.append({**entry, "done": False})

    def mark_done(self, kind: str, org: str, rid: str) -> None:
        """Record that an entry reached Redis; truncate the journal once everything has."""
        with self._lock:
            self._write({"op": "done", "kind": kind, "org": org, "rid": rid})
            self._apply({"op": "done", "kind": kind, "org": org, "rid": rid})
            if self.pending() == 0:
                with open(self.path, "w", encoding="utf-8") as fh:
                    fh.flush()
                    os.fsync(fh.fileno())
                self.holds.clear()
                self.remote_commits.clear()

    def pending(self) -> int:
        """Entries not yet replayed into Redis."""
        return sum(1 for h in self.holds.values() if not h.done) + sum(
            1 for c in self.remote_commits if not c["done"]
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _apply(self, e: dict[str, Any]) -> None:
        op = e["op"]
        if op == "reserve":
            hold = LocalHold(**{k: e[k] for k in _HOLD_KEYS})
            self.holds[(hold.org, hold.reservation_id)] = hold
        elif op in ("commit", "release"):
            hold = self.holds[(e["org"], e["rid"])]
            hold.state = "C" if op == "commit" else "R"
            hold.actual_uecu = e["actual"]
            hold.usage = tuple(e["usage"])  # type: ignore[assignment]
        elif op == "remote_commit":
            self.remote_commits.append({**e, "done": False})
        elif op == "done":
            if e["kind"] == "hold":
                self.holds[(e["org"], e["rid"])].done = True
            else:
                for c in self.remote_commits:
                    if (c["org"], c["rid"]) == (e["org"], e["rid"]):
                        c["done"] = True


_HOLD_KEYS = (
    "org",
    "reservation_id",
    "amount_uecu",
    "team",
    "project",
    "user",
    "job",
    "model",
    "deadline_ms",
)


def _hold_fields(hold: LocalHold) -> dict[str, Any]:
    return {k: getattr(hold, k) for k in _HOLD_KEYS}


def now_ms() -> int:
    """The sidecar's own clock (Redis's is unreachable in degraded mode)."""
    return time.time_ns() // 1_000_000
