"""The batch paths of the commit and reserve scripts answer and leave exactly what the same
items sent one call at a time answer and leave.

commit.lua reads and writes a batch's hold records in bulk and derives each item's
available-after from running totals. These tests run one mixed batch on one
organization and the same items one by one on a twin organization set up identically, then
compare every per-item outcome, the account hash, the hold records, the indexes and the outbox.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from ecu_sidecar import errors
from ecu_sidecar.model import (
    AccountRef,
    CommitItem,
    CommitOutcome,
    GrantKind,
    JobType,
    KnownHold,
    ReserveItem,
    Usage,
)
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import org_keys
from tests.conftest import assert_conserved

PCT = 20
"""Overage bound of these tests, in percent of the hold."""
LONG_MS = 3_600_000
SHORT_MS = 1_000
DAY_MS = 86_400_000

#: (reservation id, amount, ttl, team/project) of every hold the commit batch touches.
HOLDS = [
    ("plain", 1_000, LONG_MS, True),
    ("over", 1_000, LONG_MS, False),
    ("unbilled", 1_000, LONG_MS, True),
    ("late1", 800, SHORT_MS, True),
    ("late2", 800, SHORT_MS, False),
    ("late3", 800, SHORT_MS, False),
    ("before", 700, LONG_MS, False),
    ("released", 400, LONG_MS, False),
    ("zero", 500, LONG_MS, True),
    ("exact", 1_000, LONG_MS, False),
]

#: Holds granted locally in degraded mode, known to the caller only (KnownHold): amounts.
DEGRADED = {"ghost": 200, "nobody": 100}
#: The batch: (reservation id, actual, rate card version). Committed with DEGRADED known.
BATCH = [
    ("plain", 600, ""),  # below the hold: 400 released
    ("over", 1_100, ""),  # within the bound: 100 overage
    ("unbilled", 5_000, ""),  # past the bound: 1200 billed, 3800 unbilled
    ("late1", 500, ""),  # expired hold: late
    ("ghost", 300, ""),  # a degraded hold of 200: 240 billed (its bound), 60 unbilled
    ("before", 700, ""),  # committed before the batch: a replay
    ("plain", 600, ""),  # the first item again: a replay inside the batch
    ("over", 999, ""),  # other actual: IDEMPOTENCY_CONFLICT
    ("released", 100, ""),  # HOLD_RELEASED
    ("late2", 900, "v1"),  # RATE_CARD_MISMATCH (first touch of an expired hold)
    ("late2", 900, ""),  # the same hold, now committed late (overage not counted when late)
    ("late3", 2_000, ""),  # late past the bound: unbilled
    ("zero", 0, ""),  # nothing used: the whole hold released
    ("ghost", 300, ""),  # the orphan again: a replay
    ("exact", 1_000, ""),
    ("nobody", 50, "v1"),  # a degraded hold priced with a rate card: no version to compare
]


async def setup_org(store: RedisStore, direct: Any, org: str, now: int, *, on_touch: bool) -> None:
    """Grants (two expiring ones the batch burns across), the holds, one commit and one
    release."""
    await store.grant(org, "topup", 1_000_000, GrantKind.TOP_UP, 0)
    await store.grant(org, "soon", 1_500, GrantKind.STARTER, now + DAY_MS)
    await store.grant(org, "later", 10_000, GrantKind.STARTER, now + 2 * DAY_MS)
    for rid, amount, ttl, scoped in HOLDS:
        account = AccountRef(org, "t1", "p1", "u1") if scoped else AccountRef(org, user="u1")
        await store.reserve(account, [ReserveItem(rid, amount, JobType.ENGINE, "m", ttl)])
    await store.commit(org, [CommitItem("before", 700, Usage(10, 20, 1))], PCT)
    await store.release(org, "released")
    if on_touch:
        # Out of the deadline index, no sweep expires them: each expires on its first touch,
        # inside the commit script (the path that writes counters in the middle of a batch).
        deadlines = org_keys(store.key_prefix, org)[2]
        await direct.zrem(deadlines, "late1", "late2", "late3")


def known() -> dict[str, KnownHold]:
    return {rid: KnownHold(amt, 1_000 + amt, "degraded") for rid, amt in DEGRADED.items()}


def commit_items() -> list[CommitItem]:
    return [CommitItem(rid, actual, Usage(10, 20, 1), rcv) for rid, actual, rcv in BATCH]


def outcome_view(o: CommitOutcome) -> tuple[Any, ...]:
    """Everything an item answers; for a failed item its error (the batch-wide available
    after is the same for every failed item, so it is not the item's own)."""
    if o.error is not None:
        return (o.reservation_id, type(o.error).__name__)
    return (
        o.reservation_id,
        o.committed_uecu,
        o.released_uecu,
        o.overage_uecu,
        o.unbilled_overage_uecu,
        o.late,
        o.replayed,
        o.available_uecu,
    )


async def state(client: Any, store: RedisStore, org: str) -> dict[str, Any]:
    """The organization's keys (read with the test's own ``client``), with what depends on the
    wall clock or the org id masked."""
    acct, holds, deadlines, tombs, outbox, _grants, gexp, *_jobs = org_keys(store.key_prefix, org)

    def text(raw: dict[bytes, bytes]) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in raw.items()}

    records = {}
    for rid, raw in text(await client.hgetall(holds)).items():
        rec = json.loads(raw)
        for clocked in ("t0", "fin", "dl"):
            rec.pop(clocked, None)
        records[rid] = rec
    events = []
    for _, fields in await client.xrange(outbox):
        ev = text(fields)
        for clocked in ("ts", "org", "deadline"):
            ev.pop(clocked, None)
        if ev["type"] in ("reserve", "commit", "release", "expire"):
            ev["eid"] = ev["eid"].rsplit(":", 1)[0]  # the hold's creation time
        events.append(ev)
    return {
        "acct": text(await client.hgetall(acct)),
        "holds": records,
        "deadlines": sorted(m.decode() for m in await client.zrange(deadlines, 0, -1)),
        "tombs": sorted(m.decode() for m in await client.zrange(tombs, 0, -1)),
        "gexp": [m.decode() for m in await client.zrange(gexp, 0, -1)],
        "events": events,
    }


@pytest.mark.parametrize("on_touch", [False, True], ids=["swept", "expired-on-touch"])
async def test_commit_batch_equals_one_by_one(
    store: RedisStore, on_touch: bool, direct: Any
) -> None:
    batch_org, single_org = "batch-org", "single-org"
    now = int(time.time() * 1000)
    for org in (batch_org, single_org):
        await setup_org(store, direct, org, now, on_touch=on_touch)
    store.clock_offset_ms = 5_000  # past the short holds' deadlines
    before = (await store.balance(batch_org)).available_uecu
    assert (await store.balance(single_org)).available_uecu == before

    batch = await store.commit(batch_org, commit_items(), PCT, known=known())
    singles = [
        (await store.commit(single_org, [it], PCT, known=known())).outcomes[0]
        for it in commit_items()
    ]

    assert [outcome_view(o) for o in batch.outcomes] == [outcome_view(o) for o in singles]
    assert batch.available_uecu == (await store.balance(single_org)).available_uecu
    assert await state(direct, store, batch_org) == await state(direct, store, single_org)

    # And what they both answered is right, item by item (a model of available-after).
    amounts = {rid: amount for rid, amount, _, _ in HOLDS}
    available, first, expired = before, {}, set()
    expected_errors = {
        7: errors.IdempotencyConflict,
        8: errors.HoldReleased,
        9: errors.RateCardMismatch,
    }
    for i, ((rid, actual, _), o) in enumerate(zip(BATCH, batch.outcomes, strict=True)):
        if rid.startswith("late") and on_touch and rid not in expired:
            expired.add(rid)
            available += amounts[rid]  # the hold expires on first touch: its amount returns
        if i in expected_errors:
            assert isinstance(o.error, expected_errors[i]), (i, o)
            continue
        assert o.error is None, (i, o)
        if rid in first:
            assert o.replayed and outcome_view(o)[1:6] == outcome_view(first[rid])[1:6]
            assert o.available_uecu == first[rid].available_uecu
            continue
        first[rid] = o
        if rid == "before":
            assert o.replayed
            continue
        amount = amounts.get(rid) or DEGRADED[rid]
        late = rid.startswith("late") or rid not in amounts
        billed = min(actual, amount + amount * PCT // 100)
        if rid.startswith("late"):  # its money may have been lent again: available + bound
            billed = min(billed, max(0, available) + amount * PCT // 100)
        assert (o.committed_uecu, o.late, o.replayed) == (billed, late, False), (i, o)
        assert o.unbilled_overage_uecu == actual - billed
        assert o.overage_uecu == (0 if late else max(0, billed - amount))
        assert o.released_uecu == (0 if late else amount - min(billed, amount))
        available += (0 if late else amount) - billed
        assert o.available_uecu == available, (i, o)
    assert batch.available_uecu == available

    # The expiring grants burned soonest-first across the items: "soon" (800 left after the
    # commit before the batch) is gone, "later" paid the rest.
    acct = (await state(direct, store, batch_org))["acct"]
    billed_total = sum(o.committed_uecu for o in first.values() if not o.replayed)
    assert "g:soon" not in acct
    assert int(acct["g:later"]) == 10_000 - (billed_total - 800)
    assert (await state(direct, store, batch_org))["gexp"] == ["later"]
    assert_conserved(await store.balance(batch_org))


async def test_commit_batch_of_fresh_account_creates_counters_like_single_commits(
    store: RedisStore,
    direct: Any,
) -> None:
    """Counters an account has never had (overage, released, late_committed, ...) appear after
    a batch exactly as after the same commits one by one, zero-valued ones included."""
    for org in ("fresh-batch", "fresh-single"):
        await store.grant(org, "g", 100_000, GrantKind.TOP_UP, 0)
        await store.reserve(
            AccountRef(org),
            [ReserveItem(f"h{i}", 1_000, JobType.ENGINE, "", LONG_MS) for i in range(3)],
        )
    items = [CommitItem("h0", 1_000), CommitItem("h1", 1_000), CommitItem("h2", 1_000)]
    await store.commit("fresh-batch", items, PCT)
    for it in items:
        await store.commit("fresh-single", [it], PCT)
    batch, single = (
        await state(direct, store, "fresh-batch"),
        await state(direct, store, "fresh-single"),
    )
    assert batch == single
    assert batch["acct"]["overage"] == "0" and batch["acct"]["released"] == "0"


async def test_reserve_batch_equals_one_by_one(store: RedisStore, direct: Any) -> None:
    """A batch reservation leaves the same records, deadlines and events as one reservation per
    item (its holds share one available-after: the batch is all or nothing)."""
    items = [
        ReserveItem(f"r{i}", 100 * (i + 1), JobType.ENGINE, "m", LONG_MS + i) for i in range(5)
    ]
    account = {org: AccountRef(org, "t1", "p1", "u1") for org in ("res-batch", "res-single")}
    for org in account:
        await store.grant(org, "g", 100_000, GrantKind.TOP_UP, 0)
    out = await store.reserve(account["res-batch"], items)
    for it in items:
        await store.reserve(account["res-single"], [it])
    batch, single = (
        await state(direct, store, "res-batch"),
        await state(direct, store, "res-single"),
    )
    for rec in single["holds"].values():
        rec["av0"] = str(out.available_uecu)  # one call: one available-after for every hold
    assert batch == single
    assert out.available_uecu == 100_000 - 1_500
    # Replaying the whole batch changes nothing and answers the original.
    again = await store.reserve(account["res-batch"], items)
    assert again.replayed and again.available_uecu == out.available_uecu
    assert await state(direct, store, "res-batch") == batch
