"""Money on the recovery paths (issue 14): exact overage bounds and thresholds, bounded late
commits, and one rule for commits Redis has no record of (the ledger's record of the hold, or
nothing). Real Redis and the embedded store; a real ledger (SQLite, PostgreSQL) where it counts."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from ecu_sidecar import errors
from ecu_sidecar.client import AsyncQuotaClient
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import MAX_REQUEST_UECU, AccountRef, CommitItem, GrantKind, Usage
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import org_keys
from tests.conftest import ADMIN_TOKEN, Database, drop_keys, make_settings
from tests.test_engine import outbox
from tests.test_flusher import Stack
from tests.test_grants_and_thresholds import DAY_MS, item

MIN = 1_000
"""The shortest TTL the settings allow (ms): holds expire once the clock steps past it."""


async def test_the_overage_bound_is_exact_for_large_holds(
    engine: QuotaEngine, store: RedisStore
) -> None:
    """floor(hold * pct / 100) in doubles bills one µECU too many for large holds."""
    hold = 700_000_000_000_003  # floor(hold * 33.0 / 100) in doubles is one too many
    bound = hold * 33 // 100
    org = "exact-bound"
    engine = QuotaEngine(store, dataclasses.replace(engine.settings, overage_max_percent=33))
    await engine.grant(org, "g1", hold, GrantKind.TOP_UP)
    await engine.grant(org, "g2", hold, GrantKind.TOP_UP)
    await engine.reserve(AccountRef(org), [item("h", hold, ttl_ms=DAY_MS)])
    (c,) = await engine.commit(org, [CommitItem("h", MAX_REQUEST_UECU)])
    assert c.error is None
    assert (c.committed_uecu, c.overage_uecu) == (hold + bound, bound)
    assert c.unbilled_overage_uecu == MAX_REQUEST_UECU - hold - bound
    b = await engine.balance(org)
    assert b.balance_uecu == 2 * hold - hold - bound
    assert b.conservation_faults() == []


@pytest.mark.parametrize(("share", "kind"), [(20, "low_balance_20"), (5, "low_balance_5")])
@pytest.mark.parametrize("ref", [2**52 - 1, 2**52 - 2**52 % 100])
async def test_low_balance_thresholds_are_exact_at_the_boundary(
    engine: QuotaEngine,
    store: RedisStore,
    share: int,
    kind: str,
    ref: int,
    direct: Any,
) -> None:
    """Near 2^52 the products avail * 100 and ref * share pass 2^53: the script decides the
    crossing from an exact quotient and remainder, to the µECU on both sides of the line."""
    org = f"exact-{share}-{ref % 7}"
    left = ref
    for n in range(5):  # a grant carries at most MAX_REQUEST_UECU; ref = available after it
        step = min(left, MAX_REQUEST_UECU)
        if step:
            await engine.grant(org, f"g{n}", step, GrantKind.TOP_UP)
        left -= step
    edge = -(-ref * share // 100)  # the smallest available NOT below the share
    rest = ref - edge
    n = 0
    while rest:
        step = min(rest, MAX_REQUEST_UECU)
        await engine.reserve(AccountRef(org), [item(f"h{n}", step, ttl_ms=DAY_MS)])
        rest, n = rest - step, n + 1
    assert (await engine.balance(org)).available_uecu == edge
    assert not [e for e in await outbox(direct, store, org) if e.get("kind") == kind]
    await engine.reserve(AccountRef(org), [item("one-more", 1, ttl_ms=DAY_MS)])
    fired = [e for e in await outbox(direct, store, org) if e.get("kind") == kind]
    assert len(fired) == 1 and int(fired[0]["available"]) == edge - 1


async def test_late_commits_bill_at_most_grants_plus_bounds(
    engine: QuotaEngine, store: RedisStore
) -> None:
    """Grant 40,000; three rounds of two 20,000 holds expire; six late commits. Once they
    billed 120,000 (available -80,000, overage 0)."""
    org = "late-org"
    pct = engine.settings.overage_max_percent
    await engine.grant(org, "g", 40_000, GrantKind.TOP_UP)
    rids = []
    for rnd in range(3):
        pair = [f"r{rnd}a", f"r{rnd}b"]
        await engine.reserve(AccountRef(org), [item(r, 20_000, ttl_ms=MIN) for r in pair])
        rids += pair
        store.clock_offset_ms += MIN + 1
        b = await engine.balance(org)
        assert b.held_uecu == 0 and b.available_uecu == 40_000
    outs = [(await engine.commit(org, [CommitItem(r, 20_000)]))[0] for r in rids]
    assert all(o.error is None and o.late for o in outs)
    billed = sum(o.committed_uecu for o in outs)
    bounds = 6 * (20_000 * pct // 100)
    assert billed <= 40_000 + bounds
    # The first two take what is available; the others only their bound each.
    assert [o.committed_uecu for o in outs] == [20_000, 20_000] + [20_000 * pct // 100] * 4
    b = await engine.balance(org)
    assert b.late_committed_uecu == billed
    assert b.late_unbilled_uecu == 6 * 20_000 - billed
    assert b.available_uecu == 40_000 - billed
    assert b.conservation_faults() == []
    # A replay of a late commit answers it again and bills nothing more.
    (again,) = await engine.commit(org, [CommitItem(rids[-1], 20_000)])
    assert again.replayed and again.committed_uecu == outs[-1].committed_uecu
    assert await engine.balance(org) == b


# -- commits Redis has no record of: the ledger decides -------------------------------------


@pytest_asyncio.fixture
async def stack(backend: str, database: Database) -> AsyncIterator[Stack]:
    settings = make_settings(
        backend,
        ledger_url=database.url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
        tombstone_ttl_ms=1_000,
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    s = Stack(settings, ledger)
    yield s
    await drop_keys(settings)
    await s.store.close()
    await s.direct.aclose()
    ledger.close()


async def _purge(s: Stack, org: str) -> None:
    """Step the clock past every tombstone's retention and sweep them away."""
    s.store.clock_offset_ms += 2 * DAY_MS
    await s.store.sweep(org)
    assert not await s.direct.hlen(org_keys(s.settings.key_prefix, org)[1])


async def test_a_commit_after_its_tombstone_is_purged_is_answered_from_the_ledger(
    stack: Stack,
) -> None:
    s, org = stack, "purged"
    await s.engine.grant(org, "g", 100_000, GrantKind.TOP_UP)
    await s.engine.reserve(AccountRef(org), [item("c", 30_000, ttl_ms=DAY_MS)])
    (done,) = await s.engine.commit(org, [CommitItem("c", 25_000, Usage(10, 20, 1))])
    await s.engine.reserve(AccountRef(org), [item("r", 5_000, ttl_ms=DAY_MS)])
    await s.engine.release(org, "r")
    await s.flusher.drain()
    await _purge(s, org)
    before = await s.engine.balance(org)
    # The same commit again: a replay of what the ledger recorded; nothing billed.
    (again,) = await s.engine.commit(org, [CommitItem("c", 25_000, Usage(10, 20, 1))])
    assert again.error is None and again.replayed
    assert (again.committed_uecu, again.released_uecu) == (25_000, 5_000)
    # Other parameters: a conflict; a released hold stays released; an unknown id unknown.
    (other,) = await s.engine.commit(org, [CommitItem("c", 26_000)])
    assert isinstance(other.error, errors.IdempotencyConflict)
    (rel,) = await s.engine.commit(org, [CommitItem("r", 1)])
    assert isinstance(rel.error, errors.HoldReleased)
    (nope,) = await s.engine.commit(org, [CommitItem("never", 1)])
    assert isinstance(nope.error, errors.HoldNotFound)
    assert await s.engine.balance(org) == before
    await s.flusher.drain()
    assert s.ledger.balance(org) == 100_000 - 25_000
    assert done.committed_uecu == 25_000


async def test_a_late_commit_after_purge_bills_once_like_before_purge(stack: Stack) -> None:
    """Once dropped on one account and billed in full on another; now one rule: a late
    commit of the hold the ledger recorded, bounded, billed once in Redis and the ledger."""
    s, org = stack, "late-purged"
    pct = s.settings.overage_max_percent
    await s.engine.grant(org, "g", 100_000, GrantKind.TOP_UP)
    await s.engine.reserve(AccountRef(org, "t1"), [item("e", 10_000, ttl_ms=MIN)])
    s.store.clock_offset_ms += MIN + 1
    assert (await s.engine.balance(org)).expired_uecu == 10_000
    await s.flusher.drain()
    await _purge(s, org)
    (c,) = await s.engine.commit(org, [CommitItem("e", 50_000)])
    assert c.error is None and c.late
    assert c.committed_uecu == 10_000 + 10_000 * pct // 100
    (again,) = await s.engine.commit(org, [CommitItem("e", 50_000)])
    assert again.replayed and again.committed_uecu == c.committed_uecu
    b = await s.engine.balance(org)
    assert b.late_committed_uecu == c.committed_uecu
    assert b.conservation_faults() == []
    await s.flusher.drain()
    assert s.ledger.balance(org) == b.balance_uecu
    (ev,) = [e for e in await outbox(s.direct, s.store, org) if e["type"] == "commit"] or [None]
    assert ev is None, "drained: the commit event went to the ledger"
    assert s.ledger.conservation(org).ok
    # The commit's event id is the one the hold always had: commit:<rid>:<t0 of its reserve>.
    rec = s.ledger.reservation(org, "e")
    assert rec is not None and rec.state == "committed"
    assert rec.hold.team == "t1"


async def test_a_commit_of_a_hold_the_ledger_never_saw_is_not_found(stack: Stack) -> None:
    s, org = stack, "never-saw"
    await s.engine.grant(org, "g", 1_000, GrantKind.TOP_UP)
    await s.flusher.drain()
    before = await s.engine.balance(org)
    (c,) = await s.engine.commit(org, [CommitItem("ghost", 500)])
    assert isinstance(c.error, errors.HoldNotFound)
    assert await s.engine.balance(org) == before
    assert s.ledger.reservation(org, "ghost") is None


async def test_get_balance_reports_late_unbilled_over_the_wire(sidecar: SidecarServer) -> None:
    """What late commits could not bill reaches a worker's GetBalance (and the CLI's)."""
    org = "wire-late"
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN) as c:
        await c.grant(org, 1_000, grant_id="g")
        await c.reserve(org, 1_000, job_type="gepa", reservation_id="a", ttl_ms=MIN)
        sidecar.store.clock_offset_ms += MIN + 1
        await c.reserve(org, 1_000, job_type="gepa", reservation_id="b", ttl_ms=DAY_MS)
        late = await c.commit(org, "a", 1_000)  # nothing available: only its bound bills
        bound = 1_000 * sidecar.settings.overage_max_percent // 100
        assert late.late and late.committed_uecu == bound
        b = await c.balance(org)
    assert b.late_unbilled_uecu == 1_000 - bound
    assert b.late_committed_uecu == bound
    assert b == await sidecar.engine.balance(org)
    assert b.conservation_faults() == []
