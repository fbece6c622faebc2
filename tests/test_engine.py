"""The reservation engine on real Redis and on the embedded store (same scripts, same tests)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from ecu_sidecar import errors
from ecu_sidecar.engine import SWEEP_IDLE_INTERVALS, QuotaEngine
from ecu_sidecar.model import (
    AccountRef,
    CommitItem,
    CommitOutcome,
    GrantKind,
    HoldState,
    HoldView,
    JobType,
    ReserveItem,
    Usage,
)
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from tests.conftest import ManualClock, funded, make_settings, snapshot


def item(rid: str, amount: int, ttl_ms: int = 0, job: JobType = JobType.GEPA) -> ReserveItem:
    return ReserveItem(rid, amount, job, "", ttl_ms)


async def outbox(direct: Any, store: RedisStore, org: str) -> list[dict[str, str]]:
    entries = await direct.xrange(store.outbox_key(org))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


# -- concurrency -------------------------------------------------------------------------------


@pytest.fixture
def settings(backend: str) -> Any:
    """This module's settings: correctness under contention, not latency, is what these tests
    check, so a loaded machine's queueing must not read as an outage."""

    return make_settings(backend, redis_timeout_ms=15_000)


async def test_200_concurrent_reservers_never_overspend(engine: QuotaEngine) -> None:
    budget = 5_000_000
    org = await funded(engine, budget)
    rng = random.Random(7)
    granted: dict[str, int] = {}

    async def reserver(worker: int) -> None:
        for step in range(6):
            amount = rng.randint(1, 60_000)
            rid = f"w{worker}-s{step}"
            try:
                out = await engine.reserve(AccountRef(org), [item(rid, amount, 60_000)])
            except errors.InsufficientEcu as exc:
                left = int(exc.metadata["available"])
                if left <= 0:
                    return
                # Demand exceeds supply: take exactly what is left, if nobody beats us to it.
                try:
                    out = await engine.reserve(AccountRef(org), [item(rid + "-rest", left, 60_000)])
                except errors.InsufficientEcu:
                    continue
                granted[rid + "-rest"] = out.holds[0].amount_uecu
                continue
            granted[rid] = out.holds[0].amount_uecu

    await asyncio.gather(*(reserver(w) for w in range(200)))
    b = await engine.balance(org)
    assert sum(granted.values()) <= budget
    assert sum(granted.values()) == b.held_uecu
    assert b.available_uecu == 0, "demand exceeded supply, so the account must end at exactly 0"
    assert b.outstanding_holds == len(granted)
    assert b.conservation_faults() == []

    # Settle concurrently: a third committed below the hold, a third released, a third left open.
    rids = sorted(granted)

    async def settle(i: int, rid: str) -> None:
        if i % 3 == 0:
            await engine.commit(org, [CommitItem(rid, granted[rid] // 2)])
        elif i % 3 == 1:
            await engine.release(org, rid)

    await asyncio.gather(*(settle(i, rid) for i, rid in enumerate(rids)))
    b = await engine.balance(org)
    committed = sum(granted[r] // 2 for i, r in enumerate(rids) if i % 3 == 0)
    open_ = sum(granted[r] for i, r in enumerate(rids) if i % 3 == 2)
    assert b.committed_uecu == committed
    assert b.held_uecu == open_
    assert b.available_uecu == budget - committed - open_
    assert b.conservation_faults() == []


async def test_concurrent_replays_of_one_id_charge_once(engine: QuotaEngine) -> None:
    org = await funded(engine, 1_000)
    outs = await asyncio.gather(
        *(engine.reserve(AccountRef(org), [item("same", 300)]) for _ in range(50))
    )
    assert sum(not o.replayed for o in outs) == 1
    assert {o.available_uecu for o in outs} == {700}
    commits = await asyncio.gather(
        *(engine.commit(org, [CommitItem("same", 100)]) for _ in range(50))
    )
    assert sum(not c[0].replayed for c in commits) == 1
    b = await engine.balance(org)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (100, 0, 900)


# -- idempotency ----------------------------------------------------------------------------


async def test_every_mutation_replays_its_first_outcome(
    engine: QuotaEngine,
    store: RedisStore,
    settings: Settings,
) -> None:
    org = await funded(engine, 10_000)
    acct = AccountRef(org, "t", "p", "u")

    first = await engine.reserve(acct, [item("r1", 1_000)])
    ext = await engine.extend(org, "r1", 600_000, 1)
    batch = await engine.reserve(acct, [item("b1", 100), item("b2", 200)], batch=True)
    com = await engine.commit(org, [CommitItem("r1", 700, Usage(5, 6, 1))])
    combatch = await engine.commit(org, [CommitItem("b1", 100), CommitItem("b2", 50)], batch=True)
    await engine.reserve(acct, [item("r2", 400)])
    rel = await engine.release(org, "r2")
    gr = await engine.grant(org, "g2", 5_000, GrantKind.TOP_UP)
    cap = await engine.set_cap(org, "team", "t", 50_000)

    before = await snapshot(settings)
    again = [
        await engine.reserve(acct, [item("r1", 1_000)]),
        await engine.reserve(acct, [item("b1", 100), item("b2", 200)], batch=True),
    ]
    assert [h.reservation_id for h in again[0].holds] == ["r1"]
    assert again[0].available_uecu == first.available_uecu and again[0].replayed
    assert again[1].available_uecu == batch.available_uecu and again[1].replayed
    assert await engine.commit(org, [CommitItem("r1", 700, Usage(5, 6, 1))]) == [
        type(com[0])(**{**_fields(com[0]), "replayed": True})
    ]
    rebatch = await engine.commit(org, [CommitItem("b1", 100), CommitItem("b2", 50)], batch=True)
    assert [(c.committed_uecu, c.released_uecu, c.replayed) for c in rebatch] == [
        (c.committed_uecu, c.released_uecu, True) for c in combatch
    ]
    assert (await engine.release(org, "r2")).released_uecu == rel.released_uecu
    assert (await engine.grant(org, "g2", 5_000, GrantKind.TOP_UP)).balance_uecu == gr.balance_uecu
    assert await engine.set_cap(org, "team", "t", 50_000) == cap
    assert await snapshot(settings) == before, "replays must change nothing"

    # Extend is replayed by its sequence number (the hold is committed now, so use a new one).
    await engine.reserve(acct, [item("r3", 10)])
    e1 = await engine.extend(org, "r3", 200_000, 1)
    mid = await snapshot(settings)
    e1b = await engine.extend(org, "r3", 200_000, 1)
    assert (e1b.deadline_unix_ms, e1b.replayed) == (e1.deadline_unix_ms, True)
    assert ext.deadline_unix_ms > first.holds[0].deadline_unix_ms
    assert await snapshot(settings) == mid


def _fields(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in obj.__slots__}  # type: ignore[attr-defined]


async def test_same_id_different_parameters_is_a_conflict(
    engine: QuotaEngine,
    store: RedisStore,
    settings: Settings,
) -> None:
    org = await funded(engine, 10_000)
    acct = AccountRef(org, "t")
    await engine.reserve(acct, [item("r1", 1_000)])
    await engine.reserve(acct, [item("r2", 1_000)])
    await engine.commit(org, [CommitItem("r2", 10)])
    await engine.reserve(acct, [item("r3", 1_000)])
    await engine.extend(org, "r3", 100_000, 2)
    before = await snapshot(settings)

    conflicts = [
        engine.reserve(acct, [item("r1", 1_001)]),
        engine.reserve(AccountRef(org, "other-team"), [item("r1", 1_000)]),
        engine.reserve(acct, [item("r1", 1_000, job=JobType.ENGINE)]),
        engine.reserve(acct, [item("new", 5), item("r1", 999)], batch=True),
    ]
    for call in conflicts:
        with pytest.raises(errors.IdempotencyConflict):
            await call
    (c,) = await engine.commit(org, [CommitItem("r2", 11)])
    assert isinstance(c.error, errors.IdempotencyConflict)
    assert await snapshot(settings) == before
    await engine.grant(org, "gx", 7, GrantKind.TOP_UP)
    before = await snapshot(settings)
    with pytest.raises(errors.IdempotencyConflict):
        await engine.grant(org, "gx", 8, GrantKind.TOP_UP)
    with pytest.raises(errors.IdempotencyConflict):
        await engine.grant(org, "gx", 7, GrantKind.STARTER)
    with pytest.raises(errors.IdempotencyConflict):
        await engine.extend(org, "r3", 100_001, 2)
    with pytest.raises(errors.StaleSequence):
        await engine.extend(org, "r3", 100_000, 1)
    assert await snapshot(settings) == before


# -- hierarchy ------------------------------------------------------------------------------


@pytest.mark.parametrize("capped", ["team", "project"])
async def test_cap_rejects_without_touching_wallet_or_other_cap(
    engine: QuotaEngine,
    store: RedisStore,
    capped: str,
    settings: Settings,
) -> None:
    org = await funded(engine, 1_000_000)
    await engine.set_cap(org, "team", "t1", 500_000 if capped == "project" else 300)
    await engine.set_cap(org, "project", "p1", 500_000 if capped == "team" else 300)
    acct = AccountRef(org, "t1", "p1")
    await engine.reserve(acct, [item("ok", 200)])
    before = await snapshot(settings)
    with pytest.raises(errors.InsufficientEcu) as ei:
        await engine.reserve(acct, [item("too-much", 101)])
    assert ei.value.metadata == {
        "scope": capped,
        "scope_id": "t1" if capped == "team" else "p1",
        "requested": "101",
        "available": "100",
    }
    assert await snapshot(settings) == before
    b = await engine.balance(org)
    assert b.available_uecu == 1_000_000 - 200
    assert [(s.id, s.held_uecu) for s in b.teams + b.projects] == [("t1", 200), ("p1", 200)]
    # Exactly the remainder fits; the wallet and both scopes move together.
    await engine.reserve(acct, [item("fits", 100)])
    b = await engine.balance(org)
    assert [(s.held_uecu, s.available_uecu) for s in (b.teams + b.projects)] == [
        (300, 500_000 - 300 if capped == "project" else 0),
        (300, 0 if capped == "project" else 500_000 - 300),
    ]


async def test_wallet_rejects_without_touching_caps(
    engine: QuotaEngine, store: RedisStore, settings: Settings
) -> None:
    org = await funded(engine, 1_000)
    await engine.set_cap(org, "team", "t1", 10_000)
    before = await snapshot(settings)
    with pytest.raises(errors.InsufficientEcu) as ei:
        await engine.reserve(AccountRef(org, "t1"), [item("r", 1_001)])
    assert ei.value.metadata["scope"] == "organization"
    assert await snapshot(settings) == before


async def test_cap_usage_follows_commit_and_release(engine: QuotaEngine) -> None:
    org = await funded(engine, 10_000)
    await engine.set_cap(org, "team", "t", 1_000)
    acct = AccountRef(org, "t")
    await engine.reserve(acct, [item("a", 600)])
    await engine.commit(org, [CommitItem("a", 250)])
    await engine.reserve(acct, [item("b", 700)])
    await engine.release(org, "b")
    (team,) = (await engine.balance(org)).teams
    assert (team.cap_uecu, team.held_uecu, team.used_uecu, team.available_uecu) == (
        1_000,
        0,
        250,
        750,
    )
    cleared = await engine.set_cap(org, "team", "t", None)
    assert cleared.cap_uecu is None
    await engine.reserve(acct, [item("c", 5_000)])  # uncapped now


async def test_batch_is_all_or_nothing(
    engine: QuotaEngine, store: RedisStore, settings: Settings
) -> None:
    org = await funded(engine, 1_000)
    before = await snapshot(settings)
    with pytest.raises(errors.InsufficientEcu):
        await engine.reserve(AccountRef(org), [item(f"i{i}", 100) for i in range(11)], batch=True)
    assert await snapshot(settings) == before
    out = await engine.reserve(AccountRef(org), [item(f"i{i}", 100) for i in range(10)], batch=True)
    assert out.available_uecu == 0 and len(out.holds) == 10


async def test_trace_eval_of_1500_steps_is_one_batch(engine: QuotaEngine) -> None:
    org = await funded(engine, 10_000_000)
    items = [
        ReserveItem(f"trace{t}-judge{j}", 1_000, JobType.TRACE_EVAL, "judge-m", 0)
        for t in range(500)
        for j in range(3)
    ]
    out = await engine.reserve(AccountRef(org, user="u"), items, batch=True)
    assert len(out.holds) == 1_500 and out.available_uecu == 10_000_000 - 1_500_000
    done = await engine.commit(org, [CommitItem(i.reservation_id, 400) for i in items], batch=True)
    assert all(d.error is None for d in done)
    b = await engine.balance(org)
    assert (b.committed_uecu, b.held_uecu, b.released_uecu) == (600_000, 0, 900_000)


# -- commit semantics -------------------------------------------------------------------------


async def test_commit_below_at_and_above_the_hold(engine: QuotaEngine) -> None:
    org = await funded(engine, 100_000)
    pct = engine.settings.overage_max_percent
    for rid in ("below", "above", "beyond"):
        await engine.reserve(AccountRef(org), [item(rid, 1_000)])
    (below,) = await engine.commit(org, [CommitItem("below", 400)])
    assert (below.committed_uecu, below.released_uecu, below.overage_uecu) == (400, 600, 0)
    (above,) = await engine.commit(org, [CommitItem("above", 1_000 + 1_000 * pct // 100)])
    assert (above.committed_uecu, above.overage_uecu, above.unbilled_overage_uecu) == (
        1_000 + 1_000 * pct // 100,
        1_000 * pct // 100,
        0,
    )
    (beyond,) = await engine.commit(org, [CommitItem("beyond", 5_000)])
    bound = 1_000 + 1_000 * pct // 100
    assert (beyond.committed_uecu, beyond.unbilled_overage_uecu) == (bound, 5_000 - bound)
    b = await engine.balance(org)
    assert b.unbilled_overage_uecu == 5_000 - bound
    assert b.committed_uecu == 400 + 2 * bound
    assert b.conservation_faults() == []


async def test_commit_after_release_and_release_after_commit(engine: QuotaEngine) -> None:
    org = await funded(engine, 10_000)
    await engine.reserve(AccountRef(org), [item("a", 10), item("b", 10)], batch=True)
    await engine.release(org, "a")
    (c,) = await engine.commit(org, [CommitItem("a", 5)])
    assert isinstance(c.error, errors.HoldReleased)
    await engine.commit(org, [CommitItem("b", 5)])
    with pytest.raises(errors.HoldCommitted):
        await engine.release(org, "b")
    with pytest.raises(errors.HoldCommitted):
        await engine.extend(org, "b", 0, 1)
    with pytest.raises(errors.HoldReleased):
        await engine.extend(org, "a", 0, 1)
    with pytest.raises(errors.HoldNotFound):
        await engine.release(org, "never")
    (nf,) = await engine.commit(org, [CommitItem("never", 1)])
    assert isinstance(nf.error, errors.HoldNotFound)


async def test_unknown_organization_is_not_found(engine: QuotaEngine) -> None:
    with pytest.raises(errors.AccountNotFound):
        await engine.reserve(AccountRef("nobody-" + uuid.uuid4().hex[:6]), [item("r", 1)])
    with pytest.raises(errors.AccountNotFound):
        await engine.balance("nobody-" + uuid.uuid4().hex[:6])


async def test_zero_available_blocks_new_work_but_holds_still_commit(engine: QuotaEngine) -> None:
    org = await funded(engine, 1_000)
    await engine.reserve(AccountRef(org), [item("all", 1_000)])
    with pytest.raises(errors.InsufficientEcu):
        await engine.reserve(AccountRef(org), [item("more", 1)])
    ext = await engine.extend(org, "all", 600_000, 1)
    assert ext.deadline_unix_ms > 0
    (c,) = await engine.commit(org, [CommitItem("all", 1_100)])
    assert c.error is None and c.overage_uecu == 100 and c.available_uecu == -100
    with pytest.raises(errors.InsufficientEcu):
        await engine.reserve(AccountRef(org), [item("more", 1)])


# -- expiry ------------------------------------------------------------------------------------


async def test_expired_holds_are_swept_and_counted(
    engine: QuotaEngine, store: RedisStore, direct: Any
) -> None:
    org = await funded(engine, 10_000)
    await engine.reserve(
        AccountRef(org, "t"), [item(f"h{i}", 100, ttl_ms=1_000) for i in range(5)], batch=True
    )
    await engine.reserve(AccountRef(org), [item("long", 100, ttl_ms=60_000)])
    first = await store.sweep(org)
    assert (first.expired, first.waiting) == (0, 0)
    assert first.next_due_ms is not None and 0 < first.next_due_ms <= 1_000
    store.clock_offset_ms = 1_001  # step the script clock past the short deadlines
    second = await store.sweep(org)
    assert (second.expired, second.waiting) == (5, 0)
    assert second.next_due_ms is not None and 55_000 < second.next_due_ms <= 59_000  # "long"
    b = await engine.balance(org)
    assert (b.expired_uecu, b.expired_holds, b.held_uecu, b.outstanding_holds) == (500, 5, 100, 1)
    assert b.teams[0].held_uecu == 0
    assert b.conservation_faults() == []
    kinds = [e["type"] for e in await outbox(direct, store, org)]
    assert kinds.count("expire") == 5


def _swept_engine(
    store: RedisStore, settings: Settings
) -> tuple[QuotaEngine, ManualClock, Callable[[int], None], list[str]]:
    """An engine on a stepped clock (``step(ms)`` moves it and the scripts' clock together),
    and the organizations its background sweeper swept, in order."""
    clock = ManualClock()
    engine = QuotaEngine(store, settings, clock=clock)

    def step(ms: int) -> None:
        clock.now += ms / 1000
        store.clock_offset_ms += ms

    swept: list[str] = []
    real_sweep = store.sweep

    async def counting_sweep(org: str) -> Any:
        swept.append(org)
        return await real_sweep(org)

    store.sweep = counting_sweep  # type: ignore[method-assign]
    return engine, clock, step, swept


async def test_background_sweeper_visits_an_organization_when_it_has_work(
    store: RedisStore, settings: Settings
) -> None:
    """sweep_recent sweeps an organization when its next deadline comes, not every interval:
    an idle one costs nothing until a hold falls due (or the idle bound passes). Time is
    stepped, never slept: the engine's clock and the scripts' clock move together."""
    engine, clock, step, swept = _swept_engine(store, settings)
    org = await funded(engine, 10_000)
    await engine.reserve(AccountRef(org), [item("short", 100, ttl_ms=1_000)])
    assert await engine.sweep_recent() == 0
    assert swept == []  # nothing is due for a second
    step(999)
    assert await engine.sweep_recent() == 0
    assert swept == []  # still not due
    step(101)
    assert await engine.sweep_recent() == 1  # the hold's deadline came: swept
    assert swept == [org]
    assert await engine.sweep_recent() == 0
    assert swept == [org]  # no holds left: left alone (up to the idle bound)
    await engine.reserve(AccountRef(org), [item("again", 100, ttl_ms=1_000)])
    step(1_100)
    assert await engine.sweep_recent() == 1  # a new hold brought the next visit forward
    assert swept == [org, org]
    # The idle bound: past SWEEP_IDLE_INTERVALS intervals an untouched organization is swept
    # again (holds other sidecar processes made are found that way).
    idle_ms = SWEEP_IDLE_INTERVALS * settings.sweep_interval_ms
    step(idle_ms - 10)
    assert await engine.sweep_recent() == 0
    assert swept == [org, org]  # not yet
    step(20)
    assert await engine.sweep_recent() == 0
    assert swept == [org, org, org]
    assert engine.sweeps.due_at(org) - clock() == pytest.approx(idle_ms / 1000)


async def test_background_sweeper_ends_an_idle_abandoned_job_when_it_falls_due(
    store: RedisStore, settings: Settings, direct: Any
) -> None:
    """An open job nobody touches is ended by the background sweeper at its abandonment
    deadline: each sweep answers when the job deadline index next falls due, including a job
    a step kept alive after its index entry was made (the entry then moves to the real
    deadline). Time is stepped, never slept; the job is looked at in the outbox, since any call
    touching it would end it itself."""
    from ecu_sidecar.jobs import JobApproval

    engine, clock, step, swept = _swept_engine(store, settings)

    async def closed() -> list[str]:
        return [e["state"] for e in await outbox(direct, store, org) if e["type"] == "job_close"]

    idle_s = SWEEP_IDLE_INTERVALS * settings.sweep_interval_ms / 1000
    assert idle_s < 60  # the idle bound alone would come after the job's deadline
    org = await funded(engine, 10_000)
    await engine.approve_job(
        AccountRef(org), JobApproval("run", 5_000, JobType.GEPA, ttl_ms=60_000)
    )
    step(20_000)
    await engine.reserve(AccountRef(org), [item("s1", 100, ttl_ms=3_600_000)], job_id="run")
    (c,) = await engine.commit(org, [CommitItem("s1", 70)])
    assert c.error is None and c.committed_uecu == 70  # the job now lives until 80 s
    step(40_000)  # 60 s: the approval's deadline, which the step moved
    assert await engine.sweep_recent() == 0
    assert swept == [org] and await closed() == []
    # Due at the job's real deadline (less the few ms Redis's own clock moved meanwhile), not
    # at the idle bound.
    assert 19 < engine.sweeps.due_at(org) - clock() <= 20
    step(10_000)
    assert await engine.sweep_recent() == 0
    assert swept == [org] and await closed() == []
    step(11_000)  # 81 s: abandoned, with nobody calling
    assert await engine.sweep_recent() == 0
    assert swept == [org, org] and await closed() == ["X"]
    b = await engine.balance(org)
    assert (b.held_uecu, b.available_uecu, b.committed_uecu) == (0, 10_000 - 70, 70)
    assert b.conservation_faults() == []


async def test_sweep_is_bounded_per_call(backend: str) -> None:
    from tests.conftest import drop_keys

    settings = make_settings(backend, sweep_limit=3)
    store = RedisStore.from_settings(settings)
    engine = QuotaEngine(store, settings)
    try:
        org = await funded(engine, 10_000)
        await engine.reserve(
            AccountRef(org), [item(f"h{i}", 1, ttl_ms=1_000) for i in range(7)], batch=True
        )
        store.clock_offset_ms = 2_000
        outs = [await store.sweep(org) for _ in range(3)]
        assert [(o.expired, o.waiting) for o in outs] == [(3, 4), (3, 1), (1, 0)]
        assert outs[-1].next_due_ms is None  # nothing left to fall due
    finally:
        await drop_keys(settings)
        await store.close()


async def test_expired_hold_cannot_extend_but_still_commits_late(
    engine: QuotaEngine, store: RedisStore
) -> None:
    org = await funded(engine, 1_000)
    await engine.reserve(
        AccountRef(org), [item("a", 400, ttl_ms=1_000), item("b", 400, ttl_ms=1_000)], batch=True
    )
    store.clock_offset_ms = 5_000  # no sweep has run: the first touch expires them
    with pytest.raises(errors.HoldExpired):
        await engine.extend(org, "a", 0, 1)
    rel = await engine.release(org, "b")
    assert (rel.state, rel.released_uecu) == (HoldState.EXPIRED, 0)
    (late,) = await engine.commit(org, [CommitItem("a", 300)])
    assert late.late and late.committed_uecu == 300 and late.error is None
    b = await engine.balance(org)
    assert (b.expired_uecu, b.late_committed_uecu, b.available_uecu) == (800, 300, 700)
    assert b.conservation_faults() == []


async def test_extend_moves_the_deadline_forward_only(
    engine: QuotaEngine, store: RedisStore
) -> None:
    org = await funded(engine, 1_000)
    out = await engine.reserve(AccountRef(org), [item("a", 1, ttl_ms=10_000)])
    short = await engine.extend(org, "a", 1_000, 1)
    assert short.deadline_unix_ms == out.holds[0].deadline_unix_ms
    long = await engine.extend(org, "a", 50_000, 2)
    assert long.deadline_unix_ms > out.holds[0].deadline_unix_ms
    store.clock_offset_ms = 20_000  # past the original deadline, before the extended one
    first = await store.sweep(org)
    assert (first.expired, first.waiting) == (0, 0)
    # Due where the extension put it: 50 s after the extend, 20 s of which the clock skipped.
    assert first.next_due_ms is not None and 25_000 < first.next_due_ms <= 30_000
    store.clock_offset_ms = 60_000
    assert (await store.sweep(org)).expired == 1


async def test_tombstones_answer_replays_then_are_purged(backend: str) -> None:
    from tests.conftest import drop_keys

    settings = make_settings(backend, tombstone_ttl_ms=10_000)
    store = RedisStore.from_settings(settings)
    engine = QuotaEngine(store, settings)
    try:
        org = await funded(engine, 1_000)
        await engine.reserve(AccountRef(org), [item("a", 10)])
        await engine.release(org, "a")
        store.clock_offset_ms = 9_000
        assert (await engine.release(org, "a")).replayed
        store.clock_offset_ms = 11_000
        await store.sweep(org)
        with pytest.raises(errors.HoldNotFound):
            await engine.release(org, "a")
    finally:
        await drop_keys(settings)
        await store.close()


# -- outbox -------------------------------------------------------------------------------------


async def test_every_state_change_appends_one_outbox_event(
    engine: QuotaEngine,
    store: RedisStore,
    direct: Any,
) -> None:
    org = await funded(engine, 10_000)
    acct = AccountRef(org, "t", "p", "u")
    await engine.reserve(acct, [ReserveItem("a", 500, JobType.INFERENCE, "gpt-4o", 0)])
    await engine.reserve(acct, [ReserveItem("a", 500, JobType.INFERENCE, "gpt-4o", 0)])  # replay
    await engine.extend(org, "a", 100_000, 1)
    await engine.commit(org, [CommitItem("a", 120, Usage(1_000, 200, 1))])
    await engine.reserve(acct, [item("b", 50, ttl_ms=1_000)])
    await engine.release(org, "b")
    await engine.set_cap(org, "team", "t", 9_000)
    events = await outbox(direct, store, org)
    assert [e["type"] for e in events] == [
        "grant",
        "reserve",
        "extend",
        "commit",
        "reserve",
        "release",
        "cap",
    ]
    assert len({e["eid"] for e in events}) == len(events)
    commit = events[3]
    assert {
        k: commit[k]
        for k in (
            "rid",
            "amount",
            "actual",
            "committed",
            "released",
            "team",
            "project",
            "user",
            "job",
            "model",
            "tokens_in",
            "tokens_out",
            "calls",
        )
    } == {
        "rid": "a",
        "amount": "500",
        "actual": "120",
        "committed": "120",
        "released": "380",
        "team": "t",
        "project": "p",
        "user": "u",
        "job": "inference",
        "model": "gpt-4o",
        "tokens_in": "1000",
        "tokens_out": "200",
        "calls": "1",
    }
    assert all(e["org"] == org for e in events)


# -- TTLs ---------------------------------------------------------------------------------------


async def redis_now_ms(store: RedisStore) -> int:
    return await store.now_ms() - store.clock_offset_ms


async def test_a_ttl_of_zero_holds_for_the_default_ttl(
    engine: QuotaEngine, store: RedisStore
) -> None:
    org = await funded(engine, 10_000)
    default = engine.settings.default_ttl_ms
    before = await redis_now_ms(store)
    out = await engine.reserve(AccountRef(org), [item("a", 100), item("b", 100, ttl_ms=5_000)])
    after = await redis_now_ms(store)
    a, b = out.holds
    assert before + default <= a.deadline_unix_ms <= after + default
    assert before + 5_000 <= b.deadline_unix_ms <= after + 5_000
    # The TTL recorded is the resolved one: naming the default explicitly replays the hold.
    again = await engine.reserve(AccountRef(org), [item("a", 100, ttl_ms=default)])
    assert again.replayed and again.holds[0].deadline_unix_ms == a.deadline_unix_ms
    with pytest.raises(errors.IdempotencyConflict):
        await engine.reserve(AccountRef(org), [item("b", 100)])  # 5 s was asked, not the default


def test_the_per_step_value_types_compare_and_hash_by_value() -> None:
    """Values: equal by their fields, hashable (a caller of the worker client may key a dict on
    a HoldView or a CommitOutcome), and unchangeable once made."""
    made = [
        lambda: ReserveItem("r", 5, JobType.JUDGE, "m"),
        lambda: Usage(1, 2, 3),
        lambda: CommitItem("r", 5, Usage(1, 2, 3)),
        lambda: HoldView("r", 5, 7, HoldState.ACTIVE, "v1"),
        lambda: CommitOutcome("r", committed_uecu=5, available_uecu=9),
    ]
    for make in made:
        a, b = make(), make()
        assert a == b and hash(a) == hash(b)
        assert {a: 1}[b] == 1
    assert hash(Usage(1, 2, 3)) != hash(Usage(1, 2, 4))
    with pytest.raises(FrozenInstanceError):
        Usage(1, 2, 3).calls = 4  # type: ignore[misc]
