"""A rebuild from the ledger owns the organization's whole key set (issue 14, items 3 and 10):
partial and full loss of an organization's Redis keys, holds the ledger records as outstanding
restored as live holds, the rebuild waiting for the flusher, reconcile finding keys lost and
rebuilding, and no notification sent twice. Real Redis and the embedded store; the ledger on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ecu_sidecar import errors
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import Ledger, open_ledger
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitItem,
    GrantKind,
    HoldState,
    JobType,
    LedgerHold,
    ReserveItem,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.store.keys import SUFFIXES, org_keys
from tests.conftest import Database, drop_keys, make_settings
from tests.test_flusher import Stack as FlusherStack

MINUTE_MS = 60_000


def item(rid: str, amount: int, ttl_ms: int = 10 * MINUTE_MS) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.INFERENCE, "gpt-4o", ttl_ms)


class Stack(FlusherStack):
    """Store, ledger, engine and flusher of one test, on real Redis."""

    def key(self, org: str, suffix: str) -> str:
        return org_keys(self.settings.key_prefix, org)[SUFFIXES.index(suffix)]

    async def lose(self, org: str, *suffixes: str) -> None:
        """What eviction does: whole keys of the organization vanish."""
        await self.direct.delete(*(self.key(org, s) for s in suffixes))

    async def balance(self, org: str) -> Balance:
        b = await self.engine.balance(org)
        assert b.conservation_faults() == [], b.conservation_faults()
        return b

    async def agree(self, org: str) -> None:
        """Drained, the ledger and Redis say the same; nothing was quarantined."""
        await self.flusher.drain()
        b = await self.balance(org)
        c = await asyncio.to_thread(self.ledger.conservation, org)
        assert c is not None and c.ok, c
        assert (c.granted_uecu, c.expired_grants_uecu, c.committed_uecu, c.balance_uecu) == (
            b.granted_uecu,
            b.expired_grants_uecu,
            b.committed_uecu,
            b.balance_uecu,
        )
        assert await asyncio.to_thread(self.ledger.quarantined, org=org) == []


@pytest_asyncio.fixture
async def stack(backend: str, database: Database) -> AsyncIterator[Stack]:
    """Real Redis, and the embedded store (the same scripts in-process: the default of
    ``make run``, with a ledger when ECU_LEDGER_URL is set)."""
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


async def test_a_commit_never_burns_a_grant_a_limited_sweep_left_past_its_expiry(
    stack: Stack,
) -> None:
    """Found by the model-based test with its sweep held back. Each script expires at most
    ECU_SWEEP_LIMIT due grants (1 here): of three past their expiry, the reserve's sweep takes
    one, the commit's another, and the commit's burn met the third still indexed and spent it,
    where the ledger's replay of the burn order, which a rebuild trusts for the rests of the
    grants not yet expired, never burns a grant at or after its expiry. Now the commit bills
    from the pool, the third grant keeps its whole rest for its expiry, and a rebuild taken
    before that expiry restores the same figures as no loss at all."""
    stack.store.sweep_limit = 1
    org = "late-grants"
    t0 = await stack.store.now_ms()
    await stack.engine.grant(org, "top", 1_000, GrantKind.TOP_UP)
    for gid, amount in (("g1", 300), ("g2", 200), ("g3", 100)):
        await stack.engine.grant(org, gid, amount, GrantKind.STARTER, t0 + MINUTE_MS)
    stack.store.clock_offset_ms += MINUTE_MS + 1
    await stack.engine.reserve(AccountRef(org), [item("h", 50)])  # its sweep expires g1
    (c,) = await stack.engine.commit(org, [CommitItem("h", 50)])  # and this one g2
    assert c.error is None and c.committed_uecu == 50
    rest = await stack.direct.hget(stack.key(org, "acct"), "g:g3")
    assert int(rest) == 100, "a grant past its expiry was burnt"
    await stack.flusher.drain()
    await stack.lose(org, *SUFFIXES)
    b = await stack.balance(org)  # rebuilt from the ledger; its sweep expires g3
    assert (b.expired_grants_uecu, b.committed_uecu, b.balance_uecu) == (600, 50, 950)
    await stack.agree(org)


async def test_losing_only_the_account_hash_rebuilds_the_holds_with_it(stack: Stack) -> None:
    """The reproduction of item 3: before, the old holds stayed beside a fresh held = 0, a
    release drove held negative for good and the organization could reserve beyond its
    balance."""
    org = "evicted"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    who = AccountRef(org, "t1", "p1", "u1")
    await stack.engine.reserve(who, [item("a", 30_000), item("b", 20_000)])
    await stack.flusher.drain()
    await stack.lose(org, "acct")

    b = await stack.balance(org)  # rebuilt on first use
    assert (b.balance_uecu, b.held_uecu, b.reserved_uecu, b.outstanding_holds) == (
        100_000,
        50_000,
        50_000,
        2,
    )
    assert [(t.id, t.held_uecu) for t in b.teams] == [("t1", 50_000)]
    assert [(p.id, p.held_uecu) for p in b.projects] == [("p1", 50_000)]

    released = await stack.engine.release(org, "a")
    assert (released.released_uecu, released.state) == (30_000, HoldState.RELEASED)
    b = await stack.balance(org)
    assert (b.held_uecu, b.available_uecu) == (20_000, 80_000)
    assert b.teams[0].held_uecu == 20_000
    with pytest.raises(errors.InsufficientEcu):
        await stack.engine.reserve(AccountRef(org), [item("too-much", 80_001)])
    await stack.engine.reserve(AccountRef(org), [item("all-of-it", 80_000)])
    with pytest.raises(errors.InsufficientEcu):
        await stack.engine.reserve(AccountRef(org), [item("one-more", 1)])
    (c,) = await stack.engine.commit(org, [CommitItem("b", 20_000)])
    assert c.error is None and not c.late
    b = await stack.balance(org)
    assert (b.held_uecu, b.available_uecu, b.balance_uecu) == (80_000, 0, 80_000)
    await stack.agree(org)


async def test_full_loss_restores_outstanding_holds_as_live_holds(stack: Stack) -> None:
    org = "amnesia"
    await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    who = AccountRef(org, "t1", "", "u1")
    placed = await stack.engine.reserve(who, [item("long", 40_000, MINUTE_MS)])
    extended = await stack.engine.extend(org, "long", 5 * MINUTE_MS, 1)
    assert extended.deadline_unix_ms > placed.holds[0].deadline_unix_ms
    await stack.engine.reserve(who, [item("short", 10_000, MINUTE_MS)])
    await stack.engine.reserve(who, [item("done", 5_000), item("dropped", 7_000)])
    await stack.engine.commit(org, [CommitItem("done", 4_000)])
    await stack.engine.release(org, "dropped")
    await stack.flusher.drain()

    account = await asyncio.to_thread(stack.ledger.ledger_account, org)
    assert account is not None
    t0 = {h.reservation_id: h.t0_ms for h in account.active_holds}
    assert sorted(account.active_holds, key=lambda h: h.reservation_id) == [
        LedgerHold(
            "long", 40_000, t0["long"], extended.deadline_unix_ms, MINUTE_MS, 1, "t1", "", "u1",
            "inference", "gpt-4o",
        ),
        LedgerHold(
            "short", 10_000, t0["short"], t0["short"] + MINUTE_MS, MINUTE_MS, 0, "t1", "", "u1",
            "inference", "gpt-4o",
        ),
    ]  # fmt: skip

    await drop_keys(stack.settings)  # Redis lost everything
    # The short hold's deadline passes while Redis is empty; the long one's does not.
    stack.store.clock_offset_ms = 2 * MINUTE_MS
    b = await stack.balance(org)
    assert (b.held_uecu, b.outstanding_holds, b.expired_uecu, b.expired_holds) == (
        40_000,
        1,
        10_000,
        1,
    )
    assert (b.balance_uecu, b.carried_committed_uecu) == (996_000, 4_000)
    # The restored hold is the hold the worker knows: a replay answers its extended deadline,
    # a retried heartbeat is a replay, and a commit settles it normally (not late).
    again = await stack.engine.reserve(who, [item("long", 40_000, MINUTE_MS)])
    assert again.replayed and again.holds[0].deadline_unix_ms == extended.deadline_unix_ms
    assert (await stack.engine.extend(org, "long", 5 * MINUTE_MS, 1)).replayed
    (c,) = await stack.engine.commit(org, [CommitItem("long", 30_000)])
    assert c.error is None and not c.late
    assert (c.committed_uecu, c.released_uecu) == (30_000, 10_000)
    b = await stack.balance(org)
    assert (b.held_uecu, b.committed_from_holds_uecu, b.released_uecu) == (0, 30_000, 10_000)
    await stack.agree(org)
    # The ledger holds one commit of each hold, and the expiry of the short one, once.
    usage = await asyncio.to_thread(stack.ledger.consumption, org, by="team")
    assert sum(r.events for r in usage) == 2
    account = await asyncio.to_thread(stack.ledger.ledger_account, org)
    assert account is not None and account.active_holds == []
    totals = (await asyncio.to_thread(stack.ledger.account, org)).holds
    assert (totals.expired_uecu, totals.outstanding_uecu) == (10_000, 0)


async def test_rebuild_waits_while_the_outbox_has_unflushed_events(stack: Stack) -> None:
    org = "busy"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.engine.reserve(AccountRef(org), [item("flushed", 10_000)])
    await stack.flusher.drain()
    await stack.engine.reserve(AccountRef(org), [item("in-outbox", 20_000)])
    await stack.lose(org, "acct")

    with pytest.raises(errors.StoreUnavailable, match="waits for the flusher"):
        await stack.engine.balance(org)
    # Nothing was written: the holds and the outbox are as they were, no account.
    assert not await stack.direct.exists(stack.key(org, "acct"))
    assert await stack.direct.hlen(stack.key(org, "holds")) == 2
    assert await stack.flusher.hydrate(org) is False  # the flusher drains first, too

    # A caller that saw the outbox empty, while events arrived since, is refused by the
    # script itself.
    await stack.flusher.drain()
    account = await asyncio.to_thread(stack.ledger.ledger_account, org)
    assert account is not None
    with pytest.raises(errors.StoreUnavailable, match="waits for the flusher"):
        await stack.store.hydrate(account, flushed_id="0-0")
    assert not await stack.direct.exists(stack.key(org, "acct"))

    assert await stack.flusher.hydrate_missing() == [org]
    b = await stack.balance(org)
    assert (b.held_uecu, b.outstanding_holds, b.available_uecu) == (30_000, 2, 70_000)
    await stack.agree(org)


async def test_a_flush_between_the_outbox_check_and_the_ledger_read_is_no_rebuild(
    stack: Stack,
) -> None:
    """The ledger read must come after a position seen fully flushed: a flush that lands after
    the read (the flusher catching up meanwhile) leaves the read stale although the outbox is
    flushed by the time the script runs."""
    org = "racy"
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.engine.reserve(AccountRef(org), [item("a", 10_000)])
    await stack.flusher.drain()
    await stack.engine.reserve(AccountRef(org), [item("b", 20_000)])
    await stack.lose(org, "acct")
    loop = asyncio.get_running_loop()

    class FlushAfterRead(Ledger):
        def ledger_account(self, org: str) -> Any:
            stale = super().ledger_account(org)  # without hold b
            asyncio.run_coroutine_threadsafe(stack.flusher.drain(), loop).result(timeout=30)
            return stale

    racy = FlushAfterRead(stack.ledger.backend)
    engine = QuotaEngine(stack.store, stack.settings, ledger=racy)
    with pytest.raises(errors.StoreUnavailable, match="waits for the flusher"):
        await engine.balance(org)
    assert (await stack.store.outbox_state(org)).fully_flushed  # the flush did land
    b = await stack.balance(org)  # the retry reads a complete ledger
    assert (b.held_uecu, b.outstanding_holds) == (30_000, 2)
    await stack.agree(org)


@pytest.mark.parametrize("lost", ["deadlines", "holds", "tombs", "gexp", "grants"])
async def test_reconcile_rebuilds_an_organization_whose_keys_were_lost(
    stack: Stack, lost: str
) -> None:
    org = f"lost-{lost}"
    seconds = await stack.store.now_ms() // 1000
    await stack.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await stack.engine.grant(
        org, "starter", 5_000, GrantKind.STARTER, expires_at_ms=(seconds + 86_400) * 1000
    )
    who = AccountRef(org, "t1")
    await stack.engine.reserve(who, [item("a", 30_000), item("b", 20_000), item("c", 1_000)])
    await stack.engine.commit(org, [CommitItem("c", 1_000)])  # a tombstone, and a burn
    await stack.flusher.drain()
    assert await stack.flusher.reconcile() == {org: 0}
    assert stack.metric("ecu_flusher_key_loss_accounts") == 0

    await stack.lose(org, lost)
    assert await stack.flusher.reconcile() == {}  # rebuilt instead of compared
    assert stack.metric("ecu_flusher_key_loss_accounts") == 1
    assert stack.metric("ecu_hydrations_total") == 1

    client = stack.direct
    assert await client.zcard(stack.key(org, "deadlines")) == 2
    assert await client.hlen(stack.key(org, "holds")) == 2
    assert await client.zcard(stack.key(org, "gexp")) == 1
    assert await client.hlen(stack.key(org, "grants")) == 2
    b = await stack.balance(org)
    assert (b.held_uecu, b.outstanding_holds, b.balance_uecu) == (50_000, 2, 104_000)
    assert b.teams[0].held_uecu == 50_000
    await stack.flusher.drain()
    assert await stack.flusher.reconcile() == {org: 0}
    assert stack.metric("ecu_flusher_key_loss_accounts") == 0
    # The restored deadlines work: the holds expire when they are due.
    stack.store.clock_offset_ms = 11 * MINUTE_MS
    b = await stack.balance(org)
    assert (b.held_uecu, b.expired_uecu) == (0, 50_000)
    await stack.agree(org)


async def test_a_rebuild_sends_no_notification_twice(stack: Stack) -> None:
    """Item 10: a rebuild re-emitted a notification the ledger already held with other content,
    and the ledger quarantined it (a false alert)."""
    org = "noisy"
    await stack.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    await stack.engine.set_auto_topup(org, 300_000, 1_000_000)
    await stack.engine.reserve(AccountRef(org), [item("big", 850_000)])  # 150,000 left
    await stack.flusher.drain()
    notes = await asyncio.to_thread(stack.ledger.notifications, org)
    assert sorted(n.kind for n in notes) == ["auto_topup_requested", "low_balance_20"]

    await stack.lose(org, "acct")
    await stack.engine.reserve(AccountRef(org), [item("more", 100_000)])  # 50,000 left: 5 %
    await stack.engine.reserve(AccountRef(org), [item("last", 1)])  # below 5 %
    await stack.agree(org)
    notes = await asyncio.to_thread(stack.ledger.notifications, org)
    assert sorted((n.kind, n.crossing_id) for n in notes) == [
        ("auto_topup_requested", "1"),
        ("low_balance_20", "1"),
        ("low_balance_5", "1"),
    ]
    (five,) = [n for n in notes if n.kind == "low_balance_5"]
    assert (five.available_uecu, five.reference_uecu) == (49_999, 1_000_000)
    # A grant starts a new generation: the warnings are armed again (reference 50,009).
    await stack.engine.grant(org, "g2", 10, GrantKind.TOP_UP)
    await stack.engine.reserve(AccountRef(org), [item("again", 40_009)])  # 10,000 left
    await stack.agree(org)
    notes = await asyncio.to_thread(stack.ledger.notifications, org)
    assert sorted(n.kind for n in notes if n.crossing_id == "2") == [
        "auto_topup_requested",
        "low_balance_20",
    ]


async def test_ledger_lists_outstanding_holds_by_reservation_and_creation_time(
    stack: Stack,
) -> None:
    """A reservation id reused after its tombstone was purged makes a new hold (a new t0): only
    the events of that hold settle it, whatever the old one did."""
    org = "reuse"

    def ev(etype: str, eid: str, ts: int, **fields: str) -> dict[str, str]:
        return {"type": etype, "eid": eid, "org": org, "ts": str(ts), **fields}

    hold = {"team": "", "project": "p", "user": "", "job": "gepa", "model": ""}
    result = await asyncio.to_thread(
        stack.ledger.write_events,
        [
            ev("grant", "grant:g", 1, grant_id="g", amount="100", kind="top_up", expires_at="0"),
            ev("reserve", "reserve:r:10", 10, rid="r", amount="5", deadline="70", rcv="v7", **hold),
            ev("extend", "extend:r:10:1", 20, rid="r", deadline="90", sequence="1"),
            ev("release", "release:r:10", 30, rid="r", amount="5", **hold),
            ev("reserve", "reserve:r:40", 40, rid="r", amount="6", deadline="100", **hold),
            ev("extend", "extend:r:40:3", 50, rid="r", deadline="160", sequence="3"),
            ev("extend", "extend:r:40:2", 45, rid="r", deadline="130", sequence="2"),
            ev("reserve", "reserve:x:41", 41, rid="x", amount="7", deadline="99", rcv="v7", **hold),
        ],
    )
    assert (result.inserted, result.quarantined) == (8, 0)
    account = await asyncio.to_thread(stack.ledger.ledger_account, org)
    assert account is not None
    assert account.active_holds == [
        LedgerHold("r", 6, 40, 160, 60, 3, "", "p", "", "gepa", ""),
        LedgerHold("x", 7, 41, 99, 58, 0, "", "p", "", "gepa", "", "v7"),
    ]


async def test_each_rebuild_is_reported_with_its_result(stack: Stack) -> None:
    """The sidecar counts (ecu_sidecar_rebuilds_total) and logs the organizations it rebuilt
    from the ledger: rebuilt, raced (another process first) or unknown to the ledger."""
    seen: list[str] = []
    stack.engine.hydrator.on_rebuild = seen.append
    org = "reported"
    await stack.engine.grant(org, "g1", 70_000, GrantKind.TOP_UP)
    assert seen == ["unknown"]  # a first grant asks the ledger, which does not know org yet
    await stack.flusher.drain()
    await stack.lose(org, "acct")
    assert (await stack.balance(org)).balance_uecu == 70_000
    assert seen == ["unknown", "rebuilt"]
    with pytest.raises(errors.AccountNotFound):
        await stack.balance("never-granted")
    assert seen == ["unknown", "rebuilt", "unknown"]


def test_the_server_counts_rebuilds_by_result() -> None:
    server = SidecarServer(make_settings("embedded"), registry=CollectorRegistry())
    server.engine.hydrator.on_rebuild("rebuilt")
    server.engine.hydrator.on_rebuild("unknown")
    server.engine.hydrator.on_rebuild("unknown")
    sample = server.registry.get_sample_value
    assert sample("ecu_sidecar_rebuilds_total", {"result": "rebuilt"}) == 1
    assert sample("ecu_sidecar_rebuilds_total", {"result": "unknown"}) == 2
    assert sample("ecu_sidecar_rebuilds_total", {"result": "raced"}) == 0


async def test_a_rebuild_reads_the_ledger_on_its_own_threads(stack: Stack) -> None:
    """Ledger calls run on the engine's ledger threads (ECU_LEDGER_THREADS), long-prompt
    pricing on its own: with every thread of the default executor (the in-process flusher's)
    busy, an organization Redis lost is still rebuilt."""
    org = "own-threads"
    await stack.engine.grant(org, "g1", 40_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    await stack.lose(org, "acct")
    loop = asyncio.get_running_loop()
    release = threading.Event()
    default_threads = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(default_threads)]
    try:
        balance = await asyncio.wait_for(stack.engine.balance(org), timeout=10)
        assert balance.balance_uecu == 40_000
    finally:
        release.set()
        await asyncio.gather(*busy)
    names = stack.engine.hydrator.executor.submit(lambda: threading.current_thread().name)
    assert names.result(timeout=5).startswith("ecu-ledger")
    pricing = stack.engine.pricing_executor.submit(lambda: threading.current_thread().name)
    assert pricing.result(timeout=5).startswith("ecu-pricing")
