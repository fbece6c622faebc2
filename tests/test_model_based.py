"""Model-based test: a hypothesis state machine drives the engine on real Redis with a real
ledger (SQLite, and PostgreSQL) and checks every step against a model written here from the
contract (docs/architecture.md, docs/ledger.md), not from the scripts.

Operations: grant (never-expiring and expiring), reserve (one to three holds, all or nothing),
commit below / at / within the overage bound above / far above the hold, release, extend
(next, same and stale sequence), expire (the store's clock steps forward), replay of any
earlier successful call, a reused id with other parameters, unknown ids, and flush
(``Flusher.drain``).

After every step, for every organization: each Redis counter equals the model's exactly;
conservation holds; ``available >= -(overage + late commits + expired grant rests)`` (the only
documented ways below zero) and the overage is within ECU_OVERAGE_MAX_PERCENT of the holds that
over-ran; a replay answers the original outcome and changes nothing (one effect per id). After
every flush, and at the end: the ledger's conservation query is ok and its totals equal Redis's.

Time is stepped, never slept: hold and grant deadlines live on a 50 s grid of clock offsets, so
whether one has passed never depends on how long the test ran (under 50 s per example).

Bounded by default (25 examples x 30 steps on SQLite, 15 on PostgreSQL, derandomized so the
default run is reproducible); ECU_CHAOS_LONG=1 runs 200 x 60 on each, with fresh random seeds.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.ledger import Ledger, open_ledger
from ecu_sidecar.metrics import FlusherMetrics
from ecu_sidecar.model import (
    AccountRef,
    CommitItem,
    GrantKind,
    HoldState,
    JobType,
    ReserveItem,
    Usage,
)
from ecu_sidecar.store import RedisStore
from tests.conftest import PG_URL, drop_keys, make_settings, require_postgres, require_redis

pytestmark = pytest.mark.chaos

LONG = os.environ.get("ECU_CHAOS_LONG", "") not in ("", "0", "false", "no")
T = TypeVar("T")

UNIT = 50_000
"""The clock grid (ms): every TTL, grant expiry and clock step is a multiple of it."""
PCT = 20
ORGS = ("m-a", "m-b", "m-c")
"""m-a and m-b are funded at the start; m-c only if a grant rule picks it."""
COUNTERS = (
    "granted",
    "balance",
    "held",
    "committed",
    "reserved",
    "committed_from_holds",
    "released",
    "expired",
    "overage",
    "unbilled_overage",
    "late_committed",
    "expired_grants",
)


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


@dataclass
class MOrg:
    """The model of one organization."""

    exists: bool = False
    c: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    expired_holds: int = 0
    expiring: dict[str, list[int]] = field(default_factory=dict)
    """grant id -> [absolute expiry ms, grid expiry, unspent rest]."""
    grants: dict[str, tuple[int, GrantKind, int, Any]] = field(default_factory=dict)
    overage_bound: int = 0
    """Sum over holds committed above their amount of floor(amount x pct / 100)."""

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
        self.history: list[tuple[str, tuple[Any, ...], Any]] = []
        self.n = 0
        self.flushed_at = 0
        self.schema = ""
        if self.ledger_kind == "sqlite":
            self.ledger_url = f"sqlite://{self.tmp_dir}/model-{uuid.uuid4().hex[:10]}.db"
        else:
            import psycopg

            self.schema = "model_" + uuid.uuid4().hex[:12]
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
            sep = "&" if "?" in PG_URL else "?"
            self.ledger_url = f"{PG_URL}{sep}options=-csearch_path%3D{self.schema}"
        self.settings = make_settings(
            "redis",
            ledger_url=self.ledger_url,
            overage_max_percent=PCT,
            tombstone_ttl_ms=30 * 86_400_000,
            flusher_claim_idle_ms=0,
            flusher_discovery_interval_ms=0,
        )
        self.ledger: Ledger = open_ledger(self.ledger_url)
        self.ledger.migrate()
        self.store: RedisStore = self.run(self._make_store())
        self.engine = QuotaEngine(self.store, self.settings, ledger=self.ledger)
        from prometheus_client import CollectorRegistry

        self.flusher = Flusher(
            self.store, self.ledger, self.settings, FlusherMetrics(CollectorRegistry())
        )

    async def _make_store(self) -> RedisStore:
        return RedisStore.from_settings(self.settings)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if not self.busy:
                self.flush()  # the final flush: the ledger must equal Redis at the end
        finally:
            self.run(drop_keys(self.store, self.settings.key_prefix))
            self.run(self.store.close())
            self.ledger.close()
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
        seconds, micros = await self.store._client.time()
        return seconds * 1000 + micros // 1000 + self.offset

    def sweep(self, org: str) -> None:
        """What a script's sweep does at the current offset (grants first, then holds)."""
        m = self.orgs[org]
        due = sorted(
            (exp, gid) for gid, (exp, grid, _) in m.expiring.items() if grid <= self.offset
        )
        for _, gid in due:
            rest = m.expiring.pop(gid)[2]
            m.c["balance"] -= rest
            m.c["expired_grants"] += rest
            self.seen["grant:expired"] += 1
        for h in self.holds.values():
            if h.org == org and h.st == "A" and h.grid_dl <= self.offset:
                h.st = "E"
                self.seen["hold:expired"] += 1
                m.c["held"] -= h.amt
                m.c["expired"] += h.amt
                m.expired_holds += 1

    def burn(self, org: str, amount: int) -> None:
        m = self.orgs[org]
        for gid in sorted(m.expiring, key=lambda g: (m.expiring[g][0], g)):
            if amount <= 0:
                return
            take = min(m.expiring[gid][2], amount)
            m.expiring[gid][2] -= take
            amount -= take
            if m.expiring[gid][2] <= 0:
                del m.expiring[gid]

    def expect_error(self, coro: Awaitable[Any], kind: type[errors.EcuError]) -> None:
        try:
            out = self.run(coro)
        except kind:
            return
        raise AssertionError(f"expected {kind.__name__}, got {out!r}")

    def funded_orgs(self) -> list[str]:
        return [o for o, m in self.orgs.items() if m.exists]

    # -- rules --------------------------------------------------------------------------------

    @initialize(
        amounts=st.lists(st.integers(1, 100_000), min_size=3, max_size=3),
        over=st.sampled_from(["within", "far_above"]),
        starter=st.integers(1, 400_000),
    )
    @step
    def opening(self, amounts: list[int], over: str, starter: int) -> None:
        """Fund two organizations (one with an expiring starter grant), place three holds,
        commit one above its hold, extend one, release one: every kind of call is then in the
        history for the random steps to replay, interleave and expire."""
        for org in ORGS[:2]:
            self._grant(org, 500_000, None)
        self._grant(ORGS[1], starter, 2)
        self._reserve(ORGS[0], [(a, 2 * UNIT) for a in amounts])
        first, second, third = (self.holds[r] for r in list(self.holds)[-3:])
        self._commit(first, _actual(first.amt, over), Usage(10, 20, 1))
        self._extend(second, "next", 3 * UNIT)
        self._release(third)

    def _grant(self, org: str, amount: int, expires_units: int | None) -> None:
        gid = self.next_id("g")
        kind = GrantKind.TOP_UP if expires_units is None else GrantKind.STARTER
        exp = 0
        if expires_units is not None:
            exp = self.run(self.redis_now()) + expires_units * UNIT
        out = self.run(self.engine.grant(org, gid, amount, kind, exp))
        m = self.orgs[org]
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

    @rule(
        org=st.sampled_from(ORGS),
        amount=st.integers(1, 600_000),
        expires=st.none() | st.integers(1, 6),
    )
    @step
    def grant(self, org: str, amount: int, expires: int | None) -> None:
        self._grant(org, amount, expires)

    @rule(
        org=st.sampled_from(ORGS),
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
    def reserve(self, org: str, items: list[tuple[int, int]]) -> None:
        self._reserve(org, items)

    def _reserve(self, org: str, items: list[tuple[int, int]]) -> None:
        m = self.orgs[org]
        batch = [ReserveItem(self.next_id("r"), a, JobType.GEPA, "", ttl) for a, ttl in items]
        call = self.engine.reserve(AccountRef(org), batch, batch=len(batch) > 1)
        if not m.exists:
            self.expect_error(call, errors.AccountNotFound)
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

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    @step
    def reserve_conflict(self, data: st.DataObject) -> None:
        """A used reservation id with other parameters is refused and changes nothing."""
        h = self.holds[data.draw(st.sampled_from(sorted(self.holds)))]
        item = ReserveItem(h.rid, h.amt + 1, JobType.GEPA, "", h.ttl)
        self.sweep(h.org)
        self.expect_error(
            self.engine.reserve(AccountRef(h.org), [item]), errors.IdempotencyConflict
        )

    @precondition(lambda self: self.holds)
    @rule(
        data=st.data(),
        mode=st.sampled_from(["zero", "below", "at", "within", "far_above"]),
        usage=st.tuples(st.integers(0, 5_000), st.integers(0, 5_000), st.integers(0, 3)),
    )
    @step
    def commit(self, data: st.DataObject, mode: str, usage: tuple[int, int, int]) -> None:
        h = self.holds[data.draw(st.sampled_from(sorted(self.holds)))]
        self._commit(h, _actual(h.amt, mode), Usage(*usage))

    def _commit(self, h: MHold, actual: int, usage: Usage) -> None:
        m = self.orgs[h.org]
        call = self.engine.commit(h.org, [CommitItem(h.rid, actual, usage)])
        self.sweep(h.org)
        if h.st == "R":
            (o,) = self.run(call)
            assert isinstance(o.error, errors.HoldReleased), o
            return
        if h.st == "C":
            (o,) = self.run(call)
            first_actual, first_usage, first = h.commit  # type: ignore[misc]
            if (first_actual, first_usage) == (actual, usage):
                assert o.replayed and o.error is None
                assert o == _replayed(first), (o, first)
            else:
                assert isinstance(o.error, errors.IdempotencyConflict), o
            return
        bound = h.amt * PCT // 100
        billed = min(actual, h.amt + bound)
        unbilled = actual - billed
        late = h.st == "E"
        if late:
            overage = released = 0
            m.c["late_committed"] += billed
        else:
            overage = max(0, billed - h.amt)
            released = h.amt - min(billed, h.amt)
            m.c["held"] -= h.amt
            m.c["committed_from_holds"] += min(billed, h.amt)
            m.c["released"] += released
            m.c["overage"] += overage
            if actual > h.amt:
                m.overage_bound += bound
        self.burn(h.org, billed)
        m.c["balance"] -= billed
        m.c["committed"] += billed
        m.c["unbilled_overage"] += unbilled
        (o,) = self.run(call)
        self.seen["commit:late" if late else "commit:over" if actual > h.amt else "commit"] += 1
        assert o.error is None, o
        assert (o.committed_uecu, o.released_uecu, o.overage_uecu) == (billed, released, overage)
        assert (o.unbilled_overage_uecu, o.late, o.replayed) == (unbilled, late, False)
        assert o.available_uecu == m.available
        assert o.overage_uecu <= bound, "overage is bounded by the percent of the hold"
        h.st = "C"
        h.commit = (actual, usage, o)
        self.history.append(("commit", (h.org, h.rid, actual, usage), o))

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    @step
    def release(self, data: st.DataObject) -> None:
        self._release(self.holds[data.draw(st.sampled_from(sorted(self.holds)))])

    def _release(self, h: MHold) -> None:
        m = self.orgs[h.org]
        call = self.engine.release(h.org, h.rid)
        self.sweep(h.org)
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
        m.c["held"] -= h.amt
        m.c["released"] += h.amt
        assert (out.released_uecu, out.replayed, out.available_uecu) == (h.amt, False, m.available)
        h.st = "R"
        h.release = out
        self.history.append(("release", (h.org, h.rid), out))

    @precondition(lambda self: self.holds)
    @rule(
        data=st.data(),
        which=st.sampled_from(["next", "same", "stale"]),
        ttl=st.sampled_from([0, 2 * UNIT, 4 * UNIT]),
    )
    @step
    def extend(self, data: st.DataObject, which: str, ttl: int) -> None:
        self._extend(self.holds[data.draw(st.sampled_from(sorted(self.holds)))], which, ttl)

    def _extend(self, h: MHold, which: str, ttl: int) -> None:
        seq = {"next": h.seq + 1, "same": max(h.seq, 1), "stale": h.seq - 1}[which]
        if seq < 1:
            seq = h.seq + 1
        call = self.engine.extend(h.org, h.rid, ttl, seq)
        self.sweep(h.org)
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
        h.grid_dl = max(h.grid_dl, self.offset + (ttl or h.ttl))
        h.seq, h.ettl = seq, ttl
        self.history.append(("extend", (h.org, h.rid, ttl, seq), out))

    @rule(units=st.integers(1, 4))
    @step
    def expire(self, units: int) -> None:
        """Step the store's clock forward (holds and grants on the grid may pass their time)."""
        self.offset += units * UNIT
        self.store.clock_offset_ms = self.offset
        for org in self.funded_orgs():
            self.sweep(org)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    @step
    def replay(self, data: st.DataObject) -> None:
        """Any earlier successful call again, same ids: the original outcome, no effect."""
        kind = data.draw(st.sampled_from(sorted({k for k, _, _ in self.history})))
        calls = [(a, o) for k, a, o in self.history if k == kind]
        args, first = calls[data.draw(st.integers(0, len(calls) - 1))]
        self.seen["replay:" + kind] += 1
        if kind == "grant":
            org, gid, amount, gkind, exp = args
            out = self.run(self.engine.grant(org, gid, amount, gkind, exp))
            assert out.replayed and out == _replayed(first)
        elif kind == "reserve":
            org, batch = args
            out = self.run(self.engine.reserve(AccountRef(org), batch, batch=len(batch) > 1))
            assert out.replayed and out.available_uecu == first.available_uecu
            assert [hv.amount_uecu for hv in out.holds] == [it.amount_uecu for it in batch]
        elif kind == "commit":
            org, rid, actual, usage = args
            (o,) = self.run(self.engine.commit(org, [CommitItem(rid, actual, usage)]))
            assert o.replayed and o == _replayed(first), (o, first)
        elif kind == "release":
            org, rid = args
            out = self.run(self.engine.release(org, rid))
            assert out.replayed and out == _replayed(first)
        elif kind == "extend":
            org, rid, ttl, seq = args
            h = self.holds[rid]
            call = self.engine.extend(org, rid, ttl, seq)
            if h.st != "A":
                kinds = {"C": errors.HoldCommitted, "R": errors.HoldReleased}
                self.expect_error(call, kinds.get(h.st, errors.HoldExpired))
            elif seq < h.seq:
                self.expect_error(call, errors.StaleSequence)
            else:
                assert self.run(call).replayed

    @precondition(lambda self: self.funded_orgs())
    @rule(data=st.data(), op=st.sampled_from(["commit", "release", "extend"]))
    @step
    def unknown_id(self, data: st.DataObject, op: str) -> None:
        """An id that was never reserved: HOLD_NOT_FOUND, nothing changes."""
        org = data.draw(st.sampled_from(self.funded_orgs()))
        rid = "never-" + self.next_id("x")
        self.sweep(org)
        if op == "commit":
            (o,) = self.run(self.engine.commit(org, [CommitItem(rid, 5)]))
            assert isinstance(o.error, errors.HoldNotFound)
        elif op == "release":
            self.expect_error(self.engine.release(org, rid), errors.HoldNotFound)
        else:
            self.expect_error(self.engine.extend(org, rid, 0, 1), errors.HoldNotFound)

    @precondition(lambda self: len(self.history) >= self.flushed_at + 3)
    @rule()
    @step
    def flush(self) -> None:
        """Drain the outboxes into the ledger; the ledger must then equal Redis."""
        self.flushed_at = len(self.history)
        self.run(self.flusher.drain())
        for org in self.funded_orgs():
            b = self.run(self.engine.balance(org))
            c = self.ledger.conservation(org)
            assert c is not None and c.ok, c
            assert (c.granted_uecu, c.expired_grants_uecu, c.committed_uecu, c.balance_uecu) == (
                b.granted_uecu,
                b.expired_grants_uecu,
                b.committed_uecu,
                b.balance_uecu,
            )
            acct = self.ledger.account(org)
            assert acct is not None
            assert (
                acct.holds.reserved_uecu,
                acct.holds.released_uecu,
                acct.holds.expired_uecu,
                acct.holds.overage_uecu,
                acct.holds.late_committed_uecu,
                acct.holds.unbilled_uecu,
            ) == (
                b.reserved_uecu,
                b.released_uecu,
                b.expired_uecu,
                b.overage_uecu,
                b.late_committed_uecu,
                b.unbilled_overage_uecu,
            )
            assert self.run(self.store._client.xlen(self.store.outbox_key(org))) == 0

    # -- the check after every step ---------------------------------------------------------

    @invariant()
    @step
    def redis_equals_model(self) -> None:
        for org, m in self.orgs.items():
            if not m.exists:
                self.expect_error(self.engine.balance(org), errors.AccountNotFound)
                continue
            self.sweep(org)
            b = self.run(self.engine.balance(org))
            got = {
                "granted": b.granted_uecu,
                "balance": b.balance_uecu,
                "held": b.held_uecu,
                "committed": b.committed_uecu,
                "reserved": b.reserved_uecu,
                "committed_from_holds": b.committed_from_holds_uecu,
                "released": b.released_uecu,
                "expired": b.expired_uecu,
                "overage": b.overage_uecu,
                "unbilled_overage": b.unbilled_overage_uecu,
                "late_committed": b.late_committed_uecu,
                "expired_grants": b.expired_grants_uecu,
            }
            assert got == m.c, f"{org}: Redis {got} != model {m.c}"
            active = sum(1 for h in self.holds.values() if h.org == org and h.st == "A")
            assert (b.outstanding_holds, b.expired_holds) == (active, m.expired_holds)
            # Conservation (docs/ledger.md).
            assert b.balance_uecu == b.granted_uecu - b.expired_grants_uecu - b.committed_uecu
            assert b.committed_uecu == (
                b.committed_from_holds_uecu + b.overage_uecu + b.late_committed_uecu
            )
            assert b.reserved_uecu == (
                b.committed_from_holds_uecu + b.released_uecu + b.expired_uecu + b.held_uecu
            )
            # Below zero only by the documented ways, each bounded.
            assert b.available_uecu >= -(
                b.overage_uecu + b.late_committed_uecu + b.expired_grants_uecu
            ), b
            assert b.overage_uecu <= m.overage_bound


def _actual(amount: int, mode: str) -> int:
    """A commit's actual cost relative to its hold."""
    return {
        "zero": 0,
        "below": amount // 2,
        "at": amount,
        "within": amount + amount * PCT // 200,
        "far_above": 2 * amount + 7,
    }[mode]


def _replayed(first: Any) -> Any:
    """The outcome a replay must answer: the original one, flagged replayed."""
    from dataclasses import replace

    return replace(first, replayed=True)


def _machine(kind: str, tmp: Path) -> type[QuotaMachine]:
    attrs = {"ledger_kind": kind, "tmp_dir": tmp, "seen": Counter()}
    return type(f"QuotaMachine_{kind}", (QuotaMachine,), attrs)


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_engine_matches_the_model(ledger: str, tmp_path: Path) -> None:
    require_redis()
    if ledger == "postgresql":
        require_postgres()
    machine = _machine(ledger, tmp_path)
    # Not vacuous: every kind of step and outcome happens in the run.
    wanted = {
        "commit",
        "commit:late",
        "commit:over",
        "release",
        "extend",
        "hold:expired",
        "grant:expired",
        "reserve:insufficient",
        "replay:commit",
        "replay:reserve",
        "replay:release",
        "replay:grant",
        "replay:extend",
        "reserve_conflict",
        "unknown_id",
        "flush",
    }
    # The first round is the same examples every time. Which calls succeed, and so what can be
    # replayed or committed late, follows the machine's timing, and in a short run an outcome
    # seen only once or twice is sometimes missed (replay:reserve was, once, on a loaded
    # machine): up to two further rounds of fresh examples then add to the count, and any
    # failure they find is as real as the first round's.
    for round_ in range(3):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=200 if LONG else 25 if ledger == "sqlite" else 15,
                stateful_step_count=60 if LONG else 30,
                deadline=None,
                derandomize=not LONG and round_ == 0,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
        if wanted <= set(machine.seen):
            break
    print(f"model-based ({ledger}, {round_ + 1} round(s)): {dict(sorted(machine.seen.items()))}")
    assert wanted <= set(machine.seen), f"never exercised: {wanted - set(machine.seen)}"
