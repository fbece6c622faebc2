"""The flusher against real Redis (and the embedded store) and real SQLite/PostgreSQL ledgers:
exactly once, reconciliation, rebuild after Redis lost everything, the ledger going away."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ecu_sidecar import errors
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.ledger import Ledger, open_ledger
from ecu_sidecar.metrics import FlusherMetrics
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind, JobType, ReserveItem, Usage
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import org_keys
from ecu_sidecar.store.outbox import GROUP, Backlog, OutboxEntry, OutboxReader
from tests.conftest import (
    REDIS_PORT,
    REDIS_URL,
    Database,
    ManualClock,
    direct_client,
    drop_keys,
    make_settings,
    open_store,
    require_redis,
    wait_until,
)
from tests.tcp_proxy import TcpProxy


def item(rid: str, amount: int, ttl_ms: int = 0) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.INFERENCE, "gpt-4o", ttl_ms)


class Stack:
    """Store, ledger, engine and flusher of one test, and a Redis client of its own."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.direct = direct_client(settings)
        self.ledger = ledger
        self.engine = QuotaEngine(self.store, settings, ledger=ledger)
        self.registry = CollectorRegistry()
        self.flusher = Flusher(self.store, ledger, settings, FlusherMetrics(self.registry))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


@pytest_asyncio.fixture
async def stack(backend: str, database: Database) -> AsyncIterator[Stack]:
    settings = make_settings(
        backend, ledger_url=database.url, flusher_claim_idle_ms=0, flusher_discovery_interval_ms=0
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    s = Stack(settings, ledger)
    yield s
    await drop_keys(settings)
    await s.store.close()
    await s.direct.aclose()
    ledger.close()


async def traffic(engine: QuotaEngine, org: str, steps: int, rng: random.Random) -> None:
    """Reserve, then commit (below or above the hold), release, or abandon."""
    for i in range(steps):
        rid = f"{org}-s{i}-{uuid.uuid4().hex[:12]}"
        amount = rng.randint(1_000, 50_000)
        try:
            await engine.reserve(AccountRef(org, "t1", "p1", "u1"), [item(rid, amount, 60_000)])
        except errors.InsufficientEcu:
            continue
        roll = rng.random()
        if roll < 0.6:
            actual = rng.randint(0, amount + amount // 10)
            await engine.commit(org, [CommitItem(rid, actual, Usage(100, 50, 1))])
        elif roll < 0.85:
            await engine.release(org, rid)


async def assert_agree(s: Stack, orgs: list[str]) -> None:
    """Ledger and Redis say the same, and the ledger's conservation query holds."""
    for org in orgs:
        b = await s.engine.balance(org)
        c = await asyncio.to_thread(s.ledger.conservation, org)
        assert c is not None and c.ok, c
        assert (c.granted_uecu, c.expired_grants_uecu, c.committed_uecu) == (
            b.granted_uecu,
            b.expired_grants_uecu,
            b.committed_uecu,
        )
        assert c.balance_uecu == b.balance_uecu
        state = await s.flusher.reader.state(org)
        assert state.fully_flushed and state.length == 0, state


async def test_every_event_reaches_the_ledger_once(stack: Stack) -> None:
    rng = random.Random(3)
    orgs = [f"org-{i}" for i in range(4)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
        await stack.engine.set_cap(org, "team", "t1", 800_000)
    await asyncio.gather(*(traffic(stack.engine, o, 25, rng) for o in orgs))
    moved = await stack.flusher.drain()
    assert moved > 100
    await assert_agree(stack, orgs)
    assert stack.metric("ecu_flusher_events_total", {"result": "written"}) == moved
    assert await stack.flusher.drain() == 0, "nothing is left to move"
    # Every usage entry in the ledger is a commit the engine answered.
    for org in orgs:
        rows = await asyncio.to_thread(stack.ledger.consumption, org, by="team")
        assert sum(r.amount_uecu for r in rows) == (await stack.engine.balance(org)).committed_uecu


async def test_redelivered_events_change_nothing(stack: Stack) -> None:
    org = "redeliver"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await traffic(stack.engine, org, 10, random.Random(1))
    key = stack.store.outbox_key(org)
    entries = await stack.direct.xrange(key)
    await stack.flusher.drain()
    # The same entries again, as after a crash between the ledger commit and the ack.
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    result = await asyncio.to_thread(stack.ledger.write_events, fields)
    assert (result.inserted, result.duplicates) == (0, len(fields))
    await assert_agree(stack, [org])


async def test_money_metrics_count_each_event_once_when_it_is_redelivered(stack: Stack) -> None:
    # A flusher that dies between the ledger commit and the acknowledgement leaves the batch
    # pending; the next one finds every event already recorded (duplicates). The money and
    # notification counters count what the ledger recorded for the first time, so not again.
    org = "recount"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    acct = AccountRef(org)
    await stack.engine.reserve(acct, [ReserveItem("a", 30_000, JobType.JUDGE, "gpt-4o-mini")])
    await stack.engine.commit(org, [CommitItem("a", 20_000, Usage(10, 5, 1))])
    await stack.engine.reserve(acct, [ReserveItem("b", 4_000, JobType.JUDGE, "gpt-4o-mini")])
    entries = await stack.direct.xrange(stack.store.outbox_key(org))
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    await asyncio.to_thread(stack.ledger.write_events, fields[:3])  # the dead flusher's commit
    assert await stack.flusher.drain() == 4
    judge = {"job_type": "judge"}
    assert stack.metric("ecu_flusher_events_total", {"result": "duplicate"}) == 3
    assert stack.metric("ecu_flusher_events_total", {"result": "written"}) == 1
    assert stack.metric("ecu_reserved_uecu_total", judge) == 4_000  # only b's is new here
    assert stack.metric("ecu_committed_uecu_total", judge) == 0
    await assert_agree(stack, [org])


async def test_two_flushers_at_once_apply_each_event_once(stack: Stack) -> None:
    other = Flusher(
        stack.store,
        stack.ledger,
        stack.settings,
        FlusherMetrics(CollectorRegistry()),
        consumer="second",
    )
    orgs = [f"two-{i}" for i in range(3)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 2_000_000, GrantKind.TOP_UP)
    stop = asyncio.Event()
    runners = [asyncio.create_task(f.run(stop)) for f in (stack.flusher, other)]
    await asyncio.gather(
        *(traffic(stack.engine, o, 30, random.Random(i)) for i, o in enumerate(orgs))
    )

    async def flushed() -> bool:
        states = [await stack.flusher.reader.state(o) for o in orgs]
        return all(st.fully_flushed and st.length == 0 for st in states)

    await wait_until(flushed, "both flushers flushing every outbox")
    stop.set()
    await asyncio.gather(*runners)
    await assert_agree(stack, orgs)


async def test_drift_is_detected_and_repaired(stack: Stack) -> None:
    org = "drifty"
    await stack.engine.grant(org, "g1", 500_000, GrantKind.TOP_UP)
    await traffic(stack.engine, org, 8, random.Random(5))
    await stack.flusher.drain()
    assert (await stack.flusher.reconcile()) == {org: 0}
    await stack.direct.hincrby(stack.store.acct_key(org), "balance", 12_345)  # a fault
    drifts = await stack.flusher.reconcile()
    assert drifts == {org: 12_345}
    assert stack.metric("ecu_reconcile_drift_uecu") == 12_345
    assert stack.metric("ecu_reconcile_repairs_total") == 1
    await stack.flusher.drain()  # the repair event itself
    await assert_agree(stack, [org])
    snaps = await asyncio.to_thread(stack.ledger.snapshots, org)
    assert any(s.redis_balance_uecu - s.ledger_balance_uecu == 12_345 for s in snaps)


async def test_reconciliation_visits_a_bounded_slice_round_robin(stack: Stack) -> None:
    orgs = [f"slice-{i}" for i in range(7)]
    for i, org in enumerate(orgs):
        await stack.engine.grant(org, "g1", 100_000 + i, GrantKind.TOP_UP)
    await stack.flusher.drain()
    registry = CollectorRegistry()
    settings = dataclasses.replace(stack.settings, reconcile_batch=3)
    flusher = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(registry))

    def cycle_seconds() -> float | None:
        return registry.get_sample_value("ecu_reconcile_cycle_seconds")

    for cycle in range(2):
        # A drift in every organization: each one is compared, and repaired, once per cycle.
        for i, org in enumerate(orgs):
            await stack.direct.hincrby(stack.store.acct_key(org), "balance", 10 * cycle + i + 1)
        passes = []
        for _ in range(3):
            if cycle == 0:
                assert cycle_seconds() == 0  # no cycle complete yet
            passes.append(await flusher.reconcile())
            await stack.flusher.drain()  # the repair events
        assert [len(p) for p in passes] == [3, 3, 1]
        seen = [org for p in passes for org in p]
        assert sorted(seen) == orgs  # each exactly once
        assert {o: d for p in passes for o, d in p.items()} == {
            org: 10 * cycle + i + 1 for i, org in enumerate(orgs)
        }
        assert (cycle_seconds() or 0) > 0
        await assert_agree(stack, orgs)
    assert await flusher.reconcile() == {org: 0 for org in orgs[:3]}  # a new cycle


@pytest.mark.parametrize("backend", ["redis"])  # the embedded store has no node epochs
async def test_a_changed_history_is_not_left_to_the_slice(stack: Stack) -> None:
    """Reconciliation visits a bounded slice per pass, but an organization whose history
    Redis changed is rebuilt at the first pass that sees a node epoch it has not seen (a
    failover, a restart, the flusher's start), wherever it stands in the round robin."""
    orgs = [f"hist-{i}" for i in range(5)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    registry = CollectorRegistry()
    settings = dataclasses.replace(stack.settings, reconcile_batch=1)
    flusher = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(registry))
    # The last organization's account says it was built on another node's history.
    await stack.direct.hset(stack.store.acct_key(orgs[-1]), "epoch", "the-lost-primary:history")
    await stack.direct.hincrby(stack.store.acct_key(orgs[-1]), "balance", 777)
    drifts = await flusher.reconcile()
    assert list(drifts) == [orgs[0]]  # the slice: one organization
    assert registry.get_sample_value("ecu_flusher_history_rebuilds_total") == 1
    assert (await stack.engine.balance(orgs[-1])).balance_uecu == 100_000  # the ledger's
    await flusher.reconcile()  # the same epoch again: no organization checked beyond the slice
    assert registry.get_sample_value("ecu_flusher_history_rebuilds_total") == 1


async def test_snapshots_are_written_on_drift_or_daily_and_pruned(
    stack: Stack, database: Database
) -> None:
    org = "snappy"
    await stack.engine.grant(org, "g1", 500_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    now = [int(time.time() * 1000)]
    ledger = open_ledger(database.url, clock=lambda: now[0])  # the ledger's clock, frozen
    day = 86_400_000

    def flusher(retention_days: int) -> Flusher:
        settings = dataclasses.replace(stack.settings, snapshot_retention_days=retention_days)
        return Flusher(stack.store, ledger, settings, FlusherMetrics(CollectorRegistry()))

    def taken() -> list[int]:
        return sorted(s.taken_at_ms for s in ledger.snapshots(org))

    try:
        keeping = flusher(0)
        t0 = now[0]
        assert await keeping.reconcile() == {org: 0}
        assert taken() == [t0]  # the first: none yet
        assert await keeping.reconcile() == {org: 0}
        assert taken() == [t0]  # nothing new to say
        await stack.direct.hincrby(stack.store.acct_key(org), "balance", 77)  # a fault
        assert await keeping.reconcile() == {org: 77}
        assert taken() == [t0, t0]  # a drift always
        await stack.flusher.drain()  # the repair event
        now[0] += day
        assert await keeping.reconcile() == {org: 0}
        assert taken() == [t0, t0]  # a day old: not older
        now[0] += 1
        assert await keeping.reconcile() == {org: 0}
        assert taken() == [t0, t0, t0 + day + 1]  # the daily mark
        now[0] += 400 * day
        assert await keeping.reconcile() == {org: 0}
        assert len(taken()) == 4  # 0 days of retention keeps them all
        assert await flusher(90).reconcile() == {org: 0}
        assert taken() == [now[0]]  # older than 90 days: gone, the latest kept
    finally:
        ledger.close()


async def test_ledger_first_grant_that_redis_missed_is_finished(stack: Stack) -> None:
    org = "half-granted"
    await stack.engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    # The caller wrote the ledger and died before Redis saw the grant.
    await asyncio.to_thread(stack.ledger.grant, org, "g2", 500, "top_up", 0)
    assert (await stack.engine.balance(org)).granted_uecu == 1_000
    assert await stack.flusher.reconcile() == {}  # finishes the grant; compares next pass
    await stack.flusher.drain()
    assert (await stack.flusher.reconcile()) == {org: 0}
    assert (await stack.engine.balance(org)).granted_uecu == 1_500
    await assert_agree(stack, [org])


async def test_a_lost_organization_is_rebuilt_once_from_the_ledger(stack: Stack) -> None:
    org = "amnesia"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.engine.set_cap(org, "team", "t1", 60_000)
    await stack.engine.reserve(AccountRef(org, "t1"), [item("before", 30_000)])
    await stack.engine.commit(org, [CommitItem("before", 20_000)])
    await stack.engine.reserve(AccountRef(org, "t1"), [item("in-flight", 10_000)])
    await stack.flusher.drain()
    # Redis loses the organization (eviction, a restart without persistence).
    await drop_keys(stack.settings)
    # Many sidecars notice at once: one rebuild.
    results = await asyncio.gather(*(stack.engine.balance(org) for _ in range(10)))
    assert {r.balance_uecu for r in results} == {80_000}
    assert stack.metric("ecu_hydrations_total") == 0  # rebuilt by the engine, not the flusher
    b = results[0]
    # The hold in flight is restored from the ledger: still held, on the team too.
    assert (b.held_uecu, b.carried_committed_uecu) == (10_000, 20_000)
    assert (b.teams[0].held_uecu, b.teams[0].used_uecu) == (10_000, 20_000)
    assert b.conservation_faults() == []
    # The cap survived: 60,000 - 20,000 used - 10,000 held leaves 30,000.
    with pytest.raises(errors.InsufficientEcu):
        await stack.engine.reserve(AccountRef(org, "t1"), [item("too-big", 30_001)])
    # The hold that was in flight commits as the live hold it is.
    (done,) = await stack.engine.commit(org, [CommitItem("in-flight", 7_000)])
    assert done.error is None and not done.late and done.released_uecu == 3_000
    await stack.flusher.drain()
    await assert_agree(stack, [org])


async def test_flusher_rebuilds_organizations_missing_from_redis(stack: Stack) -> None:
    orgs = [f"gone-{i}" for i in range(3)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 10_000 * (1 + orgs.index(org)), GrantKind.TOP_UP)
    await stack.flusher.drain()
    await drop_keys(stack.settings)
    assert sorted(await stack.flusher.hydrate_missing()) == orgs
    assert stack.metric("ecu_hydrations_total") == 3
    assert await stack.flusher.hydrate_missing() == []
    for i, org in enumerate(orgs):
        assert (await stack.engine.balance(org)).balance_uecu == 10_000 * (1 + i)


async def test_the_flusher_loop_checks_a_slice_of_organizations_per_pass(stack: Stack) -> None:
    """Each pass of the loop reads and checks ECU_RECONCILE_BATCH of the ledger's organizations,
    round-robin in name order, so a pass costs the same however many organizations exist."""
    orgs = [f"slice-{i}" for i in range(5)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    await drop_keys(stack.settings)
    await stack.engine.balance("slice-3")  # in use: rebuilt by its first call
    passes = [await stack.flusher.hydrate_missing(batch=2) for _ in range(4)]
    assert passes == [["slice-0", "slice-1"], ["slice-2"], ["slice-4"], []]
    assert stack.metric("ecu_hydrations_total") == 4
    await drop_keys(stack.settings)
    assert await stack.flusher.hydrate_missing(batch=2) == ["slice-2", "slice-3"]  # goes round


async def test_ledger_down_then_back_loses_nothing(backend: str, tmp_path: Any) -> None:
    """The ledger refuses writes (SQLite file locked by another writer): the flusher keeps its
    batch, backs off and counts the failures, then catches up."""
    import sqlite3

    url = f"sqlite://{tmp_path}/down.db"
    settings = make_settings(
        backend,
        ledger_url=url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
        flusher_interval_ms=10,
    )
    ledger = open_ledger(url + "?busy_timeout_ms=50")
    ledger.migrate()
    s = Stack(settings, ledger)
    try:
        org = "patient"
        await s.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
        blocker = sqlite3.connect(str(tmp_path / "down.db"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the database is unavailable for writes
        stop = asyncio.Event()
        runner = asyncio.create_task(s.flusher.run(stop))
        await traffic(s.engine, org, 15, random.Random(9))
        await wait_until(
            lambda: s.metric("ecu_flusher_write_errors_total") >= 2, "two failed writes"
        )
        assert (await s.flusher.reader.state(org)).length > 0, "nothing may be acknowledged"
        blocker.execute("ROLLBACK")
        blocker.close()

        async def flushed() -> bool:
            st = await s.flusher.reader.state(org)
            return st.fully_flushed and st.length == 0

        await wait_until(flushed, "the outbox flushed once the database is back")
        stop.set()
        await runner
        await assert_agree(s, [org])
    finally:
        await drop_keys(settings)
        await s.store.close()
        ledger.close()


def test_group_name_is_stable() -> None:
    assert GROUP == "ledger"  # renaming it would re-deliver every outbox from the start


async def test_expiry_burn_order_and_notifications_reach_the_ledger_once(stack: Stack) -> None:
    """Starter expiry with its burn order, the 20 % / 5 % warnings and the auto-top-up request
    under concurrent spending: each lands in the ledger exactly once per crossing, and a
    top-up re-arms them."""
    org = "lifecycle"
    now = await stack.store.now_ms()
    await stack.engine.grant(org, "starter", 300_000, GrantKind.STARTER, now + 60_000)
    await stack.engine.grant(org, "topup", 700_000, GrantKind.TOP_UP)
    await stack.engine.set_auto_topup(org, 100_000, 500_000)

    async def spender(w: int) -> None:
        for s in range(12):
            rid = f"w{w}-{s}"
            try:
                await stack.engine.reserve(AccountRef(org), [item(rid, 5_000)])
            except errors.InsufficientEcu:
                return
            await stack.engine.commit(org, [CommitItem(rid, 5_000)])

    await asyncio.gather(*(spender(w) for w in range(16)))  # 192 x 5,000 = 960,000 of 1,000,000
    stack.store.clock_offset_ms = 60_001  # the starter's expiry passes: it was burned first
    b = await stack.engine.balance(org)
    assert b.expired_grants_uecu == 0, "soonest-expiring first: the starter was spent entirely"
    await stack.flusher.drain()
    notes = await asyncio.to_thread(stack.ledger.notifications, org)
    assert sorted(n.kind for n in notes) == [
        "auto_topup_requested",
        "low_balance_20",
        "low_balance_5",
    ]
    await stack.engine.grant(org, "auto-1", 500_000, GrantKind.AUTO_TOP_UP)
    await asyncio.gather(*(spender(w) for w in range(16, 40)))
    await stack.flusher.drain()
    notes = await asyncio.to_thread(stack.ledger.notifications, org)
    assert sorted(n.kind for n in notes) == sorted(
        ["auto_topup_requested", "low_balance_20", "low_balance_5"] * 2
    )
    assert stack.metric("ecu_notifications_total", {"kind": "low_balance_5"}) == 2
    await assert_agree(stack, [org])


async def test_unspent_starter_leaves_the_ledger_balance_too(stack: Stack) -> None:
    org = "expiring"
    now = await stack.store.now_ms()
    await stack.engine.grant(org, "starter", 300_000, GrantKind.STARTER, now + 60_000)
    await stack.engine.grant(org, "topup", 100_000, GrantKind.TOP_UP)
    await stack.engine.reserve(AccountRef(org), [item("a", 120_000)])
    await stack.engine.commit(org, [CommitItem("a", 120_000)])
    stack.store.clock_offset_ms = 60_001
    b = await stack.engine.balance(org)
    assert (b.expired_grants_uecu, b.balance_uecu) == (180_000, 100_000)
    await stack.flusher.drain()
    await assert_agree(stack, [org])


# -- the reader's own bound on Redis, and what a lost reply leaves ---------------------------


@pytest.mark.parametrize("call", ["discover", "read", "claim", "ack", "state"])
async def test_every_outbox_call_of_a_silent_redis_fails_within_the_bound(call: str) -> None:
    """Redis accepts the connection and never answers (a host gone without a RST): each of the
    reader's calls gives up after ECU_FLUSHER_REDIS_TIMEOUT_MS, as StoreUnavailable, with no
    help from a socket timeout."""
    require_redis()
    with TcpProxy(REDIS_PORT) as proxy:
        proxy.mode = "blackhole"
        settings = make_settings(
            "redis", redis_url=f"redis://127.0.0.1:{proxy.port}/0", flusher_redis_timeout_ms=200
        )
        store = open_store(settings)
        reader = store.outbox("silent")
        entry = OutboxEntry("org", "1-0", {"type": "grant"})
        calls = {
            "discover": lambda: reader.discover(),
            "read": lambda: reader.read(["org"], 10),
            "claim": lambda: reader.claim(["org"], 0, 10),
            "ack": lambda: reader.ack([entry]),
            "state": lambda: reader.state("org"),
        }
        try:
            started = time.monotonic()
            with pytest.raises(errors.StoreUnavailable, match="within 200 ms"):
                await asyncio.wait_for(calls[call](), timeout=10)
            elapsed = time.monotonic() - started
            assert 0.19 <= elapsed < 2.0, elapsed
            assert proxy.accepted >= 1, "the call did reach the silent host"
        finally:
            await store.close()


async def test_a_read_whose_reply_is_lost_is_read_again_at_once(database: Database) -> None:
    """Redis runs the read (the entries are delivered to this flusher) but the reply never comes
    back: the cycle fails within the bound, and the next one reads the flusher's own pending
    entries instead of leaving them to a claim (60 s away here)."""
    require_redis()
    with TcpProxy(REDIS_PORT) as proxy:
        settings = make_settings(
            "redis",
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            ledger_url=database.url,
            flusher_redis_timeout_ms=300,
            flusher_claim_idle_ms=60_000,
            flusher_discovery_interval_ms=60_000,
        )
        ledger = open_ledger(database.url)
        ledger.migrate()
        s = Stack(settings, ledger)
        org = "lost-reply"
        try:
            await s.engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
            assert await s.flusher.drain() == 1
            await s.engine.grant(org, "g2", 2_000, GrantKind.TOP_UP)
            proxy.swallow_replies = True
            with pytest.raises(errors.StoreUnavailable):
                await asyncio.wait_for(s.flusher.flush_once(), timeout=10)
            assert proxy.swallowed_chunks > 0
            proxy.heal()
            assert (await s.flusher.reader.state(org)).pending == 1, "delivered to us, unwritten"
            assert await s.flusher.drain() == 1
            await assert_agree(s, [org])
            assert s.metric("ecu_flusher_events_total", {"result": "written"}) == 2
        finally:
            proxy.heal()
            await drop_keys(settings)
            await s.store.close()
            ledger.close()


# -- reading ahead ----------------------------------------------------------------------------


async def test_the_batch_read_ahead_is_pending_until_written_and_survives_a_crash(
    stack: Stack,
) -> None:
    """While the ledger writes one batch the flusher reads the next: those entries stay pending
    in Redis, unacknowledged, until their own batch has committed. A flusher that dies holding
    them loses nothing: another one claims and writes them, each once."""
    org = "ahead"
    settings = dataclasses.replace(stack.settings, flusher_batch=5)
    first = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    for i in range(5):
        await stack.engine.set_cap(org, "team", "t1", 100_000 + i)
    await traffic(stack.engine, org, 4, random.Random(2))
    events = (await first.reader.state(org)).length
    assert await first.flush_once() == 5

    async def read_ahead() -> bool:  # the read ahead may still be on its way
        return (await first.reader.state(org)).pending == 5

    await wait_until(read_ahead, "the next batch read ahead")
    state = await first.reader.state(org)
    assert (state.pending, state.length) == (5, events - 5), "read ahead, not acknowledged"
    # `first` dies here, holding the batch it read ahead: another flusher claims it.
    second = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    assert await second.drain() == events - 5
    await assert_agree(stack, [org])
    assert await second.drain() == 0


async def test_one_busy_outbox_among_many_moves_in_full_batches(stack: Stack) -> None:
    """ECU_FLUSHER_BATCH is spread over the outboxes, and an outbox that filled its share
    gets the batch to itself next time: a backlog in one outbox of many does not crawl."""
    busy, quiet = "busy", [f"quiet-{i}" for i in range(9)]
    settings = dataclasses.replace(stack.settings, flusher_batch=40)
    flusher = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    for org in [busy, *quiet]:
        await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    for i in range(80):
        await stack.engine.set_cap(busy, "team", "t1", 100_000 + i)
    sizes = []
    while n := await flusher.flush_once():
        sizes.append(n)
    assert sum(sizes) == 10 + 80
    assert sizes[0] == 10 + 3, "a share of 40 // 10 = 4 per outbox: each grant, 3 more caps"
    assert max(sizes[1:]) == 40, "then the busy outbox has the whole batch"
    await assert_agree(stack, [busy, *quiet])


async def test_an_entry_that_is_not_utf8_is_quarantined_not_stuck(stack: Stack) -> None:
    """Bytes no script writes (not UTF-8) cannot stop the flusher: the entry goes to the ledger's
    quarantine, losslessly, and the rest of the outbox moves on."""
    org = "binary"
    await stack.engine.grant(org, "g1", 10_000, GrantKind.TOP_UP)
    await stack.direct.xadd(
        stack.store.outbox_key(org),
        {"type": "grant", "eid": "grant:odd", "org": org, "ts": "1", "kind": b"\xff\xfe"},
    )
    await stack.engine.grant(org, "g2", 5_000, GrantKind.TOP_UP)
    assert await stack.flusher.drain() == 3
    assert stack.metric("ecu_flusher_events_total", {"result": "quarantined"}) == 1
    (bad,) = await asyncio.to_thread(stack.ledger.quarantined, org=org)
    assert (bad.event_id, bad.fields["kind"]) == ("grant:odd", "\udcff\udcfe")
    assert "not valid UTF-8" in bad.reason
    await assert_agree(stack, [org])


def test_counted_money_is_the_sum_of_the_events_per_job_type() -> None:
    """FlusherMetrics.count_events adds each money field of each event to its job type's
    series, and each notification to its kind's, however the events are split in batches."""
    from ecu_sidecar.ledger.events import Event, parse_event

    rng = random.Random(4)
    events: list[Event] = []
    expected: dict[tuple[str, str], int] = {}
    money = {
        "reserve": {"amount": "ecu_reserved_uecu_total"},
        "release": {"amount": "ecu_released_uecu_total"},
        "expire": {"amount": "ecu_expired_uecu_total"},
        "commit": {
            "committed": "ecu_committed_uecu_total",
            "released": "ecu_released_uecu_total",
            "overage": "ecu_overage_uecu_total",
            "unbilled": "ecu_unbilled_overage_uecu_total",
        },
    }
    for i in range(300):
        etype = rng.choice(["reserve", "commit", "release", "expire", "notify", "cap"])
        hold, actual = rng.randint(0, 10_000), rng.randint(0, 12_000)
        billed = min(actual, hold + hold // 10)
        fields = {
            "type": etype, "eid": f"e{i}", "org": "o", "ts": "1", "rid": f"r{i}",
            "amount": str(hold), "team": "", "project": "", "user": "",
            "job": rng.choice(["inference", "judge", "gepa", ""]), "model": "m",
            "deadline": "5", "actual": str(actual), "committed": str(billed),
            "released": str(hold - min(billed, hold)), "overage": str(max(0, billed - hold)),
            "unbilled": str(actual - billed), "late": "0", "tokens_in": "1",
            "tokens_out": "1", "calls": "1", "kind": rng.choice(["low_balance_5",
            "low_balance_20", "auto_topup_requested"]), "available": "3",
            "scope": "team", "scope_id": "t", "cap": "",
        }  # fmt: skip
        ev = parse_event(fields)
        assert isinstance(ev, Event), ev
        events.append(ev)
        job = fields["job"] or "other"
        for name, metric in money.get(etype, {}).items():
            expected[(metric, job)] = expected.get((metric, job), 0) + ev.values[name]
        if etype == "notify":
            key = ("ecu_notifications_total", fields["kind"])
            expected[key] = expected.get(key, 0) + 1
    registry = CollectorRegistry()
    metrics = FlusherMetrics(registry)
    metrics.count_events(events[:100])
    metrics.count_events(iter(events[100:]))
    for (metric, label), total in expected.items():
        labels = {"kind": label} if metric == "ecu_notifications_total" else {"job_type": label}
        assert registry.get_sample_value(metric, labels) == total, (metric, label)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_reader_takes_stream_replies_of_either_protocol_as_redis_sends_them(
    protocol: int,
) -> None:
    """On a standalone Redis the reader parses XREADGROUP's reply itself (RESP2: a list of
    [stream, entries]; RESP3: a map): the entries it returns are the stream's, field for field,
    with entries deleted while pending skipped, and its own pending ones read again."""
    require_redis()
    settings = make_settings("redis", redis_url=f"{REDIS_URL}?protocol={protocol}")
    store = open_store(settings)
    reader = store.outbox("reader-1")
    direct = direct_client(settings)
    orgs = ["shape-a", "shape-b"]
    try:
        written = {}
        for org in orgs:
            key = store.outbox_key(org)
            for i in range(3):
                await direct.xadd(key, {"type": "t", "eid": f"e{i}", "n": str(i), "é": "ü"})
            written[org] = [
                (eid.decode(), {k.decode(): v.decode() for k, v in f.items()})
                for eid, f in await direct.xrange(key)
            ]
        assert sorted(await reader.discover()) == orgs
        entries = await reader.read(orgs, 10)
        assert [(e.org, e.entry_id, e.fields) for e in entries] == [
            (org, eid, fields) for org in orgs for eid, fields in written[org]
        ]
        assert await reader.read(orgs, 10) == []  # nothing new
        gone = written["shape-a"][0][0]
        await direct.xdel(store.outbox_key("shape-a"), gone)
        again = await reader.read(orgs, 10, own_pending=True)
        assert [(e.org, e.entry_id) for e in again] == [
            (org, eid) for org in orgs for eid, _ in written[org] if (org, eid) != ("shape-a", gone)
        ]
    finally:
        await drop_keys(settings)
        await store.close()
        await direct.aclose()


# -- the outboxes as they are after crashes: leftovers, dead consumers, taken-over backlogs ---


@dataclass
class Boxes:
    """An outbox reader (consumer ``me``), its store, and a Redis client of the test's own."""

    reader: OutboxReader
    store: RedisStore
    direct: Any


@pytest_asyncio.fixture(params=["redis-resp2", "redis-resp3", "embedded"])
async def boxes(request: pytest.FixtureRequest) -> AsyncIterator[Boxes]:
    """An outbox reader on real Redis, either protocol, or the embedded store."""
    if request.param == "embedded":
        settings = make_settings("embedded")
    else:
        require_redis()
        protocol = request.param[-1]
        settings = make_settings("redis", redis_url=f"{REDIS_URL}?protocol={protocol}")
    store = open_store(settings)
    direct = direct_client(settings)
    yield Boxes(store.outbox("me"), store, direct)
    await drop_keys(settings)
    await store.close()
    await direct.aclose()


async def test_the_lag_is_the_oldest_unacknowledged_entry_and_leftovers_go(
    boxes: Boxes,
) -> None:
    """A flusher (or Redis) that died between XACK and XDEL leaves acknowledged entries at the
    head of the stream: they do not count as lag, and tidying deletes them, and only them."""
    client, key = boxes.direct, boxes.store.outbox_key("org")
    for ms in (1000, 2000, 3000, 4000, 5000):
        await client.xadd(key, {"n": str(ms)}, id=f"{ms}-0")
    assert await boxes.reader.backlog(["org"]) == Backlog(5, 0, 1000, 0), "no group yet: all unread"
    await boxes.reader.discover()
    await client.xreadgroup(GROUP, "dead", {key: ">"}, count=3)
    await client.xack(key, GROUP, "1000-0", "2000-0")  # ... and died before XDEL
    assert await boxes.reader.backlog(["org"]) == Backlog(5, 1, 3000, 0)
    assert await boxes.reader.backlog(["org"], tidy=True) == Backlog(3, 1, 3000, 2)
    assert [eid for eid, _ in await client.xrange(key)] == [b"3000-0", b"4000-0", b"5000-0"]
    # Nothing pending: the oldest is the first entry never delivered, past the leftovers.
    await client.xack(key, GROUP, "3000-0")
    assert await boxes.reader.backlog(["org"]) == Backlog(3, 0, 4000, 0)
    assert await boxes.reader.backlog(["org"], tidy=True) == Backlog(2, 0, 4000, 1)
    # Delivered and not acknowledged: never deleted, whoever holds it.
    await client.xreadgroup(GROUP, "live", {key: ">"}, count=1)
    assert await boxes.reader.backlog(["org"], tidy=True) == Backlog(2, 1, 4000, 0)
    # A leftover behind a pending entry waits for that one to be acknowledged.
    await client.xreadgroup(GROUP, "live", {key: ">"}, count=1)
    await client.xack(key, GROUP, "5000-0")
    assert await boxes.reader.backlog(["org"], tidy=True) == Backlog(2, 1, 4000, 0)
    await client.xack(key, GROUP, "4000-0")
    assert await boxes.reader.backlog(["org", "none"], tidy=True) == Backlog(0, 0, None, 2)
    assert await client.xlen(key) == 0


async def test_dead_consumers_are_removed_and_pending_entries_kept(boxes: Boxes) -> None:
    """Consumers with nothing pending and idle long enough go; one holding entries stays (its
    entries would otherwise be dropped unwritten), and so does the reader's own."""
    client = boxes.direct
    keys = {org: boxes.store.outbox_key(org) for org in ("a", "b")}
    for key in keys.values():
        await client.xadd(key, {"n": "1"})
    await boxes.reader.discover()
    await client.xreadgroup(GROUP, "holder", {keys["a"]: ">"}, count=1)
    for name in ("dead-1", "dead-2", "me"):
        for key in keys.values():
            await client.xgroup_createconsumer(key, GROUP, name)

    async def names(org: str) -> set[str]:
        return {c["name"].decode() for c in await client.xinfo_consumers(keys[org], GROUP)}

    assert await boxes.reader.forget_consumers(["a", "b", "none"], 3_600_000) == 0, (
        "none idle so long"
    )
    assert await boxes.reader.forget_consumers(["a", "b", "none"], 0) == 4
    assert await names("a") == {"holder", "me"}
    assert await names("b") == {"me"}
    assert (await boxes.reader.state("a")).pending == 1


async def test_a_dead_flushers_backlog_is_taken_over_in_full_batches(stack: Stack) -> None:
    """What a dead flusher held in one outbox among many is claimed in whole batches, round
    after round, not a share of the batch per outbox every ECU_FLUSHER_CLAIM_IDLE_MS / 2."""
    busy, quiet = "busy", [f"quiet-{i}" for i in range(9)]
    settings = dataclasses.replace(stack.settings, flusher_batch=40, flusher_claim_idle_ms=30_000)
    flusher = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    for org in [busy, *quiet]:
        await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    for i in range(159):
        await stack.engine.set_cap(busy, "team", "t1", 100_000 + i)
    await flusher.reader.discover()
    key = stack.store.outbox_key(busy)
    client = stack.direct
    ((_, taken),) = await client.xreadgroup(GROUP, "dead", {key: ">"})
    # The dead flusher's entries have been pending for an hour (claimable after 30 s).
    await client.xclaim(key, GROUP, "dead", 0, [eid for eid, _ in taken], idle=3_600_000)
    sizes = []
    while n := await flusher.flush_once(read_ahead=False):
        sizes.append(n)
    assert sum(sizes) == 160 + 9
    assert sizes[0] == 4 + 9, "the first round: a share of 40 // 10 = 4 per outbox"
    assert sizes[1:] == [40, 40, 40, 36], "then whole batches of the backlog, at once"
    await assert_agree(stack, [busy, *quiet])


async def test_a_drain_takes_over_every_pending_entry_whoever_holds_it(stack: Stack) -> None:
    """``flush --once`` and the final flush move what a dead flusher left pending, however
    recently, and what a live one holds too: written by both, applied once."""
    org = "takeover"
    settings = dataclasses.replace(stack.settings, flusher_batch=50, flusher_claim_idle_ms=60_000)
    live = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    await stack.engine.grant(org, "g1", 10_000_000, GrantKind.TOP_UP)
    for i in range(300):
        await stack.engine.set_cap(org, "team", "t1", 100_000 + i)
    await live.reader.discover()
    key = stack.store.outbox_key(org)
    await stack.direct.xreadgroup(GROUP, "dead", {key: ">"}, count=250)
    assert await live.flush_once(read_ahead=False) == 50, "the live one holds the last 51"
    taken = await live.reader.read([org], 100)
    assert len(taken) == 1
    drainer = Flusher(stack.store, stack.ledger, settings, FlusherMetrics(CollectorRegistry()))
    assert await drainer.drain() == 251, "the dead one's 250 and the live one's entry"
    assert await drainer.reader.backlog([org]) == Backlog(0, 0, None, 0)
    await asyncio.to_thread(stack.ledger.write_events, [e.fields for e in taken])
    await live.reader.ack(taken)  # the live one's write: a duplicate, changing nothing
    await assert_agree(stack, [org])


async def test_gauges_keep_moving_while_the_ledger_refuses_writes(
    backend: str, tmp_path: Any
) -> None:
    """A ledger outage stops the cycles, not the observation: the outbox length and lag come
    from Redis on their own cadence, and the failed cycles are counted by cause."""
    import sqlite3

    url = f"sqlite://{tmp_path}/down.db"
    settings = make_settings(
        backend,
        ledger_url=url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
        flusher_interval_ms=10,
        flusher_observe_interval_ms=10,
    )
    ledger = open_ledger(url + "?busy_timeout_ms=20")
    ledger.migrate()
    s = Stack(settings, ledger)
    blocker = sqlite3.connect(str(tmp_path / "down.db"), isolation_level=None)
    stop = asyncio.Event()
    runner = None
    try:
        org = "observed"
        await s.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
        assert await s.flusher.drain() == 1
        blocker.execute("BEGIN EXCLUSIVE")  # the ledger refuses every write from now on
        await traffic(s.engine, org, 10, random.Random(5))
        length = (await s.flusher.reader.state(org)).length
        assert length > 0
        runner = asyncio.create_task(s.flusher.run(stop))

        def observed() -> bool:
            return (
                s.metric("ecu_flusher_failed_cycles_total", {"cause": "ledger"}) >= 2
                and s.metric("ecu_outbox_length") == length
                and s.metric("ecu_outbox_pending") == length  # the batch it cannot write
                and s.metric("ecu_outbox_oldest_unflushed_age_seconds") > 0
            )

        await wait_until(observed, "failed cycles and the stuck outbox in the metrics")
        assert s.metric("ecu_flusher_failed_cycles_total", {"cause": "redis"}) == 0
        assert s.metric("ecu_flusher_last_success_timestamp_seconds") == 0
        blocker.execute("ROLLBACK")
        await wait_until(
            lambda: s.metric("ecu_outbox_length") == 0 and s.metric("ecu_outbox_pending") == 0,
            "the outbox metrics at zero once the database is back",
        )
        assert s.metric("ecu_outbox_oldest_unflushed_age_seconds") == 0
        assert s.metric("ecu_outbox_length") == 0
    finally:
        stop.set()
        if runner is not None:
            await runner
        blocker.close()
        await drop_keys(settings)
        await s.store.close()
        ledger.close()


async def test_livez_fails_once_no_cycle_succeeded_for_the_stall_timeout(
    backend: str, tmp_path: Any
) -> None:
    """/livez (the chart's livenessProbe) answers 200 while cycles succeed, empty ones too,
    and 503 once none has for ECU_FLUSHER_STALL_TIMEOUT_MS: a flusher failing every cycle
    answers /metrics all the same, and only this probe sees it make no progress."""
    import sqlite3
    import urllib.error
    import urllib.request

    from ecu_sidecar.metrics import serve_http

    url = f"sqlite://{tmp_path}/stall.db"
    settings = make_settings(
        backend,
        ledger_url=url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
        flusher_interval_ms=10,
        flusher_stall_timeout_ms=60_000,
    )
    ledger = open_ledger(url + "?busy_timeout_ms=20")
    ledger.migrate()
    s = Stack(settings, ledger)
    clock = ManualClock()
    s.flusher = Flusher(s.store, ledger, settings, s.flusher.metrics, clock=clock)
    http = serve_http("127.0.0.1:0", s.registry, {"/livez": s.flusher.liveness})

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}{path}") as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    blocker = sqlite3.connect(str(tmp_path / "stall.db"), isolation_level=None)
    stop = asyncio.Event()
    runner = None
    try:
        org = "stuck"
        await s.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
        assert (await asyncio.to_thread(get, "/livez"))[0] == 200, "just made"
        clock.now += 120
        assert await asyncio.to_thread(get, "/livez") == (
            503,
            "stalled: no flusher cycle succeeded for 120s (ECU_FLUSHER_STALL_TIMEOUT_MS=60000)\n",
        )
        runner = asyncio.create_task(s.flusher.run(stop))
        await wait_until(lambda: s.flusher.stalled_s() == 0, "the first cycle writing the grant")
        assert (await asyncio.to_thread(get, "/livez"))[0] == 200
        blocker.execute("BEGIN EXCLUSIVE")  # from now on every write fails
        await s.engine.set_cap(org, "team", "t1", 5_000)
        failed = s.metric("ecu_flusher_failed_cycles_total", {"cause": "ledger"})
        await wait_until(
            lambda: s.metric("ecu_flusher_failed_cycles_total", {"cause": "ledger"}) > failed,
            "a failed cycle",
        )
        clock.now += 59
        assert (await asyncio.to_thread(get, "/livez"))[0] == 200, "within the timeout"
        clock.now += 2
        status, text = await asyncio.to_thread(get, "/livez")
        assert (status, text.split(":")[0]) == (503, "stalled")
        metrics = await asyncio.to_thread(get, "/metrics")
        assert metrics[0] == 200 and "ecu_flusher_failed_cycles_total" in metrics[1]
        blocker.execute("ROLLBACK")  # the ledger is back: the next cycle succeeds
        await wait_until(lambda: s.flusher.stalled_s() == 0, "a successful cycle after it")
        assert (await asyncio.to_thread(get, "/livez"))[0] == 200
    finally:
        stop.set()
        if runner is not None:
            await runner
        http.shutdown()
        http.server_close()
        blocker.close()
        await drop_keys(settings)
        await s.store.close()
        ledger.close()


@pytest.mark.parametrize("backend", ["redis"], indirect=True)  # epochs are a Redis node's
async def test_histories_changed_in_one_pass_are_rebuilt_one_at_a_time(stack: Stack) -> None:
    """A pass checks its organizations concurrently; those whose Redis history changed (here
    planted: their accounts name another node's epoch) are drained and rebuilt one after the
    other, each behind a fence started when its turn comes, and every change survives."""
    orgs = [f"hist-{i}" for i in range(6)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    assert await stack.flusher.reconcile() == dict.fromkeys(orgs, 0)  # the node's epoch seen
    changed = orgs[::2]
    for org in changed:
        await stack.engine.reserve(AccountRef(org), [item(f"{org}-r", 10_000)])  # unflushed
        acct = org_keys(stack.settings.key_prefix, org)[0]
        await stack.direct.hset(acct, "epoch", "a-lost-primary:its-history")
    drifts = await stack.flusher.reconcile()
    assert drifts == {org: 0 for org in orgs if org not in changed}  # the changed: next pass
    assert stack.metric("ecu_flusher_history_rebuilds_total") == len(changed)
    await stack.flusher.drain()  # the rebuilds' own events
    assert await stack.flusher.reconcile() == dict.fromkeys(orgs, 0)
    for org in changed:
        b = await stack.engine.balance(org)
        assert (b.held_uecu, b.outstanding_holds, b.available_uecu) == (10_000, 1, 90_000)
    await assert_agree(stack, orgs)
