"""Model-based test: a hypothesis state machine drives the engine on real Redis with a real
ledger (SQLite, and PostgreSQL) and checks every step against a reference model written here
from the rules (docs/architecture.md, docs/ledger.md), not from the scripts. The rules it
encodes, as the comments below name them:

- R1 a grant Redis refuses (expiry already past, the balance limit, the same grant id with
  other parameters) leaves no credit anywhere: not in Redis, not counted nor pending in the
  ledger, and reconciliation still checks the organization;
- R2 a commit needs a hold: an id Redis has no record of is settled by what the ledger recorded
  of it (committed: a replay or a conflict; released: HOLD_RELEASED; expired: a late commit of
  that hold), and is HOLD_NOT_FOUND when the ledger never saw it;
- R3 a rebuild owns the organization's whole key set: it waits for the outbox to be in the
  ledger, restores the holds the ledger records as outstanding, and starts the hold counters
  again from them (the tombstones are gone);
- R4 an expiring grant never takes held money: at its expiry only min(rest, max(0, balance -
  held)) leaves;
- R5 a late commit bills at most min(actual, hold + bound, max(0, available) + bound), the rest
  counted in late_unbilled (bound = floor(hold x pct / 100));
- R6 degraded mode bills a local commit like its hold would be, and replays it;
- R7 a ledger that cannot be reached is UNAVAILABLE, and changes nothing;
- R8 an approved job is one hold of the wallet: its approval (and what its steps draw beyond it
  under policy wallet) is held, a step moves money from its room to its own hold and back, a
  step bills from the job's money (its hold, then the room) and only beyond that from the wallet
  (policy wallet) or not at all (policy refuse), a step that expired into an open job bills late
  from the room, and the job's end (closed: its live steps released; abandoned: expired) returns
  the room and its live steps to the wallet at once.

Operations: grant (never-expiring and expiring), reserve (one to three holds, all or nothing),
commit below / at / within the overage bound above / far above the hold, release, extend
(next, same and stale sequence), expire (the store's clock steps forward), replay of any
earlier successful call, a reused id with other parameters, unknown ids, and flush
(``Flusher.drain``, then ``Flusher.reconcile``); approved jobs (R8): approve (both policies),
steps drawn from them (within the room, beyond it, refused), heartbeat, close, abandonment, and
their bad input (unknown job, closed job, a step over the approval, a conflicting approval).

Faults and recovery, as steps among the operations:

- loss of an organization's Redis keys: all of them (after a drain: the outbox goes too), all
  but the outbox, only the account hash (what eviction does), only the holds and deadlines;
- rebuilds: the engine's rebuild on first use, the flusher's ``hydrate_missing`` and its
  ``reconcile`` (which finds held != the sum of live holds); refused (UNAVAILABLE, nothing
  changed) while the outbox is not flushed or the ledger is down;
- a flusher that dies mid-cycle (before its ledger transaction; after it, before the Redis
  acknowledgement): the object is abandoned and a new flusher claims its entries;
- ledger outages: PostgreSQL through a TCP proxy that refuses and cuts connections (every
  ledger call fails); SQLite with a foreign connection holding the write lock (writes fail,
  reads go on). Grants answer UNAVAILABLE and change nothing, flushing fails and keeps every
  entry, and resumes after;
- refused grants (R1);
- grant expiry with holds outstanding (R4);
- tombstone purge (the clock steps past ECU_TOMBSTONE_TTL_MS, after a drain) and late commits:
  of an expired hold (R5), and of one whose tombstone is gone (R2);
- a script whose sweep did not reach what it touches (ECU_SWEEP_LIMIT used up by other due
  items; the store's limit 0 for that call): a commit or a release of an overdue hold, or of a
  step of an abandoned job, and a step of an abandoned job, each settling them itself while the
  organization's other due items wait for the next sweep;
- degraded mode (R6): a second sidecar whose Redis is refused grants a hold locally and
  commits, releases or leaves it open, or journals the commit of a hold that lives in Redis;
  Redis comes back and the journal is replayed.

After every step, for every organization: each Redis counter equals the model's exactly;
``Balance.conservation_faults()`` is empty; available never goes below minus the overage
bounds of the commits that may take it there (over their hold, late, degraded); a replay
answers the original outcome and changes nothing (one effect per id). After every drain (flush,
purge, loss of the outbox, a flusher's rebuild) and at the end: the ledger's conservation query
is ok, its totals equal Redis's, nothing is quarantined, no grant is pending, every outbox is
empty; after a flush, reconciliation checks every organization and finds no drift.

Time is stepped, never slept: hold and grant deadlines live on a 50 s grid of clock offsets, so
whether one has passed never depends on how long the test ran (under 50 s per example).

Bounded by default (25 examples x 30 steps on SQLite, 15 on PostgreSQL, derandomized so the
default run is reproducible); ECU_CHAOS_LONG=1 runs 200 x 60 on each, with fresh random seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ecu_sidecar import errors
from ecu_sidecar.engine import Journal, QuotaEngine
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.jobs import JobApproval, JobPolicy
from ecu_sidecar.ledger import Ledger, open_ledger
from ecu_sidecar.ledger.types import LedgerUnavailable
from ecu_sidecar.metrics import FlusherMetrics
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    MAX_REQUEST_UECU,
    AccountRef,
    Balance,
    CommitItem,
    CommitOutcome,
    GrantKind,
    HoldState,
    JobType,
    ReleaseOutcome,
    ReserveItem,
    Usage,
)
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import org_keys
from tests.conftest import (
    PG_URL,
    REDIS_PORT,
    assert_conserved,
    direct_client,
    drop_keys,
    make_settings,
    require_postgres,
    require_redis,
    wait_until_sync,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.chaos

LONG = os.environ.get("ECU_CHAOS_LONG", "") not in ("", "0", "false", "no")
T = TypeVar("T")

UNIT = 50_000
"""The clock grid (ms): every TTL, grant expiry and clock step is a multiple of it."""
PCT = 20
TOMB_UNITS = 1_000
"""ECU_TOMBSTONE_TTL_MS in grid units: far beyond what the expire steps reach in a run, so
tombstones are purged only by the purge step, which drains the outboxes first (in production
the flusher's lag is seconds and a tombstone lives an hour)."""
ALLOWANCE = 200_000
"""ECU_DEGRADED_ALLOWANCE_UECU of the degraded-mode sidecar."""
ORGS = ("m-a", "m-b", "m-c")
"""m-a and m-b are funded at the start; m-c only if a grant rule picks it."""
COUNTERS = {
    "granted": "granted_uecu",
    "balance": "balance_uecu",
    "held": "held_uecu",
    "committed": "committed_uecu",
    "reserved": "reserved_uecu",
    "committed_from_holds": "committed_from_holds_uecu",
    "released": "released_uecu",
    "expired": "expired_uecu",
    "expired_holds": "expired_holds",
    "overage": "overage_uecu",
    "unbilled_overage": "unbilled_overage_uecu",
    "late_committed": "late_committed_uecu",
    "late_unbilled": "late_unbilled_uecu",
    "orphan_committed": "orphan_committed_uecu",
    "carried_committed": "carried_committed_uecu",
    "expired_grants": "expired_grants_uecu",
    "repaired": "repaired_uecu",
}
"""Model counter -> Balance attribute."""
HOLD_COUNTERS = (
    "reserved",
    "committed_from_holds",
    "released",
    "expired",
    "expired_holds",
    "overage",
    "unbilled_overage",
    "late_committed",
    "late_unbilled",
    "orphan_committed",
)
"""The hold counters a rebuild starts again from the restored holds (the ledger's totals of
them go on: the difference is carried in MOrg.base)."""
LOSSES = ("all", "state", "acct", "holds", "jobs")
"""What a loss deletes: every key (after a drain); every key but the outbox; the account hash
only (eviction); the holds hash and the deadlines only; the job records and their indexes."""
BESIDE = ("holds", "jobs")
"""Losses beside a surviving account: found and rebuilt by reconciliation."""


class _FlusherDied(BaseException):
    """The emulated death of a flusher process at one of its fault points."""


class DyingFlusher(Flusher):
    """A flusher that dies at ``point`` (the product's own fault points, ECU_FLUSHER_FAULT),
    raising instead of SIGKILLing the test process; the object is then abandoned."""

    point = ""

    def _maybe_die(self, point: str) -> None:
        if point == self.point:
            raise _FlusherDied(point)


@dataclass
class MHold:
    """The model of one hold."""

    rid: str
    org: str
    amt: int
    ttl: int
    grid_dl: int
    """Deadline on the offset grid: expired once the clock offset reaches it."""
    st: str = "A"
    seq: int = 0
    ettl: int = 0
    released_expired: bool = False
    commit: tuple[Any, ...] | None = None
    """(actual, usage, CommitOutcome) of the commit that settled it."""
    release: Any = None
    settled_at: int = 0
    """Clock offset when it became terminal (its tombstone is purged TOMB_UNITS later)."""
    record: bool = True
    """Redis has its record (False once a purge or a rebuild took the tombstone)."""
    restored: bool = False
    """Restored by a rebuild (R3): its sequence, TTL and reserve parameters are the ledger's."""
    job: str = ""
    """The approved job it is a step of ('' for a wallet hold)."""


@dataclass
class MJob:
    """The model of one approved job (R8)."""

    jid: str
    org: str
    amt: int
    policy: JobPolicy
    ttl: int
    grid_dl: int
    """Abandonment deadline on the offset grid."""
    room: int = 0
    x: int = 0
    sh: int = 0
    cm: int = 0
    n: int = 0
    nc: int = 0
    nr: int = 0
    st: str = "O"
    ret: int = 0
    settled_at: int = 0
    record: bool = True
    """Redis has its record (False once purged past the tombstone retention)."""
    first: Any = None
    """The JobView its approval answered."""

    @property
    def xmax(self) -> int:
        return self.amt * PCT // 100 if self.policy is JobPolicy.WALLET else 0

    def touch(self, offset: int) -> None:
        self.grid_dl = offset + self.ttl


@dataclass
class MOrg:
    """The model of one organization."""

    exists: bool = False
    c: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    expiring: dict[str, list[int]] = field(default_factory=dict)
    """grant id -> [absolute expiry ms, grid expiry, unspent rest]."""
    grants: dict[str, tuple[int, GrantKind, int, Any]] = field(default_factory=dict)
    rebuilt_grants: set[str] = field(default_factory=set)
    """Grants whose Redis record a rebuild rewrote (a replay answers the rebuild's balance)."""
    overage_bound: int = 0
    """Since the last rebuild: sum of floor(amount x pct / 100) over holds committed above
    their amount (what the overage counter may reach)."""
    below_zero_bound: int = 0
    """Over all time: the overage bounds of commits above their hold and of late commits, the
    only ways available goes below zero (R4, R5)."""
    lost: str | None = None
    """The loss (LOSSES) Redis suffered and no rebuild has repaired yet."""
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOLD_COUNTERS, 0))
    """The ledger's hold totals minus Redis's: what rebuilds reset in Redis."""

    @property
    def available(self) -> int:
        return self.c["balance"] - self.c["held"]


def step(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine busy while a rule or invariant runs: if one raises, teardown skips the
    final flush (which would only bury the real failure under a second one)."""

    @functools.wraps(fn)
    def wrapped(self: QuotaMachine, *args: Any, **kwargs: Any) -> None:
        self.busy = True
        self.seen[fn.__name__] += 1
        fn(self, *args, **kwargs)
        self.busy = False

    return wrapped


def _settings(**overrides: Any) -> Settings:
    # The ledger bounds of R7, where this version of the product has them: generous (a loaded
    # machine must not turn this into a latency test: in an outage the ledger's own pool and
    # busy timeouts answer within 0.25 s), and nothing is remembered as unknown.
    overrides.setdefault("redis_connect_timeout_ms", 2_000)  # likewise for Redis
    overrides.setdefault("redis_timeout_ms", 10_000)
    known = {f.name for f in fields(Settings)}
    if "ledger_timeout_ms" in known:
        overrides["ledger_timeout_ms"] = 10_000
    if "ledger_negative_ttl_ms" in known:
        overrides["ledger_negative_ttl_ms"] = 0
    return make_settings("redis", **overrides)


class QuotaMachine(RuleBasedStateMachine):
    """Engine + store + ledger + flusher against the model."""

    ledger_kind = "sqlite"
    tmp_dir = Path("/tmp")
    seen: Counter[str]
    """What the run exercised, over all examples (the test checks nothing was left out)."""
    busy = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.offset = 0
        self.orgs = {o: MOrg() for o in ORGS}
        self.holds: dict[str, MHold] = {}
        self.jobs: dict[str, MJob] = {}
        self.history: list[tuple[str, tuple[Any, ...], Any]] = []
        self.replica: dict[str, dict[str, bytes | None]] = {}
        """Per organization, its keys as a lagging replica holds them (DUMP), until a
        failover promotes it."""
        self.n = 0
        self.flushed_at = 0
        self.schema = ""
        self.outage = False
        self.outages = 0
        self.purges = 0
        self.late_committed = False
        self.unswept = ""
        """The operation running with its script's sweep held back (script_sweep), if any."""
        self.unswept_runs = 0
        self.proxy: TcpProxy | None = None
        self.blocker: sqlite3.Connection | None = None
        if self.ledger_kind == "sqlite":
            self.db_path = f"{self.tmp_dir}/model-{uuid.uuid4().hex[:10]}.db"
            # A short busy timeout: a write lock held by another connection is an outage.
            self.ledger_url = f"sqlite://{self.db_path}?busy_timeout_ms=100"
            direct_url = f"sqlite://{self.db_path}"
        else:
            import psycopg

            self.schema = "model_" + uuid.uuid4().hex[:12]
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
            sep = "&" if "?" in PG_URL else "?"
            options = f"{sep}options=-csearch_path%3D{self.schema}"
            direct_url = f"{PG_URL}{options}"
            parts = urlsplit(PG_URL)
            # The sidecar's ledger goes through a proxy of the test's own: an outage is the
            # proxy refusing and cutting connections; the checks go around it.
            self.proxy = TcpProxy(parts.port or 5432)
            netloc = parts.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{self.proxy.port}"
            netloc[-1] = host
            self.ledger_url = urlunsplit(parts._replace(netloc="@".join(netloc))) + options
        self.settings = _settings(
            ledger_url=self.ledger_url,
            overage_max_percent=PCT,
            tombstone_ttl_ms=TOMB_UNITS * UNIT,
            flusher_claim_idle_ms=0,
            flusher_discovery_interval_ms=0,
        )
        self.direct: Ledger = open_ledger(direct_url)
        """The same ledger, never through the outage: what the checks read."""
        self.direct.migrate()
        self.ledger: Ledger = open_ledger(self.ledger_url, timeout_s=0.25)
        # Its pool connects in the background: the first call waits for that (a loaded run
        # took longer than the short bound, which is for the outages), not the steps.
        for attempt in range(200):
            try:
                self.ledger.organizations()
                break
            except LedgerUnavailable:
                assert attempt < 199, "the ledger never answered through the proxy"
        self.store: RedisStore = self.run(self._make_store(self.settings))
        self.redis = direct_client(self.settings)
        """A Redis client of the test's own: what the faults and the checks go through."""
        self.engine = QuotaEngine(self.store, self.settings, ledger=self.ledger)
        self.flusher = self.new_flusher()
        # A second sidecar in degraded mode, whose Redis is behind a proxy of the test's own
        # (refused and cut: Redis unreachable for it alone), with its journal.
        self.redis_proxy = TcpProxy(REDIS_PORT)
        journal = f"{self.tmp_dir}/journal-{uuid.uuid4().hex[:10]}.jsonl"
        self.dsettings = _settings(
            key_prefix=self.settings.key_prefix,
            redis_url=f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            ledger_url=self.ledger_url,
            overage_max_percent=PCT,
            tombstone_ttl_ms=TOMB_UNITS * UNIT,
            degraded_allowance_uecu=ALLOWANCE,
            degraded_journal=journal,
        )
        self.dstore: RedisStore = self.run(self._make_store(self.dsettings))
        self.dengine = QuotaEngine(
            self.dstore,
            self.dsettings,
            ledger=self.ledger,
            journal=Journal.open(journal, ALLOWANCE),
        )

    async def _make_store(self, settings: Settings) -> RedisStore:
        return RedisStore.from_settings(settings)

    def new_flusher(self, cls: type[Flusher] = Flusher) -> Flusher:
        from prometheus_client import CollectorRegistry

        return cls(self.store, self.ledger, self.settings, FlusherMetrics(CollectorRegistry()))

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if not self.busy:
                # The end of every run: the ledger is back, every loss is rebuilt, and the
                # ledger must equal Redis.
                self.end_outage()
                lost = [org for org, m in self.orgs.items() if m.lost]
                if lost:
                    self.rebuild_by_flusher(lost[0])
                self.flush()
        finally:
            self.end_outage()
            self.run(drop_keys(self.settings))
            self.run(self.store.close())
            self.run(self.redis.aclose())
            self.run(self.dstore.close())
            self.redis_proxy.close()
            self.ledger.close()
            self.direct.close()
            if self.proxy is not None:
                self.proxy.close()
            self.loop.close()
            if self.schema:
                import psycopg

                with psycopg.connect(PG_URL, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA {self.schema} CASCADE")

    # -- helpers ------------------------------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    async def redis_now(self) -> int:
        return await self.store.now_ms()  # Redis TIME plus the offset the steps moved it by

    def step_clock(self, ms: int) -> None:
        self.offset += ms
        self.store.clock_offset_ms = self.dstore.clock_offset_ms = self.offset

    def history_rebuilds(self) -> float:
        registry = self.flusher.metrics.registry
        return registry.get_sample_value("ecu_flusher_history_rebuilds_total") or 0.0

    def xlen(self, org: str) -> int:
        return int(self.run(self.redis.xlen(self.store.outbox_key(org))))

    def sweep(self, org: str) -> None:
        """What a script's sweep does at the current offset: grants first (R4: only the rest
        nobody holds leaves), then holds, then tombstones."""
        m = self.orgs[org]
        due = sorted(
            (exp, gid) for gid, (exp, grid, _) in m.expiring.items() if grid <= self.offset
        )
        for _, gid in due:
            rest = m.expiring.pop(gid)[2]
            gone = min(rest, max(0, m.c["balance"] - m.c["held"]))
            m.c["balance"] -= gone
            m.c["expired_grants"] += gone
            self.seen["grant:expired"] += 1
            if gone < rest:
                self.seen["grant:kept"] += 1
        for h in self.holds.values():
            if h.org == org and h.st == "A" and h.grid_dl <= self.offset:
                self.expire_hold(h)
        for job in self.jobs.values():
            if job.org != org:
                continue
            if job.st == "O" and job.grid_dl <= self.offset:
                self.seen["job:abandoned"] += 1
                self.end_job(job, "X")
            elif job.st != "O" and job.record and job.settled_at + TOMB_UNITS * UNIT <= self.offset:
                job.record = False
                self.seen["job:purged"] += 1
        for h in self.holds.values():
            if (
                h.org == org
                and h.st != "A"
                and h.record
                and h.settled_at + TOMB_UNITS * UNIT <= self.offset
            ):
                h.record = False
                self.seen["tombstone:purged"] += 1

    def expire_hold(self, h: MHold) -> None:
        """An overdue ACTIVE hold expires: its amount returns to available, or to its open
        job's room (R8)."""
        m = self.orgs[h.org]
        h.st = "E"
        h.settled_at = self.offset
        job = self.open_job(h.job)
        if job is not None:
            self.seen["job:step_expired"] += 1
            job.room += h.amt
            job.sh -= h.amt
            job.nr += 1
            return
        self.seen["hold:expired"] += 1
        m.c["held"] -= h.amt
        m.c["expired"] += h.amt
        m.c["expired_holds"] += 1

    def script_sweep(self, org: str, h: MHold | None = None, job: MJob | None = None) -> None:
        """What a script does before its operation: its sweep; or, with the sweep held back
        (``self.unswept``, the store's sweep limit 0: other due items used it up), only what
        the operation touches itself: the job it names, ended first when abandoned (its ACTIVE
        steps expire with it), then the hold, expired when overdue."""
        if not self.unswept:
            self.sweep(org)
            return
        if job is not None and job.st == "O" and job.grid_dl <= self.offset:
            self.seen[f"unswept:{self.unswept}:abandoned"] += 1
            self.end_job(job, "X")
        if h is not None and h.st == "A" and h.grid_dl <= self.offset:
            self.seen[f"unswept:{self.unswept}:expired"] += 1
            self.expire_hold(h)

    def end_job(self, job: MJob, how: str) -> None:
        """R8: a job's end returns its room and its live steps to the wallet (closed: the steps
        are released; abandoned: they expire, so that a late commit still bills them)."""
        m = self.orgs[job.org]
        steps = 0
        for h in self.holds.values():
            if h.job == job.jid and h.org == job.org and h.st == "A":
                h.st = "R" if how == "C" else "E"
                h.settled_at = self.offset
                steps += h.amt
                job.nr += 1
        back = job.room + steps
        m.c["held"] -= back
        m.c["released" if how == "C" else "expired"] += back
        job.st, job.ret, job.room, job.sh = how, back, 0, 0
        job.settled_at = self.offset
        for h in self.holds.values():
            if h.job == job.jid and h.org == job.org and h.st == "R" and h.release is None:
                # A replayed release of a step the close released answers that release.
                h.release = ReleaseOutcome(h.rid, h.amt, HoldState.RELEASED, m.available, False)

    def open_job(self, jid: str) -> MJob | None:
        job = self.jobs.get(jid)
        return job if job is not None and job.st == "O" else None

    def burn(self, org: str, amount: int) -> None:
        """Expiring grants soonest first, never one at or past its expiry (that a held-back
        sweep has not expired yet)."""
        m = self.orgs[org]
        for gid in sorted(m.expiring, key=lambda g: (m.expiring[g][0], g)):
            if amount <= 0:
                return
            if m.expiring[gid][1] <= self.offset:
                continue
            take = min(m.expiring[gid][2], amount)
            m.expiring[gid][2] -= take
            amount -= take
            if m.expiring[gid][2] <= 0:
                del m.expiring[gid]

    def expect_error(self, coro: Awaitable[Any], kind: type[BaseException]) -> BaseException:
        try:
            out = self.run(coro)
        except kind as exc:
            return exc
        raise AssertionError(f"expected {kind.__name__}, got {out!r}")

    def funded_orgs(self) -> list[str]:
        return [o for o, m in self.orgs.items() if m.exists]

    def live_orgs(self) -> list[str]:
        """Funded organizations Redis has whole (not lost)."""
        return [o for o, m in self.orgs.items() if m.exists and not m.lost]

    def usable(self, org: str) -> bool:
        return not self.orgs[org].lost

    def live_holds(self) -> list[str]:
        return sorted(r for r, h in self.holds.items() if self.usable(h.org))

    @property
    def reads_fail(self) -> bool:
        """In this outage the ledger cannot be read either (PostgreSQL unreachable; a locked
        SQLite file is still read)."""
        return self.outage and self.ledger_kind == "postgresql"

    def start_outage(self) -> None:
        self.outage = True
        if self.proxy is not None:
            self.proxy.mode = "refuse"
            self.proxy.cut()
        else:
            self.blocker = sqlite3.connect(self.db_path, isolation_level=None, timeout=5)
            self.blocker.execute("BEGIN IMMEDIATE")

    def end_outage(self) -> None:
        self.outage = False
        if self.proxy is not None and self.proxy.mode != "pass":
            self.proxy.heal()
            # The sidecar's pool reconnects on its own schedule (a backoff: the test shortens
            # its first delay); the ledger is back for the sidecar once it answers again.

            def answers() -> bool:
                try:
                    self.ledger.organizations()
                except LedgerUnavailable:
                    return False
                return True

            wait_until_sync(answers, "the ledger pool reconnected", limit_s=15)
        if self.blocker is not None:
            self.blocker.execute("ROLLBACK")
            self.blocker.close()
            self.blocker = None

    # -- rules: operations --------------------------------------------------------------------

    @initialize(
        amounts=st.lists(st.integers(1, 100_000), min_size=3, max_size=3),
        over=st.sampled_from(["within", "far_above"]),
        starter=st.integers(1, 400_000),
    )
    @step
    def opening(self, amounts: list[int], over: str, starter: int) -> None:
        """Fund two organizations (one with an expiring starter grant, and a hold outlasting it
        that only the starter's money covers), place three holds, commit one above its hold,
        extend one, release one: every kind of call is then in the history for the random
        steps to replay, interleave and expire."""
        for org in ORGS[:2]:
            self._grant(org, 500_000, None)
        self._grant(ORGS[1], starter, 2)
        self._reserve(ORGS[1], [(500_000 + (starter + 1) // 2, 3 * UNIT)])
        self._reserve(ORGS[0], [(a, 2 * UNIT) for a in amounts])
        first, second, third = (self.holds[r] for r in list(self.holds)[-3:])
        self._commit(first, _actual(first.amt, over), Usage(10, 20, 1))
        self._extend(second, "next", 3 * UNIT)
        self._release(third)
        # R8: a job of each policy, with steps that outlive a short one's TTL, so that the
        # random steps find steps to commit, release, expire into the room and bill late.
        for org, policy in zip(ORGS[:2], (JobPolicy.WALLET, JobPolicy.REFUSE), strict=True):
            self._approve(org, 100_000, policy, 4 * UNIT)
            job = self.open_job(list(self.jobs)[-1])
            if job is not None:
                self._job_step(job, [(amounts[0] % 40_000 + 1, 2 * UNIT), (30_000, 3 * UNIT)])
        for org in ORGS[:2]:  # the first step of each job commits above its hold
            first_step = next(
                (h for h in self.holds.values() if h.job and h.org == org and h.st == "A"), None
            )
            if first_step is not None:
                self._commit(first_step, _actual(first_step.amt, over), Usage(5, 5, 1))

    def _grant(self, org: str, amount: int, expires_units: int | None) -> None:
        gid = self.next_id("g")
        kind = GrantKind.TOP_UP if expires_units is None else GrantKind.STARTER
        exp = 0
        if expires_units is not None:
            exp = self.run(self.redis_now()) + expires_units * UNIT
        call = self.engine.grant(org, gid, amount, kind, exp)
        m = self.orgs[org]
        if self.outage:
            # Ledger first: no ledger, no grant (R7), and nothing changed anywhere.
            self.seen["outage:grant"] += 1
            self.expect_error(call, errors.StoreUnavailable)
            return
        if m.c["granted"] + amount > MAX_GRANTED_UECU:
            self.seen["grant_refused:limit"] += 1
            self.expect_error(call, errors.BalanceLimit)
            self.refused_leaves_nothing(org, gid)
            return
        out = self.run(call)
        if m.exists:
            self.sweep(org)
        m.exists = True
        m.c["granted"] += amount
        m.c["balance"] += amount
        if exp:
            m.expiring[gid] = [exp, self.offset + expires_units * UNIT, amount]  # type: ignore[operator]
        assert not out.replayed
        assert (out.balance_uecu, out.available_uecu) == (m.c["balance"], m.available)
        m.grants[gid] = (amount, kind, exp, out)
        self.history.append(("grant", (org, gid, amount, kind, exp), out))

    def refused_leaves_nothing(self, org: str, gid: str) -> None:
        """R1: a grant Redis refused is neither counted nor pending in the ledger."""
        acct = self.direct.ledger_account(org)
        if acct is not None:
            pending = [g[0] for g in acct.unconfirmed_grants]
            assert gid not in pending, f"refused grant {gid} left pending: {acct}"
        if not self.orgs[org].exists:
            self.expect_error(self.store.balance(org), errors.AccountNotFound)

    @precondition(lambda self: any(self.usable(o) for o in ORGS))
    @rule(
        data=st.data(),
        amount=st.integers(1, 600_000),
        expires=st.none() | st.integers(1, 6),
    )
    @step
    def grant(self, data: st.DataObject, amount: int, expires: int | None) -> None:
        org = data.draw(st.sampled_from([o for o in ORGS if self.usable(o)]))
        self._grant(org, amount, expires)

    @precondition(lambda self: not self.outage and any(self.usable(o) for o in ORGS))
    @rule(data=st.data(), why=st.sampled_from(["expired", "limit", "conflict"]))
    @step
    def grant_refused(self, data: st.DataObject, why: str) -> None:
        """R1: Redis refuses the grant; it leaves no credit anywhere (checked now, and by the
        next flush: the ledger's totals equal Redis's and the organization is reconciled)."""
        if why == "limit":
            # m-c is taken up to the limit (a real grant of the room left less 10^15, in
            # grants of at most 10^15), then one more grant would pass it.
            org = "m-c"
            if not self.usable(org):
                return
            m = self.orgs[org]
            while MAX_GRANTED_UECU - m.c["granted"] >= MAX_REQUEST_UECU:
                room = MAX_GRANTED_UECU - m.c["granted"]
                self._grant(org, min(MAX_REQUEST_UECU, room - MAX_REQUEST_UECU + 1), None)
            self._grant(org, MAX_GRANTED_UECU - m.c["granted"] + 1, None)
            return
        org = data.draw(st.sampled_from([o for o in ORGS if self.usable(o)]))
        m = self.orgs[org]
        if why == "conflict":
            if not m.grants:
                return
            gid = data.draw(st.sampled_from(sorted(m.grants)))
            amount, kind, exp, _ = m.grants[gid]
            other = amount + 1 if amount < MAX_REQUEST_UECU else amount - 1
            call = self.engine.grant(org, gid, other, kind, exp)
            self.seen["grant_refused:conflict"] += 1
            self.expect_error(call, errors.IdempotencyConflict)
            return
        gid = self.next_id("gx")
        exp = data.draw(st.sampled_from([1, self.run(self.redis_now()) - 1]))
        call = self.engine.grant(
            org, gid, data.draw(st.integers(1, 600_000)), GrantKind.STARTER, exp
        )
        self.seen["grant_refused:expired"] += 1
        self.expect_error(call, errors.GrantAlreadyExpired)
        self.refused_leaves_nothing(org, gid)

    @precondition(lambda self: any(self.usable(o) for o in ORGS))
    @rule(
        data=st.data(),
        items=st.lists(
            st.tuples(
                st.integers(1, 150_000) | st.integers(500_000, 3_000_000),
                st.sampled_from([0, 2 * UNIT, 3 * UNIT]),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    @step
    def reserve(self, data: st.DataObject, items: list[tuple[int, int]]) -> None:
        org = data.draw(st.sampled_from([o for o in ORGS if self.usable(o)]))
        self._reserve(org, items)

    def _reserve(self, org: str, items: list[tuple[int, int]]) -> None:
        m = self.orgs[org]
        batch = [ReserveItem(self.next_id("r"), a, JobType.GEPA, "", ttl) for a, ttl in items]
        call = self.engine.reserve(AccountRef(org), batch, batch=len(batch) > 1)
        if not m.exists:
            # An organization nobody funded: the engine asks the ledger (which does not know
            # it either, or cannot be read in an outage).
            self.expect_error(
                call, errors.StoreUnavailable if self.reads_fail else errors.AccountNotFound
            )
            return
        self.sweep(org)
        need = sum(a for a, _ in items)
        if need > m.available:
            self.seen["reserve:insufficient"] += 1
            self.expect_error(call, errors.InsufficientEcu)
            return
        out = self.run(call)
        m.c["held"] += need
        m.c["reserved"] += need
        assert out.available_uecu == m.available and not out.replayed
        assert out.available_uecu >= 0, "a new reservation never takes available below zero"
        for it, hv in zip(batch, out.holds, strict=True):
            ttl = it.ttl_ms or self.settings.default_ttl_ms
            assert hv.amount_uecu == it.amount_uecu
            self.holds[it.reservation_id] = MHold(
                it.reservation_id, org, it.amount_uecu, ttl, self.offset + ttl
            )
        self.history.append(("reserve", (org, batch), out))

    # -- approved jobs (R8) -----------------------------------------------------------------

    # Job calls go through the engine, as the sidecar makes them: validation, and the rebuild
    # of an organization Redis lost (the hydrator) before the store call.
    def _approve_call(self, org: str, jid: str, amount: int, policy: JobPolicy, ttl: int) -> Any:
        return self.engine.approve_job(
            AccountRef(org), JobApproval(jid, amount, JobType.JUDGE, policy, ttl)
        )

    def _step_call(self, org: str, jid: str, batch: list[ReserveItem]) -> Any:
        return self.engine.reserve(AccountRef(org), batch, batch=len(batch) > 1, job_id=jid)

    def open_jobs(self) -> list[str]:
        return sorted(j for j, job in self.jobs.items() if job.st == "O" and self.usable(job.org))

    @precondition(lambda self: self.live_orgs())
    @rule(
        data=st.data(),
        amount=st.integers(1, 400_000),
        policy=st.sampled_from(list(JobPolicy)),
        ttl=st.sampled_from([2 * UNIT, 4 * UNIT]),
    )
    @step
    def approve(self, data: st.DataObject, amount: int, policy: JobPolicy, ttl: int) -> None:
        """R8: a job holds its approval against the wallet, all or nothing."""
        self._approve(data.draw(st.sampled_from(self.live_orgs())), amount, policy, ttl)

    def _approve(self, org: str, amount: int, policy: JobPolicy, ttl: int) -> None:
        m = self.orgs[org]
        jid = self.next_id("j")
        call = self._approve_call(org, jid, amount, policy, ttl)
        self.sweep(org)
        if amount > m.available:
            self.seen["job:approve:insufficient"] += 1
            self.expect_error(call, errors.InsufficientEcu)
            return
        out = self.run(call)
        m.c["held"] += amount
        m.c["reserved"] += amount
        job = MJob(jid, org, amount, policy, ttl, self.offset + ttl, room=amount)
        job.first = out
        self.jobs[jid] = job
        assert out.available_uecu == m.available and not out.replayed
        self.check_job(job, out)
        self.seen["job:approve:" + policy.value] += 1
        self.history.append(("approve", (org, jid, amount, policy, ttl), out))

    @precondition(lambda self: self.open_jobs())
    @rule(
        data=st.data(),
        items=st.lists(
            st.tuples(
                st.integers(1, 150_000),
                st.sampled_from([0, 2 * UNIT, 3 * UNIT]),
            ),
            min_size=1,
            max_size=3,
        ),
        drain=st.booleans(),
        beyond=st.booleans(),
    )
    @step
    def job_step(
        self, data: st.DataObject, items: list[tuple[int, int]], drain: bool, beyond: bool
    ) -> None:
        """R8: steps draw from the job's room, at zero available balance too (``drain``: other
        traffic first reserves everything the wallet has left); beyond it, policy refuse
        refuses and policy wallet draws the rest from the wallet (``beyond``: one step just
        past the room, within what the wallet may still add, which random amounts seldom
        hit)."""
        job = self.jobs[data.draw(st.sampled_from(self.open_jobs()))]
        m = self.orgs[job.org]
        self.sweep(job.org)
        if drain and 0 < m.available <= MAX_REQUEST_UECU:
            self._reserve(job.org, [(m.available, 3 * UNIT)])
        elif beyond:
            extra = min(job.xmax - job.x, m.available, 150_000)
            items = [(job.room + max(1, extra // 2), items[0][1])]
        self._job_step(job, items)

    def _job_step(self, job: MJob, items: list[tuple[int, int]]) -> None:
        m = self.orgs[job.org]
        batch = [_step_item(self.next_id("s"), a, ttl) for a, ttl in items]
        call = self._step_call(job.org, job.jid, batch)
        self.script_sweep(job.org, job=job)
        need = sum(a for a, _ in items)
        if job.st != "O":
            self.seen["job:step:closed"] += 1
            self.expect_error(call, errors.JobClosed)
            return
        if any(a > job.amt + job.xmax for a, _ in items):
            self.seen["job:step:exceeds"] += 1
            self.expect_error(call, errors.StepExceedsApproval)
            return
        wneed = max(0, need - job.room)
        if wneed and (job.policy is JobPolicy.REFUSE or wneed > job.xmax - job.x):
            self.seen["job:step:refused"] += 1
            exc = self.expect_error(call, errors.InsufficientEcu)
            assert isinstance(exc, errors.InsufficientEcu) and exc.metadata["scope"] == "job"
            return
        if wneed and wneed > m.available:  # the room alone never asks the wallet, even < 0
            self.seen["job:step:wallet_short"] += 1
            self.expect_error(call, errors.InsufficientEcu)
            return
        out = self.run(call)
        if m.available <= 0:
            self.seen["job:step:at_zero_balance"] += 1
        if m.available < 0:
            self.seen["job:step:below_zero_balance"] += 1  # after a degraded overspend
        job.room -= need - wneed
        job.x += wneed
        job.sh += need
        job.n += len(batch)
        job.touch(self.offset)
        m.c["held"] += wneed
        m.c["reserved"] += wneed
        self.seen["job:step:wallet" if wneed else "job:step"] += 1
        assert out.available_uecu == m.available and not out.replayed
        assert out.job_room_uecu == job.room
        for it in batch:
            ttl = it.ttl_ms or self.settings.default_ttl_ms
            self.holds[it.reservation_id] = MHold(
                it.reservation_id, job.org, it.amount_uecu, ttl, self.offset + ttl, job=job.jid
            )
        self.history.append(("job_step", (job.org, job.jid, batch), out))

    @precondition(lambda self: any(j.record and self.usable(j.org) for j in self.jobs.values()))
    @rule(data=st.data(), op=st.sampled_from(["close", "touch"]))
    @step
    def end_or_touch_job(self, data: st.DataObject, op: str) -> None:
        """R8: close returns the room and the live steps at once (twice: a replay); a heartbeat
        keeps an open job alive and is refused for an ended one."""
        jid = data.draw(
            st.sampled_from(
                sorted(j for j, job in self.jobs.items() if job.record and self.usable(job.org))
            )
        )
        job = self.jobs[jid]
        call = self.engine.job(job.org, jid, op)
        self.sweep(job.org)
        if not job.record:  # purged by this very sweep
            self.expect_error(call, errors.JobNotFound)
            return
        if op == "touch":
            if job.st != "O":
                self.expect_error(call, errors.JobClosed)
                return
            out = self.run(call)
            job.touch(self.offset)
            self.seen["job:touch"] += 1
        else:
            replay = job.st != "O"
            if not replay:
                self.end_job(job, "C")
            out = self.run(call)
            assert out.replayed == replay, out
            self.seen["job:close:replay" if replay else "job:close"] += 1
        self.check_job(job, out)

    def _late_jobs(self) -> list[str]:
        if self.late_committed:  # once per run: its clock step would crowd out the rest
            return []
        return [j for j in self.open_jobs() if self.jobs[j].ttl > 3 * UNIT]

    @precondition(lambda self: self._late_jobs())
    @rule(
        data=st.data(),
        amount=st.integers(1, 50_000),
        mode=st.sampled_from(["zero", "below", "at", "within", "far_above"]),
    )
    @step
    def job_late_commit(self, data: st.DataObject, amount: int, mode: str) -> None:
        """R8: a step that expired into its still open job's room commits late, from the room.
        The random rules seldom line this up (a step's ttl short of its job's, the clock between
        them, then its commit): made here on purpose."""
        job = self.jobs[data.draw(st.sampled_from(self._late_jobs()))]
        self.late_committed = True
        before = set(self.holds)
        self._job_step(job, [(amount, 2 * UNIT)])
        (rid,) = [r for r in self.holds if r not in before] or [None]
        if rid is None:
            return  # refused (no room, policy refuse): checked by _job_step
        self.step_clock(3 * UNIT)  # past the step's deadline, short of its job's
        for org in self.live_orgs():
            self.sweep(org)
        h = self.holds[rid]
        assert h.st == "E" and self.jobs[job.jid].st == "O", (h, job)
        self._commit(h, _actual(h.amt, mode), Usage(0, 0, 0))

    @precondition(lambda self: self.live_orgs())
    @rule(data=st.data(), what=st.sampled_from(["unknown", "conflict", "exceeds", "closed"]))
    @step
    def job_bad_input(self, data: st.DataObject, what: str) -> None:
        """R8: a step of an unknown job, an approval reusing a job id with other parameters, a
        step over the job's approval, a step of an ended job: each refused, nothing changes
        (the check after the step compares every counter and every job)."""
        orgs = self.live_orgs()
        if what == "closed":  # an ended job answers until its purge: an organization with one
            ended = {j.org for j in self.jobs.values() if j.record and j.st != "O"}
            orgs = [o for o in orgs if o in ended] or orgs
        org = data.draw(st.sampled_from(orgs))
        jobs = [j for j in self.jobs.values() if j.org == org and j.record]
        step_item = [_step_item(self.next_id("b"), 1)]
        if what == "unknown" or not jobs:
            self.expect_error(self._step_call(org, "never-" + self.next_id("j"), step_item),
                              errors.JobNotFound)  # fmt: skip
            self.seen["job:bad:unknown"] += 1
            return
        if what == "closed":
            jobs = [j for j in jobs if j.st != "O"] or jobs
        job = data.draw(st.sampled_from(jobs))
        self.sweep(org)
        if not job.record:
            return
        if what == "conflict":
            call = self._approve_call(org, job.jid, job.amt + 1, job.policy, job.ttl)
            self.expect_error(call, errors.IdempotencyConflict)
        elif what == "exceeds" and job.st == "O":
            big = [_step_item(self.next_id("b"), job.amt + job.xmax + 1)]
            self.expect_error(self._step_call(org, job.jid, big), errors.StepExceedsApproval)
        elif job.st != "O":
            self.expect_error(self._step_call(org, job.jid, step_item), errors.JobClosed)
        else:
            return
        self.seen["job:bad:" + what] += 1

    def check_job(self, job: MJob, v: Any) -> None:
        """Redis's view of a job is the model's."""
        got = (
            v.state.value, v.approved_uecu, v.extra_uecu, v.room_uecu, v.steps_held_uecu,
            v.committed_uecu, v.steps, v.steps_committed, v.steps_ended, v.returned_uecu,
        )  # fmt: skip
        want = (
            job.st, job.amt, job.x, job.room, job.sh, job.cm, job.n, job.nc, job.nr, job.ret,
        )  # fmt: skip
        assert got == want, f"job {job.jid}: Redis {got} != model {want}"

    def _replayable(self, rid: str) -> bool:
        """A hold whose reserve a replay can be checked against: Redis has the record the
        reserve made (a reserve of an id whose record is gone places a new hold, and a restored
        record carries the ledger's parameters)."""
        h = self.holds[rid]
        return self.usable(h.org) and h.record and not h.restored

    @precondition(lambda self: any(self._replayable(r) for r in self.holds))
    @rule(data=st.data())
    @step
    def reserve_conflict(self, data: st.DataObject) -> None:
        """A used reservation id with other parameters is refused and changes nothing."""
        rid = data.draw(st.sampled_from(sorted(r for r in self.holds if self._replayable(r))))
        h = self.holds[rid]
        item = ReserveItem(h.rid, h.amt + 1, JobType.GEPA, "", h.ttl)
        self.sweep(h.org)
        self.expect_error(
            self.engine.reserve(AccountRef(h.org), [item]), errors.IdempotencyConflict
        )

    @precondition(lambda self: self.live_holds())
    @rule(
        data=st.data(),
        mode=st.sampled_from(["zero", "below", "at", "within", "far_above"]),
        usage=st.tuples(st.integers(0, 5_000), st.integers(0, 5_000), st.integers(0, 3)),
    )
    @step
    def commit(self, data: st.DataObject, mode: str, usage: tuple[int, int, int]) -> None:
        h = self.holds[data.draw(st.sampled_from(self.live_holds()))]
        self._commit(h, _actual(h.amt, mode), Usage(*usage))

    def _commit(self, h: MHold, actual: int, usage: Usage) -> None:
        call = self.engine.commit(h.org, [CommitItem(h.rid, actual, usage)])
        self.script_sweep(h.org, h, self.jobs.get(h.job) if h.job and h.record else None)
        if not h.record:
            # R2: Redis has no record; the ledger (fully flushed: purges and rebuilds drain
            # first) knows the hold's last state.
            if self.reads_fail:
                self.expect_error(call, errors.StoreUnavailable)
                return
            if h.st == "C":
                (o,) = self.run(call)
                self.check_commit_replay(h, actual, usage, o, from_ledger=True)
                return
            if h.st == "R":
                (o,) = self.run(call)
                assert isinstance(o.error, errors.HoldReleased), o
                return
            assert h.st == "E", h
            self.seen["commit:late:known"] += 1
        elif h.st == "R":
            (o,) = self.run(call)
            assert isinstance(o.error, errors.HoldReleased), o
            return
        elif h.st == "C":
            (o,) = self.run(call)
            self.check_commit_replay(h, actual, usage, o, from_ledger=False)
            return
        want = self.bill(h, actual, usage)
        (o,) = self.run(call)
        assert o.error is None, o
        assert o == want, (o, want)
        assert o.overage_uecu <= h.amt * PCT // 100, "overage is bounded by the hold's percent"
        self.history.append(("commit", (h.org, h.rid, actual, usage), o))

    def _batchable_jobs(self) -> list[str]:
        """Jobs with two or more steps Redis holds the records of, not yet settled."""
        steps: Counter[str] = Counter(
            h.job for h in self.holds.values()
            if h.job and h.record and h.st in ("A", "E") and self.usable(h.org)
        )  # fmt: skip
        return sorted(j for j, n in steps.items() if n >= 2)

    @precondition(lambda self: self._batchable_jobs())
    @rule(data=st.data(), mode=st.sampled_from(["below", "at", "within", "far_above"]))
    @step
    def job_commit_batch(self, data: st.DataObject, mode: str) -> None:
        """R8: steps of one job committed in one CommitBatch, which writes the job record once
        at the end (an expired step's expiry reads it in between): each item billed in order,
        as one commit at a time would be."""
        jid = data.draw(st.sampled_from(self._batchable_jobs()))
        rids = sorted(
            r for r, h in self.holds.items()
            if h.job == jid and h.record and h.st in ("A", "E")
        )  # fmt: skip
        rids = data.draw(st.lists(st.sampled_from(rids), min_size=2, max_size=3, unique=True))
        hs = [self.holds[r] for r in rids]
        items = [CommitItem(h.rid, _actual(h.amt, mode), Usage(0, 0, 0)) for h in hs]
        call = self.engine.commit(hs[0].org, items)
        self.sweep(hs[0].org)
        want = [self.bill(h, it.actual_uecu, it.usage) for h, it in zip(hs, items, strict=True)]
        got = self.run(call)
        assert list(got) == want, (got, want)
        self.seen["job:commit:batch"] += 1

    def bill(self, h: MHold, actual: int, usage: Usage, *, known: str = "") -> CommitOutcome:
        """The model of a commit that bills ``h`` (active, expired, or a hold Redis has no
        record of that the caller knows: ``known`` 'late' from the ledger, R2; 'degraded' from
        degraded mode's journal, R6); returns the outcome it must answer."""
        m = self.orgs[h.org]
        bound = h.amt * PCT // 100
        capped = min(actual, h.amt + bound)
        late = h.st == "E" or known == "late"
        orphan = known == "degraded"
        overage = released = 0
        # R8: a step Redis has the record of bills from its job's money while the job is open.
        of_job = self.jobs.get(h.job) if h.job and h.record and not known else None
        job = of_job if of_job is not None and of_job.st == "O" else None
        if job is not None and late:
            # Expired into the room: bills late from the room, at most what is in it.
            billed = min(capped, job.room)
            job.room -= billed
            m.c["held"] -= billed
            m.c["committed_from_holds"] += billed
            m.c["late_unbilled"] += actual - billed
            self.seen["job:commit:late_from_room"] += 1
        elif job is not None:
            billed = from_job = capped
            if capped > h.amt:
                from_room = min(capped - h.amt, job.room)
                from_job = h.amt + from_room
                if job.policy is JobPolicy.REFUSE:
                    billed = from_job
                self.seen[f"job:commit:over:{job.policy.value}"] += 1
                m.overage_bound += bound
                m.below_zero_bound += bound
            overage = max(0, billed - h.amt)
            released = h.amt - min(billed, h.amt)
            m.c["held"] -= from_job
            m.c["committed_from_holds"] += from_job
            m.c["overage"] += billed - from_job
            m.c["unbilled_overage"] += actual - billed
            job.room += h.amt - from_job
            job.sh -= h.amt
            self.seen["job:commit"] += 1
        elif orphan:
            # The configured allowance bounds degraded mode; its replay bills like the hold.
            billed = capped
            m.c["orphan_committed"] += billed
            m.c["unbilled_overage"] += actual - billed
            m.below_zero_bound += h.amt + bound
        elif late:
            # R5: the hold's money was lent again; bill at most what is available now plus
            # the hold's bound, the rest counted unbilled.
            billed = min(capped, max(0, m.available) + bound)
            m.c["late_committed"] += billed
            m.c["late_unbilled"] += actual - billed
            m.below_zero_bound += bound
            if billed < capped:
                self.seen["commit:late:cut"] += 1
        else:
            billed = capped
            overage = max(0, billed - h.amt)
            released = h.amt - min(billed, h.amt)
            m.c["held"] -= h.amt
            m.c["committed_from_holds"] += min(billed, h.amt)
            m.c["released"] += released
            m.c["overage"] += overage
            m.c["unbilled_overage"] += actual - billed
            if actual > h.amt:
                m.overage_bound += bound
                m.below_zero_bound += bound
        self.burn(h.org, billed)
        m.c["balance"] -= billed
        m.c["committed"] += billed
        if of_job is not None and of_job.record:
            of_job.cm += billed
            of_job.nc += 1
            if job is not None:
                job.touch(self.offset)
        kind = "orphan" if orphan else "late" if late else "over" if actual > h.amt else ""
        self.seen[f"commit:{kind}" if kind else "commit"] += 1
        want = CommitOutcome(
            h.rid,
            committed_uecu=billed,
            released_uecu=released,
            overage_uecu=overage,
            unbilled_overage_uecu=actual - billed,
            late=late or orphan,
            available_uecu=m.available,
        )
        if not h.record:
            h.restored = True  # the record is remade from what the caller knew of the hold
        h.st = "C"
        h.record = True
        h.settled_at = self.offset
        h.commit = (actual, usage, want)
        return want

    def check_commit_replay(
        self, h: MHold, actual: int, usage: Usage, o: Any, *, from_ledger: bool
    ) -> None:
        """A committed hold committed again: the same actual and usage answer the recorded
        outcome (Redis's record, or the ledger's for a hold whose record is gone: R2), other
        ones are a conflict. Nothing changes either way."""
        first_actual, first_usage, first = h.commit  # type: ignore[misc]
        if (first_actual, first_usage) != (actual, usage):
            assert isinstance(o.error, errors.IdempotencyConflict), o
            return
        assert o.replayed and o.error is None, o
        if from_ledger:
            # The ledger records what was billed, not the balance right after it.
            self.seen["commit:ledger_replay"] += 1
            want = (first.committed_uecu, first.released_uecu, first.overage_uecu)
            assert (o.committed_uecu, o.released_uecu, o.overage_uecu) == want, (o, first)
            assert (o.unbilled_overage_uecu, o.late) == (
                first.unbilled_overage_uecu,
                first.late,
            ), (o, first)
        else:
            assert o == _replayed(first), (o, first)

    @precondition(lambda self: self.live_holds())
    @rule(data=st.data())
    @step
    def release(self, data: st.DataObject) -> None:
        self._release(self.holds[data.draw(st.sampled_from(self.live_holds()))])

    def _release(self, h: MHold) -> None:
        m = self.orgs[h.org]
        call = self.engine.release(h.org, h.rid)
        self.script_sweep(h.org, h, self.jobs.get(h.job) if h.job and h.record else None)
        if not h.record:
            self.expect_error(call, errors.HoldNotFound)
            return
        if h.st == "C":
            self.expect_error(call, errors.HoldCommitted)
            return
        out = self.run(call)
        if h.st == "R":
            assert out.replayed and out == _replayed(h.release)
            return
        if h.st == "E":
            assert (out.released_uecu, out.state, out.replayed) == (
                0,
                HoldState.EXPIRED,
                h.released_expired,
            ), out
            assert out.available_uecu == m.available
            h.released_expired = True
            return
        job = self.open_job(h.job)
        if job is not None:  # R8: back into the room
            job.room += h.amt
            job.sh -= h.amt
            job.nr += 1
            job.touch(self.offset)
            self.seen["job:release"] += 1
        else:
            m.c["held"] -= h.amt
            m.c["released"] += h.amt
        assert (out.released_uecu, out.replayed, out.available_uecu) == (h.amt, False, m.available)
        h.st = "R"
        h.settled_at = self.offset
        h.release = out
        self.history.append(("release", (h.org, h.rid), out))

    @precondition(lambda self: self.live_holds())
    @rule(
        data=st.data(),
        which=st.sampled_from(["next", "same", "stale"]),
        ttl=st.sampled_from([0, 2 * UNIT, 4 * UNIT]),
    )
    @step
    def extend(self, data: st.DataObject, which: str, ttl: int) -> None:
        self._extend(self.holds[data.draw(st.sampled_from(self.live_holds()))], which, ttl)

    def _extend(self, h: MHold, which: str, ttl: int) -> None:
        if h.restored:
            # A restored hold's sequence and own TTL are what the ledger recorded: heartbeat
            # it with a higher sequence and an explicit TTL.
            which, ttl = "next", ttl or 2 * UNIT
        seq = {"next": h.seq + 1, "same": max(h.seq, 1), "stale": h.seq - 1}[which]
        if seq < 1:
            seq = h.seq + 1
        call = self.engine.extend(h.org, h.rid, ttl, seq)
        self.sweep(h.org)
        if not h.record:
            self.expect_error(call, errors.HoldNotFound)
            return
        if h.st != "A":
            kind = {"C": errors.HoldCommitted, "R": errors.HoldReleased, "E": errors.HoldExpired}
            self.expect_error(call, kind[h.st])
            return
        if seq < h.seq:
            self.expect_error(call, errors.StaleSequence)
            return
        if seq == h.seq:
            if ttl != h.ettl:
                self.expect_error(call, errors.IdempotencyConflict)
                return
            out = self.run(call)
            assert out.replayed
            return
        out = self.run(call)
        assert not out.replayed
        job = self.open_job(h.job)
        if job is not None:  # a step's heartbeat is its job's
            job.touch(self.offset)
        h.grid_dl = max(h.grid_dl, self.offset + (ttl or h.ttl))
        h.seq, h.ettl = seq, ttl
        self.history.append(("extend", (h.org, h.rid, ttl, seq), out))

    @rule(
        units=st.integers(1, 4),
        unswept=st.booleans(),
        pick=st.tuples(st.integers(0, 999), st.integers(0, 999)),
        size=st.sampled_from(["zero", "below", "at", "within", "far_above"]),
    )
    @step
    def expire(self, units: int, unswept: bool, pick: tuple[int, int], size: str) -> None:
        """Step the store's clock forward (holds and grants on the grid may pass their time).
        ``unswept`` (once an example, in place of ``units``): scripts then meet what is due
        with their sweep held back (_unswept_step)."""
        if unswept and not self.unswept_runs and (self._unswept_jobs() or self._unswept_holds()):
            self._unswept_step(pick, size)
        else:
            self.step_clock(units * UNIT)
        for org in self.live_orgs():  # what the next script's sweep does in Redis
            self.sweep(org)

    def _unswept_step(self, pick: tuple[int, int], size: str) -> None:
        """A step that outlives its job's deadline is placed first (live steps of an abandoned
        job are rare otherwise), on a policy-wallet job where there is one (the outcomes of
        policy refuse are the rarer), and the clock goes past that deadline and the next
        deadline of another live hold; then, each with the sweep held back (_unswept), a
        commit, a release or a step of that job (``pick``), a commit of an overdue hold and a
        release of another."""
        self.unswept_runs += 1
        jobs = self._unswept_jobs()
        jobs = [j for j in jobs if self.jobs[j].policy is JobPolicy.WALLET] or jobs
        due, jid = [], ""
        if jobs:
            job = self.jobs[jobs[pick[0] % len(jobs)]]
            self._job_step(job, [(1_000, job.ttl + UNIT)])
            due, jid = [job.grid_dl], job.jid
        others = [
            self.holds[r].grid_dl
            for r in self._unswept_holds()
            if not jid or self.holds[r].job != jid
        ]
        due += [min(others)] if others else []
        self.step_clock(max(due) - self.offset)
        ops = [("commit", "abandoned"), ("release", "abandoned"), ("step", "abandoned")]
        for key in [ops[pick[1] % 3], ("commit", "expired"), ("release", "expired")]:
            self._unswept(key, pick[1], size)

    def _unswept_jobs(self) -> list[str]:
        live = set(self.live_orgs())
        return [j for j in self.open_jobs() if self.jobs[j].org in live]

    def _unswept_holds(self) -> list[str]:
        live = set(self.live_orgs())
        return sorted(
            r for r, h in self.holds.items() if h.st == "A" and h.record and h.org in live
        )

    def _unswept(self, key: tuple[str, str], pick: int, size: str) -> None:
        """A script meets an overdue hold or an abandoned job its own sweep did not reach
        (ECU_SWEEP_LIMIT bounds a sweep; here other due items have used it up: the store's
        limit is 0 for the call). It settles what it touches itself, the job it names before
        the hold, and a late commit bills against an available balance that the organization's
        other overdue holds still weigh on. ``key``: the operation (a commit or a release of
        a hold, or a step of a job) and what its script finds (an overdue hold, or a step's
        job abandoned); nothing when there is no such target."""
        live = set(self.live_orgs())
        due_jobs = sorted(
            j for j, job in self.jobs.items()
            if job.st == "O" and job.org in live and job.grid_dl <= self.offset
        )  # fmt: skip
        holds = [
            r for r, h in self.holds.items()
            if h.st == "A" and h.record and h.org in live and (
                h.job in due_jobs if key[1] == "abandoned"
                else (h.grid_dl <= self.offset and h.job not in due_jobs)
            )
        ]  # fmt: skip
        pool = due_jobs if key[0] == "step" else sorted(holds)
        if not pool:
            return
        target = pool[pick % len(pool)]
        op = key[0]
        self.unswept, self.store.sweep_limit = op, 0
        try:
            if op == "step":
                self._job_step(self.jobs[target], [(1_000, 0)])
            elif op == "commit":
                h = self.holds[target]
                self._commit(h, _actual(h.amt, size), Usage(0, 0, 0))
            else:
                self._release(self.holds[target])
        finally:
            self.unswept = ""
            self.store.sweep_limit = self.settings.sweep_limit

    @precondition(lambda self: not self.outage and self.purges < 2)
    @rule()
    @step
    def purge(self) -> None:
        """Drain, then step the clock past the tombstone TTL: every settled hold's record is
        purged (and every hold and grant expires). Twice per run at most: a purge leaves
        nothing live."""
        self.purges += 1
        self.run(self.flusher.drain())
        self.check_ledger()
        self.step_clock(TOMB_UNITS * UNIT)
        for org in self.live_orgs():
            self.sweep(org)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    @step
    def replay(self, data: st.DataObject) -> None:
        """Any earlier successful call again, same ids: the original outcome, no effect."""
        calls = [(k, a, o) for k, a, o in self.history if self._can_replay(k, a)]
        if not calls:
            return
        kind = data.draw(st.sampled_from(sorted({k for k, _, _ in calls})))
        calls = [(a, o) for k, a, o in calls if k == kind]
        args, first = calls[data.draw(st.integers(0, len(calls) - 1))]
        self.seen["replay:" + kind] += 1
        if kind == "grant":
            org, gid, amount, gkind, exp = args
            call = self.engine.grant(org, gid, amount, gkind, exp)
            if self.outage:
                self.expect_error(call, errors.StoreUnavailable)
                return
            out = self.run(call)
            assert out.replayed
            if gid not in self.orgs[org].rebuilt_grants:
                assert out == _replayed(first)
        elif kind == "reserve":
            org, batch = args
            out = self.run(self.engine.reserve(AccountRef(org), batch, batch=len(batch) > 1))
            assert out.replayed and out.available_uecu == first.available_uecu
            assert [hv.amount_uecu for hv in out.holds] == [it.amount_uecu for it in batch]
        elif kind == "commit":
            org, rid, actual, usage = args
            self._commit(self.holds[rid], actual, usage)
        elif kind == "release":
            org, rid = args
            h = self.holds[rid]
            call = self.engine.release(org, rid)
            if not h.record:
                self.expect_error(call, errors.HoldNotFound)
                return
            out = self.run(call)
            assert out.replayed and out == _replayed(first)
        elif kind == "approve":
            org, jid, amount, policy, ttl = args
            out = self.run(self._approve_call(org, jid, amount, policy, ttl))
            assert out.replayed
            self.check_job(self.jobs[jid], out)
        elif kind == "job_step":
            org, jid, batch = args
            out = self.run(self._step_call(org, jid, batch))
            assert out.replayed and out.available_uecu == first.available_uecu
            assert [hv.amount_uecu for hv in out.holds] == [it.amount_uecu for it in batch]
        elif kind == "extend":
            org, rid, ttl, seq = args
            h = self.holds[rid]
            call = self.engine.extend(org, rid, ttl, seq)
            if not h.record:
                self.expect_error(call, errors.HoldNotFound)
            elif h.st != "A":
                kinds = {"C": errors.HoldCommitted, "R": errors.HoldReleased}
                self.expect_error(call, kinds.get(h.st, errors.HoldExpired))
            elif seq < h.seq:
                self.expect_error(call, errors.StaleSequence)
            else:
                assert self.run(call).replayed

    def _can_replay(self, kind: str, args: tuple[Any, ...]) -> bool:
        org = args[0]
        if not self.usable(org):
            return False
        if kind == "reserve":
            return all(self._replayable(it.reservation_id) for it in args[1])
        if kind == "approve":
            return self.jobs[args[1]].record
        if kind == "job_step":
            return self.jobs[args[1]].record and all(
                self._replayable(it.reservation_id) for it in args[2]
            )
        if kind == "extend":
            return not self.holds[args[1]].restored
        return True

    @precondition(lambda self: self.live_orgs())
    @rule(data=st.data(), op=st.sampled_from(["commit", "release", "extend"]))
    @step
    def unknown_id(self, data: st.DataObject, op: str) -> None:
        """An id that was never reserved: HOLD_NOT_FOUND, nothing changes (R2: the ledger
        does not know it either; in an outage that cannot be told: UNAVAILABLE)."""
        org = data.draw(st.sampled_from(self.live_orgs()))
        rid = "never-" + self.next_id("x")
        self.sweep(org)
        if op == "commit":
            call = self.engine.commit(org, [CommitItem(rid, 5)])
            if self.reads_fail:
                self.expect_error(call, errors.StoreUnavailable)
                return
            (o,) = self.run(call)
            assert isinstance(o.error, errors.HoldNotFound), o
        elif op == "release":
            self.expect_error(self.engine.release(org, rid), errors.HoldNotFound)
        else:
            self.expect_error(self.engine.extend(org, rid, 0, 1), errors.HoldNotFound)

    @precondition(lambda self: len(self.history) >= self.flushed_at + 3)
    @rule()
    @step
    def flush(self) -> None:
        """Drain the outboxes into the ledger; the ledger must then equal Redis (in an outage
        the drain fails and every entry stays in its outbox)."""
        if self.outage:
            self._outage_flush()
            return
        self.flushed_at = len(self.history)
        self.run(self.flusher.drain())
        self.check_ledger()
        if any(m.lost for m in self.orgs.values()):
            return  # reconciliation would rebuild them: the rebuild steps do that
        drifts = self.run(self.flusher.reconcile())
        for org in self.funded_orgs():
            assert drifts.get(org) == 0, f"reconcile skipped or repaired {org}: {drifts}"

    def _outage_flush(self) -> None:
        """A drain in an outage fails, and every entry stays in its outbox."""
        before = {o: self.xlen(o) for o in ORGS}
        if any(before.values()):
            self.seen["outage:flush"] += 1
            self.expect_error(self.flusher.drain(), Exception)
        else:
            # Nothing to move; its discovery may still find the ledger down (R7).
            with contextlib.suppress(LedgerUnavailable):
                self.run(self.flusher.drain())
        assert {o: self.xlen(o) for o in ORGS} == before, "an outage loses no outbox entry"

    def check_ledger(self) -> None:
        """After a drain: the ledger's conservation query is ok and it says what Redis says."""
        for org in self.funded_orgs():
            m = self.orgs[org]
            assert self.xlen(org) == 0, f"{org}: outbox not empty after a drain"
            assert not self.direct.quarantined(org=org), self.direct.quarantined(org=org)
            c = self.direct.conservation(org)
            assert_conserved(ledger=c)
            assert c is not None
            want = (m.c["granted"], m.c["expired_grants"], m.c["committed"], m.c["balance"])
            got = (c.granted_uecu, c.expired_grants_uecu, c.committed_uecu, c.balance_uecu)
            assert got == want, f"{org}: ledger {got} != model {want}"
            acct = self.direct.account(org)
            assert acct is not None
            la = self.direct.ledger_account(org)
            assert la is not None and not la.unconfirmed_grants, la
            h = acct.holds
            total = {k: m.c[k] + m.base[k] for k in HOLD_COUNTERS}
            got_h = (
                h.reserved_uecu,
                h.released_uecu,
                h.expired_uecu,
                h.expired_holds,
                h.overage_uecu,
                h.late_committed_uecu,
                h.unbilled_uecu,
            )
            want_h = (
                total["reserved"],
                total["released"],
                total["expired"],
                total["expired_holds"],
                total["overage"],
                total["late_committed"],
                total["unbilled_overage"] + total["late_unbilled"],
            )
            assert got_h == want_h, f"{org}: ledger holds {h} != model {total}"

    # -- rules: faults and recovery -----------------------------------------------------------

    @precondition(lambda self: self.live_orgs())
    @rule(data=st.data(), what=st.sampled_from(LOSSES))
    @step
    def lose(self, data: st.DataObject, what: str) -> None:
        """Redis loses some or all of an organization's keys."""
        orgs = self.live_orgs()
        if what == "jobs":
            # An open job lost is what reconcile must find: held != the live holds plus the open
            # jobs' rooms, a live step whose job is gone, or (a job holding nothing) fewer open
            # jobs than the ledger records. Ended ones alone lost may be rebuilt or not.
            orgs = [o for o in orgs if any(j.org == o and j.st == "O" for j in self.jobs.values())]
            if not orgs:
                return
        if what == "holds":
            # Held money lost with its holds is what reconcile must find (R3: held != the sum
            # of the live holds); tombstones alone lost may be rebuilt or not, and so may the
            # empty holds of an organization whose held is all open jobs' rooms.
            live = {h.org for h in self.holds.values() if h.st == "A" and h.record}
            orgs = [o for o in orgs if o in live]
            if not orgs:
                return
        org = data.draw(st.sampled_from(orgs))
        if what == "all":
            if self.outage:
                return  # the outbox is lost too: only after a drain, which needs the ledger
            self.run(self.flusher.drain())
            self.check_ledger()
        keys = org_keys(self.settings.key_prefix, org)
        names = {
            "all": keys,
            "state": keys[:4] + keys[5:],
            "acct": keys[:1],
            "holds": keys[1:3],
            "jobs": keys[7:10],
        }[what]
        self.run(self.redis.delete(*names))
        self.orgs[org].lost = what
        self.seen["lose:" + what] += 1

    @precondition(lambda self: any(m.lost for m in self.orgs.values()))
    @rule(data=st.data(), by=st.sampled_from(["engine", "flusher"]))
    @step
    def rebuild(self, data: st.DataObject, by: str) -> None:
        """Rebuild a lost organization: on first use by the engine (not for lost holds: the
        account is there), or by the flusher (drain, then hydrate_missing, or reconcile for
        lost holds)."""
        org = data.draw(st.sampled_from(sorted(o for o, m in self.orgs.items() if m.lost)))
        m = self.orgs[org]
        if by == "flusher" or m.lost in BESIDE:
            self.rebuild_by_flusher(org)
            return
        if self.xlen(org) or self.reads_fail:
            # R3: not before the outbox is flushed, nor without the ledger; nothing changes.
            self.seen["rebuild:refused"] += 1
            self.expect_error(self.engine.balance(org), errors.StoreUnavailable)
            self.expect_error(self.store.balance(org), errors.AccountNotFound)
            if self.outage:
                return
            # The flusher drains the outbox; then the next use rebuilds.
            self.run(self.flusher.drain())
            self.check_ledger()
        self.run(self.engine.balance(org))
        self.rebuilt(org)
        self.seen["rebuild:engine"] += 1

    def rebuild_by_flusher(self, org: str) -> None:
        """The flusher's loop: drain, hydrate_missing (rebuilds every organization whose
        account is gone), reconcile (rebuilds those whose holds are gone beside the account).
        Every lost organization is rebuilt at once."""
        lost = {o for o, m in self.orgs.items() if m.lost}
        if self.outage:
            if self.reads_fail or any(self.xlen(o) for o in ORGS):
                # R3: nothing is rebuilt before the outbox is in the ledger, nor without it.
                self.seen["rebuild:refused"] += 1
                if any(self.xlen(o) for o in ORGS):
                    self.expect_error(self.flusher.drain(), Exception)
                else:
                    self.expect_error(self.flusher.hydrate_missing(), Exception)
                for o in lost:
                    if self.orgs[o].lost not in BESIDE:
                        self.expect_error(self.store.balance(o), errors.AccountNotFound)
                return
            if self.orgs[org].lost in BESIDE:
                return  # reconcile would have to write to the locked ledger
        self.run(self.flusher.drain())
        self.check_ledger()
        gone = {o for o in lost if self.orgs[o].lost not in BESIDE}
        rebuilt = self.run(self.flusher.hydrate_missing())
        assert set(rebuilt) == gone, (rebuilt, gone)
        for o in sorted(gone):
            self.rebuilt(o)
            self.seen["rebuild:hydrate_missing"] += 1
        if self.outage:
            return
        drifts = self.run(self.flusher.reconcile())
        for o in sorted(lost - gone):
            self.rebuilt(o)
            self.seen["rebuild:reconcile"] += 1
        for o in self.funded_orgs():
            if o not in lost:
                assert drifts.get(o) == 0, f"reconcile skipped or repaired {o}: {drifts}"

    @precondition(lambda self: self.live_orgs() and not any(m.lost for m in self.orgs.values()))
    @rule(data=st.data())
    @step
    def replica_lags(self, data: st.DataObject) -> None:
        """What a lagging replica holds of an organization: its keys as they are now."""
        org = data.draw(st.sampled_from(self.live_orgs()))
        keys = org_keys(self.settings.key_prefix, org)
        self.replica[org] = dict(zip(keys, self.run(self._dump(keys)), strict=True))

    async def _dump(self, keys: list[str]) -> list[bytes | None]:
        return [await self.redis.dump(k) for k in keys]

    @precondition(
        lambda self: (
            self.replica and not self.outage and not any(m.lost for m in self.orgs.values())
        )
    )
    @rule(data=st.data())
    @step
    def fail_over(self, data: st.DataObject) -> None:
        """The primary dies and the lagging replica is promoted: the organization's keys go
        back to what the replica held, while the ledger holds every change since (the wait off,
        the flusher ahead of the replica). Reconciliation finds the node's new history and
        rebuilds the organization whole from the ledger; the model is what it was."""
        org = data.draw(st.sampled_from(sorted(self.replica)))
        # The flusher restarts with the failover, or runs on: a restarted one knows no node
        # epoch yet, so its first pass checks every organization's history at once (the fresh-
        # epoch path); a running one finds the changed history in its round-robin slice.
        # (Until the run has seen the fresh-epoch path, a failover takes it.)
        restarted = data.draw(st.booleans()) or not self.seen["failover:history:fresh_epoch"]
        self.run(self.flusher.drain())
        self.check_ledger()
        held = self.replica.pop(org)
        self.run(self._restore(held))
        acct = org_keys(self.settings.key_prefix, org)[0]
        before = self.history_rebuilds()
        if held[acct] is None:
            # The replica never saw the account: it is missing, and rebuilt as such.
            assert self.run(self.flusher.hydrate_missing()) == [org]
        else:
            # The promoted node names another history than the one the account recorded.
            self.run(self.redis.hset(acct, "epoch", "the-lost-primary:history"))
            # Found: the organization is fenced, and a change meanwhile is refused (REBUILDING)
            # and changes nothing (the model's checks after the step); then the rebuild.
            epoch = self.run(self.store.epochs([org]))[org]
            assert self.run(self.store.check_epoch(org, epoch, 60_000)) is not None
            self.expect_error(
                self.engine.reserve(AccountRef(org), [_item(self.next_id("f"), 1)]),
                errors.Rebuilding,
            )
            if restarted:
                self.flusher = self.new_flusher()
                before = self.history_rebuilds()
            self.run(self.flusher.reconcile())
            assert self.history_rebuilds() == before + 1
        self.rebuilt(org)
        if held[acct] is None:
            self.seen["failover:account"] += 1
        else:
            self.seen["failover:history:" + ("fresh_epoch" if restarted else "slice")] += 1

    async def _restore(self, held: dict[str, bytes | None]) -> None:
        await self.redis.delete(*held)
        for key, dump in held.items():
            if dump is not None:
                await self.redis.restore(key, 0, dump, replace=True)

    def rebuilt(self, org: str) -> None:
        """The model of a rebuild (R3): money totals from the ledger, outstanding holds
        restored (held and reserved are theirs), the other hold counters start again, every
        tombstone is gone; then the sweep of the rebuild's own script."""
        m = self.orgs[org]
        for k in HOLD_COUNTERS:
            m.base[k] += m.c[k]
            m.c[k] = 0
        m.c["reserved"] = m.c["held"]
        m.base["reserved"] -= m.c["held"]
        m.c["carried_committed"] = m.c["committed"]
        m.c["repaired"] = 0
        m.overage_bound = 0
        for h in self.holds.values():
            if h.org == org:
                if h.st == "A":
                    h.restored = True
                else:
                    h.record = False
        for job in self.jobs.values():
            if job.org == org and job.st == "O":
                job.touch(self.offset)  # a rebuild starts an open job's ttl again
        m.rebuilt_grants.update(m.grants)
        m.lost = None
        self.sweep(org)

    @precondition(lambda self: not self.outage)
    @rule(point=st.sampled_from(["before_insert", "after_commit"]))
    @step
    def flusher_dies(self, point: str) -> None:
        """A flusher reads a batch and dies before its ledger transaction, or after it and
        before the acknowledgement; a new flusher claims the entries it left pending."""
        dying = self.new_flusher(DyingFlusher)
        assert isinstance(dying, DyingFlusher)
        dying.point = point
        try:
            moved = self.run(dying.flush_once(read_ahead=False))
        except _FlusherDied:
            self.seen["flusher_dies:" + point] += 1
        else:
            assert moved == 0, "it dies at its first batch"
        self.flusher = self.new_flusher()

    @precondition(lambda self: not self.outage and self.live_orgs())
    @rule(
        data=st.data(),
        amount=st.integers(1, ALLOWANCE),
        end=st.sampled_from(["commit", "release", "open", "remote", "commit:back", "release:back"]),
        mode=st.sampled_from(["zero", "below", "at", "within", "far_above"]),
    )
    @step
    def degraded(self, data: st.DataObject, amount: int, end: str, mode: str) -> None:
        """Redis is unreachable for the degraded-mode sidecar: it grants a hold locally and
        commits it (R6: bounded like any commit), releases it, or leaves it open, or it
        journals the commit of a hold that lives in Redis; then Redis is back and the journal
        is replayed: a local commit bills as the hold it was (flagged orphan), a release
        settles nothing, an open hold is reserved in Redis, a journaled commit commits. The
        ":back" ends commit or release the local hold once Redis answers again but before the
        replay: Redis does not know it yet, so the journal settles it, as if Redis were down."""
        orgs = self.live_orgs()
        if end == "remote":  # a journaled commit needs a hold that lives in Redis
            orgs = [o for o in orgs if any(h.org == o and h.st == "A" for h in self.holds.values())]
            orgs = orgs or self.live_orgs()
        org = data.draw(st.sampled_from(orgs))
        pick = lambda options: data.draw(st.sampled_from(options))  # noqa: E731
        self._degraded(org, amount, end, mode, pick)

    def _degraded(
        self, org: str, amount: int, end: str, mode: str, pick: Callable[[list[str]], str]
    ) -> None:
        m = self.orgs[org]
        self.sweep(org)
        live = [r for r, h in sorted(self.holds.items()) if h.org == org and h.st == "A"]
        if end == "remote" and not live:
            end = "commit"
        if end == "open" and amount > m.available:
            end = "release"  # its replay could not reserve it: it would stay local
        rid = self.next_id("d")
        actual = _actual(amount, mode)
        self.redis_proxy.mode = "refuse"
        self.redis_proxy.cut()
        try:
            if end == "remote":
                h = self.holds[pick(live)]
                actual = _actual(h.amt, mode)
                (o,) = self.run(self.dengine.commit(org, [CommitItem(h.rid, actual)]))
                assert o.degraded and o.committed_uecu == actual, o
            else:
                out = self.run(self.dengine.reserve(AccountRef(org), [_item(rid, amount)]))
                assert out.degraded and not out.replayed, out
                assert [hv.amount_uecu for hv in out.holds] == [amount]
                if end == "commit":
                    (o,) = self.run(self.dengine.commit(org, [CommitItem(rid, actual)]))
                    bounded = min(actual, amount + amount * PCT // 100)
                    assert o.degraded and o.committed_uecu == bounded, o
                elif end == "release":
                    r = self.run(self.dengine.release(org, rid))
                    assert r.degraded and r.released_uecu == amount, r
        finally:
            self.redis_proxy.heal()
        if end.endswith(":back"):
            end = end.removesuffix(":back")
            self.seen[f"degraded:{end}:back"] += 1
            if end == "commit":
                (o,) = self.run(self.dengine.commit(org, [CommitItem(rid, actual)]))
                bounded = min(actual, amount + amount * PCT // 100)
                assert o.degraded and o.error is None and o.committed_uecu == bounded, o
            else:
                r = self.run(self.dengine.release(org, rid))
                assert r.degraded and r.released_uecu == amount, r
        self.seen["degraded:" + end] += 1
        journal = self.dengine.journal
        assert journal is not None
        replayed = 0
        for _ in range(20):  # an entry Redis could not take yet (a slow reconnection) waits
            replayed += self.run(self.dengine.replay_degraded())
            if not journal.pending():
                break
        assert replayed >= 1 and not journal.pending() and not journal.failed, journal
        if end == "remote":
            self.history.append(
                ("commit", (org, h.rid, actual, Usage()), self.bill(h, actual, Usage()))
            )
        elif end == "commit":
            hold = MHold(rid, org, amount, 0, 0, restored=True)
            want = self.bill(hold, actual, Usage(), known="degraded")
            self.holds[rid] = hold
            self.history.append(("commit", (org, rid, actual, Usage()), want))
        elif end == "open":
            ttl = self.dsettings.default_ttl_ms
            m.c["held"] += amount
            m.c["reserved"] += amount
            self.holds[rid] = MHold(rid, org, amount, ttl, self.offset + ttl, restored=True)

    @precondition(lambda self: self.outage or not self.outages)
    @rule()
    @step
    def ledger_outage(self) -> None:
        """The ledger becomes unreachable (once per run: each call in an outage waits for
        its timeout), or comes back."""
        if self.outage:
            self.end_outage()
        else:
            self.seen["outage:start"] += 1
            self.outages += 1
            self.start_outage()
            # What the outboxes hold as it starts cannot reach the ledger (the flush rule then
            # seldom runs before the outage ends: it needs three steps since the last drain).
            if any(self.xlen(o) for o in ORGS):
                self._outage_flush()

    # -- the check after every step ---------------------------------------------------------

    @invariant()
    @step
    def redis_equals_model(self) -> None:
        for org, m in self.orgs.items():
            if m.lost:
                if m.lost not in BESIDE:  # nothing rebuilt it behind the model's back
                    self.expect_error(self.store.balance(org), errors.AccountNotFound)
                continue
            if not m.exists:
                self.expect_error(
                    self.engine.balance(org),
                    errors.StoreUnavailable if self.reads_fail else errors.AccountNotFound,
                )
                continue
            self.sweep(org)
            b = self.run(self.engine.balance(org))
            got = {k: getattr(b, attr, 0) for k, attr in COUNTERS.items()}
            assert got == m.c, f"{org}: Redis {got} != model {m.c}"
            active = sum(1 for h in self.holds.values() if h.org == org and h.st == "A")
            assert b.outstanding_holds == active
            assert_conserved(b)
            # Below zero only by the overage bounds of what was committed above its hold or
            # late (R4: an expiring grant never takes held money; R5).
            assert b.available_uecu >= -m.below_zero_bound, (b, m.below_zero_bound)
            assert b.overage_uecu <= m.overage_bound
            for job in self.jobs.values():
                if job.org == org and job.record:
                    self.check_job(job, self.run(self.store.job(org, job.jid)))
                elif job.org == org:
                    self.expect_error(self.store.job(org, job.jid), errors.JobNotFound)


def _actual(amount: int, mode: str) -> int:
    """A commit's actual cost relative to its hold."""
    return {
        "zero": 0,
        "below": amount // 2,
        "at": amount,
        "within": amount + amount * PCT // 200,
        "far_above": 2 * amount + 7,
    }[mode]


def _item(rid: str, amount: int) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.GEPA, "", 0)


def _step_item(rid: str, amount: int, ttl: int = 0) -> ReserveItem:
    """A job's step: a judge call (the engine requires its model)."""
    return ReserveItem(rid, amount, JobType.JUDGE, "judge-model", ttl)


def _replayed(first: Any) -> Any:
    """The outcome a replay must answer: the original one, flagged replayed."""
    from dataclasses import replace

    return replace(first, replayed=True)


def _machine(kind: str, tmp: Path) -> type[QuotaMachine]:
    attrs = {"ledger_kind": kind, "tmp_dir": tmp, "seen": Counter()}
    return type(f"QuotaMachine_{kind}", (QuotaMachine,), attrs)


#: (operation, what its script finds unswept) of the expire rule's unswept step: all are wanted.
UNSWEPT = [
    ("commit", "abandoned"),
    ("commit", "expired"),
    ("release", "abandoned"),
    ("release", "expired"),
    ("step", "abandoned"),
]

#: Every kind of step and outcome the run must exercise (it is not vacuous). A late commit of a
#: purged hold ("commit:late:known") is checked whenever a run reaches it, but is not required:
#: inside a full `make test` run the short default missed it in all six rounds while a run of
#: this file alone reaches it every time; its directed tests are in tests/test_money_paths.py.
WANTED = {
    "commit",
    "commit:late",
    "commit:over",
    "commit:ledger_replay",
    "release",
    "extend",
    "hold:expired",
    "grant:expired",
    "grant:kept",
    "reserve:insufficient",
    "replay:commit",
    "replay:reserve",
    "replay:release",
    "replay:grant",
    "replay:extend",
    "reserve_conflict",
    "unknown_id",
    "flush",
    "purge",
    "commit:orphan",
    "degraded:commit",
    "degraded:release",
    "degraded:open",
    "degraded:remote",
    "degraded:commit:back",
    "degraded:release:back",
    "tombstone:purged",
    "grant_refused:expired",
    "grant_refused:limit",
    "grant_refused:conflict",
    *(f"lose:{what}" for what in LOSSES),
    "failover:history:fresh_epoch",
    "failover:history:slice",
    "rebuild:engine",
    "rebuild:hydrate_missing",
    "rebuild:reconcile",
    "rebuild:refused",
    "flusher_dies:before_insert",
    "flusher_dies:after_commit",
    "outage:start",
    "outage:grant",
    "outage:flush",
    "job:approve:refuse",
    "job:approve:wallet",
    "job:approve:insufficient",
    "job:step",
    "job:step:wallet",
    "job:step:refused",
    "job:step:at_zero_balance",
    "job:commit",
    "job:commit:over:refuse",
    "job:commit:over:wallet",
    "job:commit:late_from_room",
    "job:commit:batch",
    "job:release",
    "job:step_expired",
    "job:abandoned",
    "job:close",
    "job:close:replay",
    "job:touch",
    "job:bad:unknown",
    "job:bad:conflict",
    "job:bad:exceeds",
    "job:bad:closed",
    "replay:approve",
    "replay:job_step",
    *(f"unswept:{op}:{finds}" for op, finds in UNSWEPT),
}


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_engine_matches_the_model(
    ledger: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    if ledger == "postgresql":
        require_postgres()
        from psycopg_pool.base import AttemptWithBackoff

        # The pool's first reconnection delay after an outage (1 s, doubling): shortened so
        # that the many short outages of a run stay cheap.
        monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 0.05)
    machine = _machine(ledger, tmp_path)
    # The first round is the same examples every time. Which calls succeed, and so what can be
    # replayed or committed late, follows the machine's timing, and in a short run an outcome
    # seen only once or twice is sometimes missed: up to nine further rounds of fresh examples
    # then add to the count, and any failure they find is as real as the first round's.
    for round_ in range(10):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=200 if LONG else 25 if ledger == "sqlite" else 15,
                stateful_step_count=60 if LONG else 40,
                deadline=None,
                derandomize=not LONG and round_ == 0,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
        if WANTED <= set(machine.seen):
            break
        print(f"model-based ({ledger}), after round {round_ + 1}: {WANTED - set(machine.seen)}")
    print(f"model-based ({ledger}, {round_ + 1} round(s)): {dict(sorted(machine.seen.items()))}")
    assert WANTED <= set(machine.seen), f"never exercised: {WANTED - set(machine.seen)}"


def test_conservation_faults_name_each_broken_identity() -> None:
    """The one conservation helper the model and the other tests use finds each break."""
    ok = Balance(
        "o", granted_uecu=1_000, balance_uecu=600, held_uecu=100, committed_uecu=300,
        reserved_uecu=500, committed_from_holds_uecu=250, released_uecu=100, expired_uecu=50,
        overage_uecu=30, unbilled_overage_uecu=0, late_committed_uecu=20, outstanding_holds=1,
        expired_holds=1, teams=[], projects=[], expired_grants_uecu=100,
    )  # fmt: skip
    assert ok.conservation_faults() == []
    from dataclasses import replace

    assert len(replace(ok, balance_uecu=601).conservation_faults()) == 1
    assert len(replace(ok, late_committed_uecu=21).conservation_faults()) == 1
    assert len(replace(ok, released_uecu=99).conservation_faults()) == 1


def test_a_degraded_commit_is_a_replay_after_its_tombstone_is_purged(tmp_path: Path) -> None:
    """R2 with R6, as the state machine found it: a hold granted locally in degraded mode and
    committed there reaches Redis (and the ledger) only as its commit. Once its tombstone is
    purged, the same commit again must answer the recorded outcome, as any committed hold's
    does, not HOLD_NOT_FOUND."""
    require_redis()
    machine = _machine("sqlite", tmp_path)()
    try:
        machine.opening(amounts=[1, 1, 1], over="within", starter=1)
        machine._degraded("m-a", 1_000, "commit", "far_above", lambda options: options[0])
        (rid,) = [r for r in machine.holds if r.startswith("d")]
        machine.purge()
        machine.redis_equals_model()
        assert not machine.holds[rid].record, "its tombstone is purged"
        (o,) = machine.run(machine.engine.commit("m-a", [CommitItem(rid, 2_007)]))
        assert o.error is None and o.replayed, o
        assert (o.committed_uecu, o.unbilled_overage_uecu) == (1_200, 807), o
        machine.redis_equals_model()
    except BaseException:
        machine.busy = True  # no final flush over the failure
        raise
    finally:
        machine.teardown()
