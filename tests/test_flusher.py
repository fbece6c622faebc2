"""The flusher against real Redis (and the embedded store) and real SQLite/PostgreSQL ledgers:
exactly once, reconciliation, rebuild after Redis lost everything, the ledger going away."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
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
from ecu_sidecar.store.outbox import GROUP
from tests.conftest import Database, drop_keys, make_settings


def item(rid: str, amount: int, ttl_ms: int = 0) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.INFERENCE, "gpt-4o", ttl_ms)


class Stack:
    """Store, ledger, engine and flusher of one test."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.store = RedisStore.from_settings(settings)
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
    await drop_keys(s.store, settings.key_prefix)
    await s.store.close()
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
    entries = await stack.store._client.xrange(key)
    await stack.flusher.drain()
    # The same entries again, as after a crash between the ledger commit and the ack.
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    result = await asyncio.to_thread(stack.ledger.write_events, fields)
    assert (result.inserted, result.duplicates) == (0, len(fields))
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
    for _ in range(200):
        states = [await stack.flusher.reader.state(o) for o in orgs]
        if all(st.fully_flushed and st.length == 0 for st in states):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*runners)
    await assert_agree(stack, orgs)


async def test_drift_is_detected_and_repaired(stack: Stack) -> None:
    org = "drifty"
    await stack.engine.grant(org, "g1", 500_000, GrantKind.TOP_UP)
    await traffic(stack.engine, org, 8, random.Random(5))
    await stack.flusher.drain()
    assert (await stack.flusher.reconcile()) == {org: 0}
    await stack.store._client.hincrby(stack.store.acct_key(org), "balance", 12_345)  # a fault
    drifts = await stack.flusher.reconcile()
    assert drifts == {org: 12_345}
    assert stack.metric("ecu_reconcile_drift_uecu") == 12_345
    assert stack.metric("ecu_reconcile_repairs_total") == 1
    await stack.flusher.drain()  # the repair event itself
    await assert_agree(stack, [org])
    snaps = await asyncio.to_thread(stack.ledger.snapshots, org)
    assert any(s.redis_balance_uecu - s.ledger_balance_uecu == 12_345 for s in snaps)


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
    await drop_keys(stack.store, stack.settings.key_prefix)
    # Many sidecars notice at once: one rebuild.
    results = await asyncio.gather(*(stack.engine.balance(org) for _ in range(10)))
    assert {r.balance_uecu for r in results} == {80_000}
    assert stack.metric("ecu_hydrations_total") == 0  # rebuilt by the engine, not the flusher
    b = results[0]
    assert (b.held_uecu, b.carried_committed_uecu, b.teams[0].used_uecu) == (0, 20_000, 20_000)
    # The cap survived: 60,000 - 20,000 used leaves 40,000.
    with pytest.raises(errors.InsufficientEcu):
        await stack.engine.reserve(AccountRef(org, "t1"), [item("too-big", 40_001)])
    # The hold that was in flight still commits: billed, flagged, never dropped.
    (late,) = await stack.engine.commit(org, [CommitItem("in-flight", 7_000)])
    assert late.error is None and late.late
    await stack.flusher.drain()
    await assert_agree(stack, [org])


async def test_flusher_rebuilds_organizations_missing_from_redis(stack: Stack) -> None:
    orgs = [f"gone-{i}" for i in range(3)]
    for org in orgs:
        await stack.engine.grant(org, "g1", 10_000 * (1 + orgs.index(org)), GrantKind.TOP_UP)
    await stack.flusher.drain()
    await drop_keys(stack.store, stack.settings.key_prefix)
    assert sorted(await stack.flusher.hydrate_missing()) == orgs
    assert stack.metric("ecu_hydrations_total") == 3
    assert await stack.flusher.hydrate_missing() == []
    for i, org in enumerate(orgs):
        assert (await stack.engine.balance(org)).balance_uecu == 10_000 * (1 + i)


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
        for _ in range(200):
            if s.metric("ecu_flusher_write_errors_total") >= 2:
                break
            await asyncio.sleep(0.02)
        assert s.metric("ecu_flusher_write_errors_total") >= 2
        assert (await s.flusher.reader.state(org)).length > 0, "nothing may be acknowledged"
        blocker.execute("ROLLBACK")
        blocker.close()
        for _ in range(300):
            st = await s.flusher.reader.state(org)
            if st.fully_flushed and st.length == 0:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await runner
        await assert_agree(s, [org])
    finally:
        await drop_keys(s.store, settings.key_prefix)
        await s.store.close()
        ledger.close()


def test_group_name_is_stable() -> None:
    assert GROUP == "ledger"  # renaming it would re-deliver every outbox from the start


async def test_expiry_burn_order_and_notifications_reach_the_ledger_once(stack: Stack) -> None:
    """Starter expiry with its burn order, the 20 % / 5 % warnings and the auto-top-up request
    under concurrent spending: each lands in the ledger exactly once per crossing, and a
    top-up re-arms them."""
    org = "lifecycle"
    seconds, micros = await stack.store._client.time()
    now = seconds * 1000 + micros // 1000
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
    seconds, micros = await stack.store._client.time()
    now = seconds * 1000 + micros // 1000
    await stack.engine.grant(org, "starter", 300_000, GrantKind.STARTER, now + 60_000)
    await stack.engine.grant(org, "topup", 100_000, GrantKind.TOP_UP)
    await stack.engine.reserve(AccountRef(org), [item("a", 120_000)])
    await stack.engine.commit(org, [CommitItem("a", 120_000)])
    stack.store.clock_offset_ms = 60_001
    b = await stack.engine.balance(org)
    assert (b.expired_grants_uecu, b.balance_uecu) == (180_000, 100_000)
    await stack.flusher.drain()
    await assert_agree(stack, [org])
