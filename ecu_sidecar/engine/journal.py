"""Degraded mode's journal: every local decision, appended and fsynced before it is answered.

One JSON object a line: ``reserve`` (a local hold), ``commit`` and ``release`` (of a local
hold), ``remote_commit`` (a commit of a hold that lives in Redis), and ``done`` / ``failed``
(a replay's result, naming the entry). It survives a SIGKILL of the sidecar: the next process
loads it and replays what is pending (ecu_sidecar.engine.degraded). Once no entry is pending,
the journal is rewritten (temporary file, fsync, rename) to hold only its failed entries, kept
for the operator (empty when there are none). Journals written by older versions stay
readable: a hold without ``t0_ms`` reads its deadline there, a commit without ``billed``
billed its actual.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Journal", "LocalHold", "RemoteCommit"]

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
    t0_ms: int = 0
    """When the hold was granted (the sidecar's clock): its commit's event id is
    ``commit:<rid>:<t0>``. Journals written before it was recorded read the deadline here:
    any value fixed once per hold keeps replays deduplicated."""
    ttl_ms: int = 0
    """The TTL the reserve asked for (0 in older journals): the replay sends it, so that a
    reserve which reached Redis after all is answered as a replay, not as a conflict."""
    rate_card_version: str = ""
    fingerprint: str = ""
    """Of a hold priced from a job spec: what the reserve script compares a replay by."""
    state: str = "A"
    """A active, C committed, R released."""
    actual_uecu: int = 0
    billed_uecu: int = 0
    """What the local commit billed: min(actual, amount + overage bound)."""
    commit_rcv: str = ""
    breakdown: str = ""
    """Of a commit priced from usage lines: the rate card version and the priced lines."""
    usage: tuple[int, int, int] = (0, 0, 0)
    done: bool = False
    """Replayed into Redis."""
    failed: str = ""
    """The reason Redis definitely refused its replay with ('' unless it did)."""
    why: str = ""
    """Redis's message with that refusal."""

    @property
    def kind(self) -> str:
        """The entry kind in the journal's done and failed records."""
        return "hold"

    @property
    def rid(self) -> str:
        """The reservation id."""
        return self.reservation_id


@dataclass
class RemoteCommit:
    """A commit of a hold that lives in Redis, answered while Redis was unreachable."""

    org: str
    rid: str
    actual_uecu: int
    usage: tuple[int, int, int]
    n: int
    """Its number among the journal's remote commits (what done and failed records name)."""
    rate_card_version: str = ""
    breakdown: str = ""
    """Of a commit priced from usage lines: the rate card version and the priced lines."""
    done: bool = False
    failed: str = ""
    why: str = ""

    @property
    def kind(self) -> str:
        """The entry kind in the journal's done and failed records."""
        return "remote"


Entry = LocalHold | RemoteCommit


@dataclass
class Journal:
    """The append-only, fsynced journal of degraded-mode decisions, and its in-memory view."""

    path: str
    allowance_uecu: int
    holds: dict[tuple[str, str], LocalHold] = field(default_factory=dict)
    """Local holds by (organization, reservation id), replayed or not."""
    entries: list[Entry] = field(default_factory=list)
    """Every decision waiting for (or done with) its replay, in journal order."""
    failed: list[Entry] = field(default_factory=list)
    """Entries Redis definitely refused: kept in the journal for the operator."""
    on_failed: Callable[[], None] | None = None
    """Called once per entry marked failed (the server counts it)."""
    _remote_n: int = 0
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
                        except (ValueError, KeyError, TypeError):
                            log.error("degraded journal %s: skipping a torn line", path)
        return journal

    # -- decisions (each fsynced before it is answered) -------------------------------------

    def used(self, org: str) -> int:
        """µECU of this organization's allowance taken by local holds not yet replayed."""
        total = 0
        for hold in self.holds.values():
            if hold.org == org and not hold.done and not hold.failed and hold.state != "R":
                total += max(hold.amount_uecu, hold.billed_uecu)
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
            self.entries.append(hold)
            return hold

    def settle(
        self,
        org: str,
        rid: str,
        op: str,
        actual: int = 0,
        usage: tuple[int, int, int] = (0, 0, 0),
        billed: int = 0,
        rcv: str = "",
        lines: str = "",
    ) -> tuple[LocalHold | None, bool]:
        """Commit (op 'commit', billing ``billed``) or release ('release') a local hold.
        Returns (the hold, or None if not local; whether this call settled it: False when it
        was settled or replayed into Redis already)."""
        with self._lock:
            hold = self.holds.get((org, rid))
            if hold is None or hold.done or hold.state != "A":
                return hold, False
            entry: dict[str, Any] = {"op": op, "org": org, "rid": rid, "actual": actual}
            if op == "commit":
                entry["billed"] = billed
            entry["usage"] = list(usage)
            entry |= _priced(rcv, lines)
            self._write(entry)
            self._apply_settle(hold, entry)
            return hold, True

    def remote_commit(
        self,
        org: str,
        rid: str,
        actual: int,
        usage: tuple[int, int, int],
        rcv: str = "",
        lines: str = "",
    ) -> None:
        """Record a commit of a hold that lives in Redis, to replay when Redis returns."""
        with self._lock:
            entry = {
                "op": "remote_commit",
                "org": org,
                "rid": rid,
                "actual": actual,
                "usage": list(usage),
                "n": self._remote_n,
                **_priced(rcv, lines),
            }
            self._write(entry)
            self._apply(entry)

    def pending_entries(self) -> list[Entry]:
        """The entries still to replay, oldest first."""
        return [e for e in self.entries if not e.done and not e.failed]

    def mark_done(self, entry: Entry) -> None:
        """Record that an entry reached Redis; compact the journal once nothing is pending."""
        with self._lock:
            self._mark({"op": "done", **_ref(entry)})

    def mark_failed(self, entry: Entry, reason: str, message: str) -> None:
        """Record that Redis definitely refused an entry: it is kept (for the operator) and
        never replayed again."""
        with self._lock:
            self._mark({"op": "failed", **_ref(entry), "reason": reason, "message": message})
        if self.on_failed is not None:
            self.on_failed()

    def pending(self) -> int:
        """Entries not yet replayed into Redis (failed ones excluded)."""
        return sum(1 for e in self.entries if not e.done and not e.failed)

    # -- plumbing ---------------------------------------------------------------------------

    def _mark(self, record: dict[str, Any]) -> None:
        self._write(record)
        self._apply(record)
        if self.pending() == 0:
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal as its failed entries only (atomically: a crash leaves either
        the old journal, whose replay repeats idempotently, or the new one)."""
        lines = []
        for n, e in enumerate(self.failed):
            if isinstance(e, LocalHold):
                lines.append({"op": "reserve", **_hold_fields(e)})
                if e.state != "A":
                    settle = {"op": "commit" if e.state == "C" else "release"}
                    settle |= {"org": e.org, "rid": e.rid, "actual": e.actual_uecu}
                    if e.state == "C":
                        settle["billed"] = e.billed_uecu
                    settle |= {"usage": list(e.usage), **_priced(e.commit_rcv, e.breakdown)}
                    lines.append(settle)
            else:
                e.n = n
                lines.append(
                    {"op": "remote_commit", "org": e.org, "rid": e.rid, "actual": e.actual_uecu}
                    | {"usage": list(e.usage), "n": n}
                    | _priced(e.rate_card_version, e.breakdown)
                )
            lines.append({"op": "failed", **_ref(e), "reason": e.failed, "message": e.why})
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path)
        self.holds.clear()
        self.entries.clear()
        self._remote_n = len(self.failed)

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
            fields = {k: e[k] for k in _HOLD_KEYS}
            fields |= {k: e[k] for k in _HOLD_KEYS_SINCE_V2 if k in e}
            hold = LocalHold(**fields)
            if "t0_ms" not in e:
                hold.t0_ms = hold.deadline_ms
            self.holds[(hold.org, hold.reservation_id)] = hold
            self.entries.append(hold)
        elif op in ("commit", "release"):
            self._apply_settle(self.holds[(e["org"], e["rid"])], e)
        elif op == "remote_commit":
            usage: Any = tuple(e["usage"])
            n = e.get("n", self._remote_n)
            commit = RemoteCommit(e["org"], e["rid"], e["actual"], usage, n)
            commit.rate_card_version, commit.breakdown = e.get("rcv", ""), e.get("lines", "")
            self.entries.append(commit)
            self._remote_n = max(self._remote_n, n + 1)
        elif op in ("done", "failed"):
            for entry in self._find(e):
                if op == "done":
                    entry.done = True
                else:
                    entry.failed = e.get("reason") or "FAILED"
                    entry.why = e.get("message", "")
                    self.failed.append(entry)
                    if isinstance(entry, LocalHold):
                        # A new local hold may take the id (the failed one stays listed).
                        del self.holds[(entry.org, entry.rid)]

    @staticmethod
    def _apply_settle(hold: LocalHold, e: dict[str, Any]) -> None:
        hold.state = "C" if e["op"] == "commit" else "R"
        hold.actual_uecu = e["actual"]
        # Journals written before commits were bounded billed the actual.
        hold.billed_uecu = e.get("billed", e["actual"]) if e["op"] == "commit" else 0
        hold.usage = tuple(e["usage"])  # type: ignore[assignment]
        hold.commit_rcv, hold.breakdown = e.get("rcv", ""), e.get("lines", "")

    def _find(self, ref: dict[str, Any]) -> list[Entry]:
        """The entries a done or failed record names (older journals name remote commits by
        organization and id only)."""
        org, rid = ref["org"], ref["rid"]
        if ref["kind"] == "hold":
            hold = self.holds.get((org, rid))
            return [hold] if hold is not None else []
        n = ref.get("n")
        return [
            c
            for c in self.entries
            if isinstance(c, RemoteCommit)
            and (c.org, c.rid) == (org, rid)
            and (n is None or c.n == n)
            and not c.failed
        ]


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
#: Recorded with each local hold since commits are bounded and replays settle landed reserves.
_HOLD_KEYS_SINCE_V2 = ("t0_ms", "ttl_ms", "rate_card_version", "fingerprint")


def _hold_fields(hold: LocalHold) -> dict[str, Any]:
    return {k: getattr(hold, k) for k in (*_HOLD_KEYS, *_HOLD_KEYS_SINCE_V2)}


def _priced(rcv: str, lines: str) -> dict[str, str]:
    """The journal fields of a commit priced from usage lines (none for a plain amount)."""
    return {"rcv": rcv, "lines": lines} if rcv or lines else {}


def _ref(entry: Entry) -> dict[str, Any]:
    """What a done or failed record names an entry by."""
    ref: dict[str, Any] = {"kind": entry.kind, "org": entry.org, "rid": entry.rid}
    if isinstance(entry, RemoteCommit):
        ref["n"] = entry.n
    return ref


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
