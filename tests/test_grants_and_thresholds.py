"""Grant expiry and burn order, low-balance warnings, auto-top-up, rebuild from the ledger,
reconciliation and orphan commits: the Redis side of the ledger rules (both backends)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ecu_sidecar import errors
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.model import (
    AccountRef,
    CommitItem,
    GrantKind,
    JobType,
    LedgerAccount,
    ReserveItem,
)
from ecu_sidecar.store import RedisStore
from tests.test_engine import outbox

DAY_MS = 86_400_000


def item(rid: str, amount: int, ttl_ms: int = 0) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.GEPA, "", ttl_ms)


async def now_ms(store: RedisStore) -> int:
    return await store.now_ms() - store.clock_offset_ms


async def spend(engine: QuotaEngine, org: str, rid: str, amount: int) -> None:
    await engine.reserve(AccountRef(org), [item(rid, amount)])
    (c,) = await engine.commit(org, [CommitItem(rid, amount)])
    assert c.error is None


async def test_starter_expires_and_burns_first(
    engine: QuotaEngine, store: RedisStore, direct: Any
) -> None:
    t0 = await now_ms(store)
    org = "burn-org"
    await engine.grant(org, "topup", 1_000, GrantKind.TOP_UP)
    await engine.grant(org, "starter-late", 300, GrantKind.STARTER, t0 + 2 * DAY_MS)
    await engine.grant(org, "starter-soon", 200, GrantKind.STARTER, t0 + DAY_MS)
    await spend(engine, org, "a", 250)  # burns starter-soon (200) then 50 of starter-late
    b = await engine.balance(org)
    assert (b.granted_uecu, b.balance_uecu) == (1_500, 1_250)
    store.clock_offset_ms = DAY_MS + 1
    b = await engine.balance(org)
    assert b.expired_grants_uecu == 0, "starter-soon was fully spent: nothing left to expire"
    store.clock_offset_ms = 2 * DAY_MS + 1
    b = await engine.balance(org)
    assert b.expired_grants_uecu == 250, "the rest of starter-late (300 - 50) leaves"
    assert (b.balance_uecu, b.available_uecu) == (1_000, 1_000), "the top-up never expires"
    assert b.conservation_faults() == []
    events = [e for e in await outbox(direct, store, org) if e["type"] == "grant_expire"]
    assert [(e["grant_id"], e["amount"]) for e in events] == [("starter-late", "250")]


async def test_grant_already_expired_is_refused(engine: QuotaEngine, store: RedisStore) -> None:
    with pytest.raises(errors.GrantAlreadyExpired):
        await engine.grant("o", "g", 10, GrantKind.STARTER, await now_ms(store) - 1)


async def test_expiry_with_outstanding_holds(engine: QuotaEngine, store: RedisStore) -> None:
    org = "hold-org"
    await engine.grant(org, "starter", 1_000, GrantKind.STARTER, await now_ms(store) + 60_000)
    await engine.reserve(AccountRef(org), [item("h", 800, ttl_ms=DAY_MS)])
    store.clock_offset_ms = 60_001
    b = await engine.balance(org)
    # Only the rest nobody holds leaves; the held 800 stays for the hold's commit.
    assert (b.balance_uecu, b.held_uecu, b.available_uecu) == (800, 800, 0)
    assert b.expired_grants_uecu == 200
    with pytest.raises(errors.InsufficientEcu):
        await engine.reserve(AccountRef(org), [item("new", 1)])
    (c,) = await engine.commit(org, [CommitItem("h", 800)])
    assert c.error is None and c.committed_uecu == 800 and c.available_uecu == 0
    b = await engine.balance(org)
    assert b.expired_grants_uecu + b.committed_uecu <= b.granted_uecu
    assert b.conservation_faults() == []


async def test_expiry_never_charges_twice(
    engine: QuotaEngine, store: RedisStore, direct: Any
) -> None:
    """10 ECU granted, expiring with a 10 ECU hold outstanding: once 10 expired and 10 were
    billed, the balance was -10. Now nothing expires and the commit spends the grant."""
    org = "twice-org"
    await engine.grant(org, "s", 10_000_000, GrantKind.STARTER, await now_ms(store) + 60_000)
    await engine.reserve(AccountRef(org), [item("h", 10_000_000, ttl_ms=DAY_MS)])
    store.clock_offset_ms = 60_001
    (c,) = await engine.commit(org, [CommitItem("h", 10_000_000)])
    assert c.error is None and c.committed_uecu == 10_000_000
    b = await engine.balance(org)
    assert (b.expired_grants_uecu, b.committed_uecu, b.balance_uecu) == (0, 10_000_000, 0)
    assert b.conservation_faults() == []
    (ev,) = [e for e in await outbox(direct, store, org) if e["type"] == "grant_expire"]
    assert (ev["amount"], ev["kept"]) == ("0", "10000000")


async def test_warnings_fire_once_per_crossing_under_concurrency(
    engine: QuotaEngine,
    store: RedisStore,
    direct: Any,
) -> None:
    org = "warn-org"
    await engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await engine.set_auto_topup(org, 30_000, 50_000)

    async def spender(w: int) -> None:
        for s in range(10):
            try:
                await spend(engine, org, f"w{w}-{s}", 1_000)
            except errors.InsufficientEcu:
                return

    await asyncio.gather(*(spender(w) for w in range(20)))  # 200 x 1,000 > 100,000
    kinds = [e["kind"] for e in await outbox(direct, store, org) if e["type"] == "notify"]
    assert sorted(kinds) == ["auto_topup_requested", "low_balance_20", "low_balance_5"]
    b = await engine.balance(org)
    assert b.available_uecu == 0

    # A top-up re-arms all three: spending down again notifies again, once each.
    await engine.grant(org, "g2", 100_000, GrantKind.AUTO_TOP_UP)
    await asyncio.gather(*(spender(w) for w in range(20, 40)))
    notes = [e for e in await outbox(direct, store, org) if e["type"] == "notify"]
    assert sorted(e["kind"] for e in notes) == sorted(
        ["auto_topup_requested", "low_balance_20", "low_balance_5"] * 2
    )
    assert len({e["eid"] for e in notes}) == 6


async def test_warning_reference_is_the_level_after_the_latest_grant(
    engine: QuotaEngine,
    store: RedisStore,
    direct: Any,
) -> None:
    org = "ref-org"
    await engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
    await spend(engine, org, "a", 800)  # 200 left = exactly 20%: not below
    assert not [e for e in await outbox(direct, store, org) if e["type"] == "notify"]
    await spend(engine, org, "b", 1)  # 199 < 20% of 1,000
    notes = [e for e in await outbox(direct, store, org) if e["type"] == "notify"]
    assert [(e["kind"], e["available"], e["reference"]) for e in notes] == [
        ("low_balance_20", "199", "1000")
    ]


async def test_hydration_is_race_free(engine: QuotaEngine, store: RedisStore) -> None:
    account = LedgerAccount(
        organization="lost-org",
        granted_uecu=10_000,
        expired_grants_uecu=1_000,
        committed_uecu=4_000,
        generation=3,
        scopes=[("team", "t1", 5_000, 2_500), ("project", "p1", None, 700)],
        expiring_grants=[("starter", await now_ms(store) + DAY_MS, 600)],
        auto_topup_threshold_uecu=500,
        auto_topup_amount_uecu=2_000,
    )
    applied = await asyncio.gather(*(store.hydrate(account, flushed_id="0-0") for _ in range(25)))
    assert sum(applied) == 1
    b = await engine.balance("lost-org")
    assert (b.granted_uecu, b.expired_grants_uecu, b.committed_uecu, b.balance_uecu) == (
        10_000,
        1_000,
        4_000,
        5_000,
    )
    assert (b.held_uecu, b.auto_topup_threshold_uecu) == (0, 500)
    assert [(t.id, t.cap_uecu, t.used_uecu) for t in b.teams] == [("t1", 5_000, 2_500)]
    assert b.conservation_faults() == []
    with pytest.raises(errors.InsufficientEcu):  # the team cap survived the rebuild
        await engine.reserve(AccountRef("lost-org", "t1"), [item("x", 2_501)])
    store.clock_offset_ms = DAY_MS + 1
    b = await engine.balance("lost-org")
    assert b.expired_grants_uecu == 1_600, "the rebuilt starter rest still expires"


async def test_an_id_never_reserved_is_never_billed_after_a_rebuild(
    engine: QuotaEngine,
    store: RedisStore,
    direct: Any,
) -> None:
    """Once, a rebuilt account billed any unknown reservation id in full, with no hold."""
    with pytest.raises(errors.HoldNotFound):  # a live account: unknown ids stay unknown
        await engine.release(await _funded(engine), "nope")
    account = LedgerAccount("rebuilt", 5_000, 0, 0, 1, [], [])
    assert await store.hydrate(account, flushed_id="0-0")
    before = await engine.balance("rebuilt")
    (c,) = await engine.commit("rebuilt", [CommitItem("lost-hold", 1_234)])
    assert isinstance(c.error, errors.HoldNotFound)
    assert await engine.balance("rebuilt") == before
    assert not [e for e in await outbox(direct, store, "rebuilt") if e["type"] == "commit"]


async def _funded(engine: QuotaEngine) -> str:
    await engine.grant("live", "g", 10, GrantKind.TOP_UP)
    return "live"


async def test_reconcile_repairs_drift_with_an_absolute_value(
    engine: QuotaEngine,
    store: RedisStore,
    direct: Any,
) -> None:
    org = "drift-org"
    await engine.grant(org, "g", 10_000, GrantKind.TOP_UP)
    key = store.outbox_key(org)
    group = "ledger"
    await direct.xgroup_create(key, group, id="0")
    # Nothing flushed yet (the group has delivered nothing): the check must skip.
    last = (await direct.xinfo_stream(key))["last-generated-id"].decode()
    assert (await store.reconcile(org, last, 10_000, group)).drift_uecu is None
    # Deliver and acknowledge everything, as a flusher would after its ledger commit.
    entries = await direct.xreadgroup(group, "c", {key: ">"}, count=100)
    await direct.xack(key, group, *[eid for eid, _ in entries[0][1]])
    assert (await store.reconcile(org, last, 10_000, group)).drift_uecu == 0
    # Inject drift: Redis lost 300 uECU of a grant the ledger holds (the write of both
    # counters; the repair then accounts for it in `repaired`, so conservation still holds).
    await direct.hincrby(store.acct_key(org), "balance", -300)
    await direct.hincrby(store.acct_key(org), "granted", -300)
    assert (await store.reconcile(org, last, 10_000, group)).drift_uecu == -300
    b = await engine.balance(org)
    assert (b.balance_uecu, b.repaired_uecu) == (10_000, 300)
    assert b.conservation_faults() == []
    # The repair appended an event: the next check skips until it is flushed too.
    assert (await store.reconcile(org, last, 10_000, group)).drift_uecu is None
