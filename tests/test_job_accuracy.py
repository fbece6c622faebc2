"""How pessimistic previews are, seen by the platform (issue 16): Preview's expected cost, learned
from the organization's closed jobs of the same job type (kept in Redis, rebuilt from the
ledger), and the flusher's job metrics (jobs opened, ended and open, approved against committed
µECU, the preview accuracy histogram). Real Redis and the embedded store; the ledger on SQLite
and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from ecu_sidecar.client import AsyncQuotaClient
from ecu_sidecar.jobs import ACCURACY_WINDOW, JobAccuracy
from ecu_sidecar.ledger.jobs import ledger_accuracy
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind, JobType
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.store.keys import SUFFIXES
from tests.test_cli import EXAMPLE_JOB, cli, ok
from tests.test_job_ledger import approve, step
from tests.test_job_ledger import stack as stack  # the fixture
from tests.test_jobs import ECU, ORG, PLAN, TRACE, cli_json, used
from tests.test_jobs import client as client  # the fixture
from tests.test_jobs import serve as serve  # the fixture
from tests.test_rebuild import Stack

GEPA = {
    "items": [
        {
            "gepa": {
                "iterations": 3,
                "perIteration": [
                    {"inference": {"model": "gpt-4o-mini", "promptTokens": 500,
                                   "maxOutputTokens": 200}}
                ],
            }
        }
    ]
}  # fmt: skip


# -- Preview's expected cost, through the sidecar --------------------------------------------


async def test_preview_expects_what_closed_jobs_of_its_type_committed(
    client: AsyncQuotaClient,
) -> None:
    shown = await client.preview(ORG, PLAN)
    assert shown.expected is None  # no job closed yet: the worst case is all there is
    approved = committed = 0
    for run_no in range(2):
        async with client.job(ORG, f"eval-{run_no}", shown, job=PLAN) as run:
            for i in range(3 + run_no):
                async with run.hold(job=TRACE) as h:
                    committed += (await h.commit(usage_lines=used(i))).committed_uecu
        approved += shown.quote.total_uecu
    assert 0 < committed < approved

    again = await client.preview(ORG, PLAN)
    e = again.expected
    assert e is not None and e.job_type is JobType.TRACE_EVAL
    assert (e.jobs, e.committed_uecu, e.approved_uecu) == (2, committed, approved)
    total = again.quote.total_uecu
    assert e.total_uecu == -(-total * committed // approved)  # rounded up, integer µECU
    assert e.total_uecu < total
    # Another job type has no history; another organization neither.
    assert (await client.preview(ORG, GEPA)).expected is None
    assert (await client.preview("elsewhere", PLAN)).expected is None


async def test_an_abandoned_job_teaches_no_expected_cost(
    sidecar: SidecarServer, client: AsyncQuotaClient
) -> None:
    shown = await client.preview(ORG, PLAN)
    await client.approve_job(ORG, "left", shown, job=PLAN, ttl_ms=60_000)
    async with client.hold(ORG, job=TRACE, job_id="left") as h:
        await h.commit(usage_lines=used(0))
    sidecar.store.clock_offset_ms += 120_000  # no step and no heartbeat for its ttl
    assert (await client.get_job(ORG, "left")).state.name == "ABANDONED"
    assert (await client.preview(ORG, PLAN)).expected is None


# -- in Redis and the ledger ----------------------------------------------------------------


async def close_judge_job(s: Stack, org: str, jid: str, amount: int, spend: int) -> None:
    """Approve a judge job of ``amount``, bill ``spend`` through one step, close it."""
    await approve(s, org, jid, amount)
    acct = AccountRef(org)
    await s.store.reserve(acct, [step(f"{jid}-s", amount)], job_id=jid)
    await s.store.commit(org, [CommitItem(f"{jid}-s", spend)], 20)
    await s.store.job(org, jid, "close")


async def accuracy(s: Stack, org: str) -> dict[str, JobAccuracy]:
    return (await s.balance(org)).job_accuracy


async def test_a_rebuild_restores_the_accuracy_from_the_ledger(stack: Stack) -> None:
    org = "acc-rebuild"
    await stack.engine.grant(org, "g1", 100 * ECU, GrantKind.TOP_UP)
    await close_judge_job(stack, org, "j1", 1_000_000, 250_000)
    await close_judge_job(stack, org, "j2", 3_000_000, 2_000_000)
    await approve(stack, org, "open", 500_000)  # open: not counted
    await approve(stack, org, "left", 500_000)
    await stack.store.job(org, "left", "close")  # closed unused: 0 of 500,000
    want = {"judge": JobAccuracy("judge", 3, 2_250_000, 4_500_000)}
    assert await accuracy(stack, org) == want
    await stack.flusher.drain()
    await stack.lose(org, *(x for x in SUFFIXES if x != "outbox"))
    assert await accuracy(stack, org) == want  # rebuilt on first use, from the jobs rows


async def test_the_accuracy_rests_on_the_latest_jobs(stack: Stack) -> None:
    """Redis halves the sums at 2 x ACCURACY_WINDOW jobs; the ledger restores the latest
    ACCURACY_WINDOW of each type."""
    org = "acc-window"
    await stack.engine.grant(org, "g1", 10**6 * ECU, GrantKind.TOP_UP)
    for i in range(2 * ACCURACY_WINDOW - 1):
        # A millisecond apart: "latest" is by the time a job ended (jobs that end within one
        # millisecond are ordered by their ids, which says nothing of which ended last).
        stack.store.clock_offset_ms += 1
        await close_judge_job(stack, org, f"j{i}", 1_000, 100 if i < ACCURACY_WINDOW else 900)
    got = (await accuracy(stack, org))["judge"]
    assert (got.jobs, got.committed_uecu, got.approved_uecu) == (199, 100 * 100 + 99 * 900, 199_000)
    stack.store.clock_offset_ms += 1
    await close_judge_job(stack, org, "last", 1_000, 900)
    got = (await accuracy(stack, org))["judge"]
    assert (got.jobs, got.committed_uecu, got.approved_uecu) == (
        ACCURACY_WINDOW, (100 * 100 + 100 * 900) // 2, 100_000,
    )  # fmt: skip
    await stack.flusher.drain()
    with stack.ledger.backend.transaction(write=False) as tx:
        from_ledger = ledger_accuracy(tx, org)
    assert from_ledger == [JobAccuracy("judge", ACCURACY_WINDOW, 100 * 900, 100_000)]


# -- the flusher's job metrics ----------------------------------------------------------------


async def test_the_flusher_counts_jobs_once(stack: Stack) -> None:
    org = "acc-metrics"
    await stack.engine.grant(org, "g1", 100 * ECU, GrantKind.TOP_UP)
    await close_judge_job(stack, org, "j1", 1_000_000, 250_000)
    await close_judge_job(stack, org, "j2", 2_000_000, 1_900_000)
    await approve(stack, org, "left", 300_000)
    stack.store.clock_offset_ms += 31 * 60_000  # past the 30-minute ttl: abandoned
    await stack.store.sweep(org)
    await approve(stack, org, "open", 700_000)
    assert stack.metric("ecu_jobs_open") == 0  # nothing flushed yet
    await stack.flusher.drain()
    await stack.store.job(org, "open", "touch")  # a heartbeat moves no job metric
    await stack.flusher.drain()

    judge = {"job_type": "judge"}
    m = stack.metric
    assert m("ecu_jobs_opened_total", judge) == 4
    assert m("ecu_jobs_ended_total", {**judge, "state": "closed"}) == 2
    assert m("ecu_jobs_ended_total", {**judge, "state": "abandoned"}) == 1
    assert m("ecu_jobs_open") == 1
    assert m("ecu_job_approved_uecu_total", judge) == 4_000_000
    assert m("ecu_job_committed_uecu_total", judge) == 2_150_000
    assert m("ecu_job_preview_accuracy_count", judge) == 2  # closed jobs only
    assert m("ecu_job_preview_accuracy_sum", judge) == pytest.approx(0.25 + 0.95)
    assert m("ecu_job_preview_accuracy_bucket", {**judge, "le": "0.3"}) == 1
    assert m("ecu_job_preview_accuracy_bucket", {**judge, "le": "0.9"}) == 1
    assert m("ecu_job_preview_accuracy_bucket", {**judge, "le": "0.95"}) == 2
    assert m("ecu_jobs_opened_total", {"job_type": "gepa"}) == 0  # exported from the start

    # Events a flusher reads again (another flusher's claim, a retry) are counted once.
    stack.store.clock_offset_ms += 1
    await stack.store.job(org, "open", "close")
    await stack.flusher.drain()
    assert m("ecu_jobs_open") == 0
    assert m("ecu_jobs_ended_total", {**judge, "state": "closed"}) == 3
    assert m("ecu_job_preview_accuracy_count", judge) == 3
    assert m("ecu_jobs_opened_total", judge) == 4


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_preview_shows_the_expected_cost(serve: Any) -> None:
    org = "cli-expected"
    cli_json(serve, "grant", org, "10ECU", "--grant-id", "seed")
    first = cli_json(serve, "preview", str(EXAMPLE_JOB), "--org", org)
    assert first["expected"] is None
    assert "expected            - (no job of this type closed yet" in ok(
        cli(serve, "preview", str(EXAMPLE_JOB), "--org", org)
    )
    # The example's first item is an inference: a closed inference job teaches its preview.
    cli_json(serve, "job", "approve", org, "run", "3ECU", "--job-type", "inference")
    cli_json(serve, "reserve", org, "1ECU", "--job-type", "inference", "--model", "gpt-4o",
             "--job", "run", "--id", "s1")  # fmt: skip
    cli_json(serve, "commit", org, "s1", "400000")
    cli_json(serve, "job", "close", org, "run")
    p = cli_json(serve, "preview", str(EXAMPLE_JOB), "--org", org)
    total = p["total_uecu"]
    assert p["expected"] == {
        "total_uecu": -(-total * 400_000 // (3 * ECU)),
        "jobs": 1,
        "committed_uecu": 400_000,
        "approved_uecu": 3 * ECU,
        "job_type": "inference",
    }
    text = ok(cli(serve, "preview", str(EXAMPLE_JOB), "--org", org))
    assert (
        f"expected            {p['expected']['total_uecu']} uECU" in text
        and "(the latest 1 closed jobs of this type committed 13 % of what they approved)" in text
    ), text
