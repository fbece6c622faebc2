"""Approved jobs end to end (issue 16, docs/jobs.md): the user approves a preview once, and every
step of the run draws from that approval instead of the wallet.

Against a real sidecar on real Redis (and the embedded store): the life cycle to the µECU; a
run completing all its steps after other traffic drained the wallet; a run short-circuited
after 10 % returning exactly the rest; policy wallet within its extra max; replays; every
refusal with its status, ErrorInfo and no state change (the keys byte for byte, GetBalance and
GetJob); stale, unknown and mismatched quotes across a rate card reload; an abandoned job
ending by itself (the store's clock stepped, never slept); no job step in degraded mode; the
client's ``client.job(...)`` in both flavours; the CLI. Every test ends by checking the
conservation identities of every organization it touched.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.json_format import ParseDict

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.client import (
    AsyncQuotaClient,
    FailedPrecondition,
    JobState,
    QuotaClient,
    UsageLine,
)
from ecu_sidecar.client import InsufficientEcu as ClientInsufficientEcu
from ecu_sidecar.convert import balance_from_pb, job_from_pb
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.jobs import JobApproval
from ecu_sidecar.model import AccountRef, Balance, GrantKind, JobType, ReserveItem
from ecu_sidecar.pricing import RateCardRegistry, load_rate_card, preview
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings, SettingsError
from tests.conftest import (
    ADMIN_METADATA,
    ADMIN_TOKEN,
    EXAMPLE_RATE_CARD,
    assert_conserved,
    make_settings,
    snapshot,
    wait_until,
)
from tests.test_cli import EXAMPLE_JOB, ok, run_cli, start_serve, stop_serve
from tests.test_pricing_grpc import RELOAD_JOB, V2, running, v2_text
from tests.test_service import details

ECU = 1_000_000
ORG = "acme"
OTHER = "other-co"
TEAM, PROJECT = "team-a", "proj-a"
HOUR_MS = 3_600_000
CARD = load_rate_card(EXAMPLE_RATE_CARD)
V1 = CARD.version
OPEN = pb.JOB_STATE_OPEN
#: A judge model of the example card, for steps given as amounts.
JUDGE = "gpt-4o-mini"


@pytest.fixture
def settings(backend: str) -> Settings:
    # Short ttls are allowed: the heartbeat test keeps a 300 ms job alive for several ttls.
    return make_settings(backend, min_ttl_ms=50)


# -- calling the sidecar -------------------------------------------------------------------------


async def grant(stub: Any, org: str, amount: int, gid: str = "seed") -> None:
    await stub.Grant(
        pb.GrantRequest(
            grant_id=gid, organization=org, amount_uecu=amount, kind=pb.GRANT_KIND_TOP_UP
        ),
        metadata=ADMIN_METADATA,
    )


def approval(job_id: str, amount: int, *, org: str = ORG, **fields: Any) -> pb.ApproveJobRequest:
    """A plain-amount approval (a judge run) unless ``fields`` give a job spec."""
    account = pb.Account(
        organization=org, team=fields.pop("team", ""), project=fields.pop("project", "")
    )
    fields.setdefault("ttl_ms", HOUR_MS)
    if "job" not in fields:
        fields.setdefault("job_type", pb.JOB_TYPE_JUDGE)
    return pb.ApproveJobRequest(
        job_id=job_id, account=account, approved_total_uecu=amount, **fields
    )


async def approve(stub: Any, job_id: str, amount: int, **fields: Any) -> pb.JobResponse:
    return await stub.ApproveJob(approval(job_id, amount, **fields))


def step_request(
    rid: str, amount: int, job_id: str, *, org: str = ORG, team: str = "", ttl_ms: int = HOUR_MS
) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=rid,
        account=pb.Account(organization=org, team=team),
        amount_uecu=amount,
        job_type=pb.JOB_TYPE_JUDGE,
        model=JUDGE,
        ttl_ms=ttl_ms,
        job_id=job_id,
    )


async def step(stub: Any, rid: str, amount: int, job_id: str, **kw: Any) -> pb.ReserveResponse:
    return await stub.Reserve(step_request(rid, amount, job_id, **kw))


async def commit(stub: Any, rid: str, actual: int, org: str = ORG) -> pb.CommitResponse:
    return await stub.Commit(
        pb.CommitRequest(reservation_id=rid, organization=org, actual_uecu=actual)
    )


async def get_job(stub: Any, job_id: str, org: str = ORG) -> pb.Job:
    return (await stub.GetJob(pb.GetJobRequest(organization=org, job_id=job_id))).job


async def close(stub: Any, job_id: str, org: str = ORG) -> pb.JobResponse:
    return await stub.CloseJob(pb.CloseJobRequest(organization=org, job_id=job_id))


async def balance(stub: Any, org: str = ORG) -> Balance:
    """The organization's balance, its conservation identities checked."""
    b = balance_from_pb((await stub.GetBalance(pb.GetBalanceRequest(organization=org))).balance)
    assert_conserved(b)
    return b


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    return ei.value


def info(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Code, ErrorInfo reason and metadata of a refusal."""
    meta = details(exc)["ErrorInfo"]
    return exc.code(), meta.reason, dict(meta.metadata)


# -- the life cycle, to the µECU -----------------------------------------------------------------


async def test_approve_draw_commit_release_close_to_the_uecu(stub) -> None:
    await grant(stub, ORG, 10 * ECU)
    out = await approve(stub, "run-1", 3 * ECU)
    j = out.job
    assert (out.available_uecu, out.replayed) == (7 * ECU, False)
    assert (j.state, j.approved_uecu, j.remaining_uecu, j.held_uecu, j.drawn_uecu) == (
        OPEN, 3 * ECU, 3 * ECU, 0, 0,
    )  # fmt: skip
    assert (j.policy, j.job_type, j.rate_card_version, j.ttl_ms) == (
        pb.JOB_POLICY_REFUSE, pb.JOB_TYPE_JUDGE, "", HOUR_MS,
    )  # fmt: skip
    assert j.deadline_unix_ms == j.opened_at_unix_ms + HOUR_MS and j.organization == ORG
    b = await balance(stub)
    assert (b.held_uecu, b.available_uecu) == (3 * ECU, 7 * ECU)

    for i in range(5):
        s = await step(stub, f"s{i}", 400_000, "run-1")
        # The wallet does not move: the step is held inside the job's hold.
        assert (s.available_uecu, s.job_remaining_uecu) == (7 * ECU, 3 * ECU - 400_000 * (i + 1))
    assert (await balance(stub)).held_uecu == 3 * ECU

    c = await commit(stub, "s0", 250_000)
    assert (c.committed_uecu, c.released_uecu, c.available_uecu) == (250_000, 150_000, 7 * ECU)
    await commit(stub, "s1", 400_000)
    r = await stub.Release(pb.ReleaseRequest(reservation_id="s2", organization=ORG))
    assert (r.released_uecu, r.state) == (400_000, pb.HOLD_STATE_RELEASED)
    await commit(stub, "s3", 0)
    j = await get_job(stub, "run-1")
    # room: 3 ECU - 5 steps + 150,000 (s0) + 400,000 (s2) + 400,000 (s3) = 1.95 ECU
    assert (j.committed_uecu, j.held_uecu, j.remaining_uecu, j.drawn_uecu) == (
        650_000, 400_000, 1_950_000, 1_050_000,
    )  # fmt: skip
    assert (j.steps, j.steps_committed, j.steps_ended) == (5, 3, 1)
    b = await balance(stub)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (650_000, 2_350_000, 7 * ECU)

    closed = await close(stub, "run-1")
    j = closed.job
    assert (j.state, j.returned_uecu, j.remaining_uecu, j.held_uecu) == (
        pb.JOB_STATE_CLOSED, 2_350_000, 0, 0,
    )  # fmt: skip
    assert (closed.available_uecu, closed.replayed) == (9_350_000, False)
    assert j.ended_at_unix_ms >= j.opened_at_unix_ms and j.committed_uecu == 650_000
    b = await balance(stub)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu, b.outstanding_holds) == (
        650_000, 0, 9_350_000, 0,
    )  # fmt: skip
    # The step still held at close was released with it.
    exc = await refused(commit(stub, "s4", 1))
    assert info(exc)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_RELEASED")
    await balance(stub)


async def test_a_wallet_drained_to_zero_does_not_stop_an_approved_run(stub) -> None:
    await grant(stub, ORG, 10 * ECU)
    await approve(stub, "run", 4 * ECU)  # 20 steps of at most 0.2 ECU
    # Other traffic (no job) drains the wallet to zero.
    await stub.Reserve(
        pb.ReserveRequest(
            reservation_id="other-1",
            account=pb.Account(organization=ORG),
            amount_uecu=6 * ECU,
            job_type=pb.JOB_TYPE_GEPA,
        )
    )
    await commit(stub, "other-1", 6 * ECU)
    assert (await balance(stub)).available_uecu == 0
    exc = await refused(
        stub.Reserve(
            pb.ReserveRequest(
                reservation_id="other-2",
                account=pb.Account(organization=ORG),
                amount_uecu=1,
                job_type=pb.JOB_TYPE_GEPA,
            )
        )
    )
    assert info(exc)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info(exc)[2]["scope"] == "organization"

    # Every step of the run is still granted, at zero available balance.
    for i in range(20):
        s = await step(stub, f"s{i}", 200_000, "run")
        assert s.available_uecu == 0
    assert s.job_remaining_uecu == 0
    for i in range(20):
        await commit(stub, f"s{i}", 150_000)
    j = await get_job(stub, "run")
    assert (j.steps, j.steps_committed, j.committed_uecu, j.remaining_uecu) == (
        20, 20, 3 * ECU, 1 * ECU,
    )  # fmt: skip
    closed = await close(stub, "run")
    assert (closed.job.returned_uecu, closed.available_uecu) == (1 * ECU, 1 * ECU)
    b = await balance(stub)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (9 * ECU, 0, 1 * ECU)


async def test_a_run_short_circuited_after_ten_percent_returns_exactly_the_rest(stub) -> None:
    planned, worst = 100, 50_000
    await grant(stub, ORG, 6 * ECU)
    await approve(stub, "short", planned * worst)
    committed = 0
    for i in range(planned // 10):
        await step(stub, f"s{i}", worst, "short")
        committed += (await commit(stub, f"s{i}", 30_000 + 7 * i)).committed_uecu
    assert committed == 10 * 30_000 + 7 * 45
    closed = await close(stub, "short")
    assert closed.job.returned_uecu == planned * worst - committed
    assert closed.job.committed_uecu == committed
    assert closed.available_uecu == 6 * ECU - committed
    b = await balance(stub)
    assert (b.held_uecu, b.committed_uecu, b.available_uecu) == (0, committed, 6 * ECU - committed)


async def test_policy_wallet_draws_beyond_the_room_within_its_extra_max(stub) -> None:
    await grant(stub, ORG, 10 * ECU)
    j = (await approve(stub, "w", 1 * ECU, policy=pb.JOB_POLICY_WALLET)).job
    extra_max = 1 * ECU * Settings().overage_max_percent // 100
    assert (j.policy, j.extra_max_uecu, j.extra_uecu) == (pb.JOB_POLICY_WALLET, extra_max, 0)

    assert (await step(stub, "s1", 900_000, "w")).available_uecu == 9 * ECU
    s2 = await step(stub, "s2", 250_000, "w")  # 100,000 from the room, 150,000 from the wallet
    assert (s2.job_remaining_uecu, s2.available_uecu) == (0, 9 * ECU - 150_000)
    exc = await refused(step(stub, "s3", 60_000, "w"))
    code, reason, meta = info(exc)
    assert (code, reason, meta["scope"], meta["scope_id"]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_ECU", "job", "w",
    )  # fmt: skip
    assert (meta["requested"], meta["available"]) == ("60000", str(extra_max - 150_000))
    assert (await step(stub, "s3", 50_000, "w")).available_uecu == 9 * ECU - extra_max
    assert (await get_job(stub, "w")).extra_uecu == extra_max
    exc = await refused(step(stub, "s4", 1, "w"))
    assert info(exc)[2]["scope"] == "job"

    for rid, amount in (("s1", 900_000), ("s2", 250_000), ("s3", 50_000)):
        await commit(stub, rid, amount)
    closed = await close(stub, "w")
    assert (closed.job.committed_uecu, closed.job.returned_uecu) == (1 * ECU + extra_max, 0)
    b = await balance(stub)
    assert (b.committed_uecu, b.held_uecu) == (1 * ECU + extra_max, 0)


async def test_policy_refuse_never_bills_beyond_the_approval(stub) -> None:
    await grant(stub, ORG, 10 * ECU)
    await approve(stub, "r", 1 * ECU)
    await step(stub, "s1", 1 * ECU, "r")
    c = await commit(stub, "s1", 1_500_000)  # the work happened: recorded, not billed
    assert (c.committed_uecu, c.unbilled_overage_uecu) == (1 * ECU, 500_000)
    assert (await close(stub, "r")).job.committed_uecu == 1 * ECU
    assert (await balance(stub)).committed_uecu == 1 * ECU


async def test_replays_change_nothing(sidecar, stub) -> None:
    await grant(stub, ORG, 10 * ECU)
    first = await approve(stub, "rp", 2 * ECU)
    state = await snapshot(sidecar.settings)
    again = await approve(stub, "rp", 2 * ECU)
    assert again.replayed and again.job == first.job
    assert await snapshot(sidecar.settings) == state

    s = await step(stub, "s1", 500_000, "rp")
    state = await snapshot(sidecar.settings)
    retry = await step(stub, "s1", 500_000, "rp")
    assert retry.replayed and retry.hold == s.hold
    assert retry.job_remaining_uecu == s.job_remaining_uecu == 1_500_000
    assert await snapshot(sidecar.settings) == state

    c = await commit(stub, "s1", 300_000)
    state = await snapshot(sidecar.settings)
    assert (await commit(stub, "s1", 300_000)).replayed
    assert await snapshot(sidecar.settings) == state

    closed = await close(stub, "rp")
    state = await snapshot(sidecar.settings)
    twice = await close(stub, "rp")
    assert twice.replayed and twice.job == closed.job
    assert await snapshot(sidecar.settings) == state
    b = await balance(stub)
    assert (b.committed_uecu, b.available_uecu) == (c.committed_uecu, 10 * ECU - 300_000)


async def test_a_step_beyond_the_room_under_refuse_is_refused_with_a_quota_failure(
    sidecar, stub
) -> None:
    await grant(stub, ORG, 10 * ECU)
    await approve(stub, "q", 1 * ECU)
    await step(stub, "s1", 700_000, "q")
    state, job = await snapshot(sidecar.settings), await get_job(stub, "q")
    exc = await refused(step(stub, "s2", 400_000, "q"))
    code, reason, meta = info(exc)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_ECU")
    assert meta == {
        "scope": "job", "scope_id": "q", "requested": "400000", "available": "300000",
    }  # fmt: skip
    (violation,) = details(exc)["QuotaFailure"].violations
    assert violation.subject == "job:q"
    assert violation.description == "requested 400000 uECU, available 300000 uECU"
    assert await snapshot(sidecar.settings) == state
    assert await get_job(stub, "q") == job
    await balance(stub)


# -- refusals: precise status and details, and no state change ------------------------------------

#: A previewed spec (priced differently by V1 and V2: gpt-4o's input rate).
SPEC = ParseDict(RELOAD_JOB, pb.JobSpec())
SPEC_TOTAL = preview(CARD, ORG, job_from_pb(SPEC)).total_uecu


async def seed(stub: Any) -> None:
    """acme (team-a capped at 5 ECU) with an open job of team-a holding a step and a closed
    job; another organization with its own job."""
    await grant(stub, ORG, 10 * ECU)
    await stub.SetCap(
        pb.SetCapRequest(organization=ORG, scope=pb.CAP_SCOPE_TEAM, id=TEAM, cap_uecu=5 * ECU),
        metadata=ADMIN_METADATA,
    )
    await grant(stub, OTHER, 1 * ECU)
    await approve(stub, "open-1", 1 * ECU, team=TEAM, project=PROJECT)
    await step(stub, "step-1", 100_000, "open-1")
    await approve(stub, "closed-1", 500_000)
    await close(stub, "closed-1")
    await approve(stub, "theirs", 500_000, org=OTHER)


REFUSALS = [
    pytest.param(
        "Reserve", step_request("x", 1, "nope"), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND",
        {"job_id": "nope", "organization": ORG}, id="step-of-an-unknown-job",
    ),
    pytest.param(
        "GetJob", pb.GetJobRequest(organization=ORG, job_id="nope"),
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"job_id": "nope"}, id="get-unknown-job",
    ),
    pytest.param(
        "HeartbeatJob", pb.HeartbeatJobRequest(organization=ORG, job_id="nope"),
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"job_id": "nope"}, id="heartbeat-unknown-job",
    ),
    pytest.param(
        "CloseJob", pb.CloseJobRequest(organization=ORG, job_id="nope"),
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"job_id": "nope"}, id="close-unknown-job",
    ),
    pytest.param(
        "Reserve", step_request("x", 1, "closed-1"), grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_CLOSED", {"job_id": "closed-1", "state": "closed"}, id="step-of-a-closed-job",
    ),
    pytest.param(
        "HeartbeatJob", pb.HeartbeatJobRequest(organization=ORG, job_id="closed-1"),
        grpc.StatusCode.FAILED_PRECONDITION, "JOB_CLOSED",
        {"job_id": "closed-1", "state": "closed"}, id="heartbeat-a-closed-job",
    ),
    # Another organization's job id is unknown in this one (job ids are per organization).
    pytest.param(
        "Reserve", step_request("x", 1, "theirs"), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND",
        {"job_id": "theirs", "organization": ORG}, id="step-naming-another-organizations-job",
    ),
    pytest.param(
        "GetJob", pb.GetJobRequest(organization=ORG, job_id="theirs"),
        grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {"organization": ORG},
        id="get-another-organizations-job",
    ),
    pytest.param(
        "Reserve", step_request("x", 1 * ECU + 1, "open-1"), grpc.StatusCode.OUT_OF_RANGE,
        "STEP_EXCEEDS_APPROVAL",
        {"job_id": "open-1", "requested": "1000001", "approved": "1000000", "extra_max": "0"},
        id="step-over-the-approval",
    ),
    pytest.param(
        "Reserve", step_request("x", 950_000, "open-1"), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU",
        {"scope": "job", "scope_id": "open-1", "requested": "950000", "available": "900000"},
        id="step-beyond-the-room",
    ),
    pytest.param(
        "Reserve", step_request("x", 1, "open-1", team="team-b"),
        grpc.StatusCode.FAILED_PRECONDITION, "JOB_SCOPE_MISMATCH",
        {"job_id": "open-1", "team": TEAM, "project": PROJECT}, id="step-of-another-team",
    ),
    pytest.param(
        "ApproveJob", approval("open-1", 2 * ECU, team=TEAM, project=PROJECT),
        grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", {"job_id": "open-1"},
        id="re-approval-of-another-amount",
    ),
    pytest.param(
        "ApproveJob",
        approval("open-1", 1 * ECU, team=TEAM, project=PROJECT, policy=pb.JOB_POLICY_WALLET),
        grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT", {"job_id": "open-1"},
        id="re-approval-with-another-policy",
    ),
    pytest.param(
        "ApproveJob", approval("open-1", 1 * ECU), grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT", {"job_id": "open-1"}, id="re-approval-for-another-team",
    ),
    # A step id is a reservation id: the same one as a wallet hold is another request.
    pytest.param(
        "Reserve", step_request("step-1", 100_000, ""), grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT", {"reservation_id": "step-1"}, id="step-id-reused-off-the-job",
    ),
    pytest.param(
        "ApproveJob", approval("big", 9_500_000), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU", {"scope": "organization", "available": "9000000"},
        id="approval-not-covered-by-the-wallet",
    ),
    pytest.param(
        "ApproveJob", approval("big", 4_500_000, team=TEAM), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU", {"scope": "team", "scope_id": TEAM, "available": "4000000"},
        id="approval-over-the-team-cap",
    ),
    pytest.param(
        "ApproveJob", approval("j", 1, org="nobody"), grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND", {"organization": "nobody"}, id="approval-for-an-unknown-organization",
    ),
    pytest.param(
        "ApproveJob",
        approval("j", SPEC_TOTAL, job=SPEC, rate_card_version="2020-01-01.1"),
        grpc.StatusCode.FAILED_PRECONDITION, "RATE_CARD_VERSION_UNKNOWN",
        {"version": "2020-01-01.1"}, id="approval-of-an-unknown-rate-card-version",
    ),
    pytest.param(
        "ApproveJob", approval("j", SPEC_TOTAL + 1, job=SPEC, rate_card_version=V1),
        grpc.StatusCode.INVALID_ARGUMENT, "QUOTE_MISMATCH",
        {"approved_total_uecu": str(SPEC_TOTAL + 1), "total_uecu": str(SPEC_TOTAL)},
        id="approval-of-another-total",
    ),
    # A job approved for a plain amount has no rate card to price a step's spec with.
    pytest.param(
        "Reserve",
        pb.ReserveRequest(
            reservation_id="x", account=pb.Account(organization=ORG), job=SPEC, job_id="open-1"
        ),
        grpc.StatusCode.FAILED_PRECONDITION, "RATE_CARD_MISMATCH", {"job_id": "open-1"},
        id="spec-priced-step-of-a-plain-job",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("rpc", "request_", "code", "reason", "metadata"), REFUSALS)
async def test_refusals_are_precise_and_change_nothing(
    sidecar, stub, rpc: str, request_: Any, code: Any, reason: str, metadata: dict[str, str]
) -> None:
    await seed(stub)

    async def observed() -> Any:
        jobs = [await get_job(stub, j) for j in ("open-1", "closed-1")]
        others = [await get_job(stub, "theirs", OTHER), await balance(stub, OTHER)]
        return await snapshot(sidecar.settings), await balance(stub), jobs, others

    before = await observed()
    exc = await refused(getattr(stub, rpc)(request_))
    got_code, got_reason, got_meta = info(exc)
    assert (got_code, got_reason) == (code, reason), exc.details()
    assert got_meta.items() >= metadata.items(), got_meta
    assert await observed() == before


# -- quotes across a rate card reload ------------------------------------------------------------


@pytest_asyncio.fixture
async def reloadable(backend: str, tmp_path: Path) -> AsyncIterator[tuple[SidecarServer, Any]]:
    """A sidecar on a copy of the example card (V1), reloaded when the test says so."""
    card_file = tmp_path / "rates.toml"
    shutil.copyfile(EXAMPLE_RATE_CARD, card_file)
    settings = make_settings(backend, rate_card_file=str(card_file), rate_card_poll_ms=0)
    async with running(settings) as (server, stub):
        yield server, stub


async def reload_v2(server: SidecarServer) -> int:
    """Make V2 current; the spec's total under it."""
    assert server.settings.rate_card_file
    await asyncio.to_thread(Path(server.settings.rate_card_file).write_text, v2_text())
    await server.reload_rate_card(force=True)
    assert server.rates is not None and server.rates.current.version == V2
    return preview(server.rates.current, ORG, job_from_pb(SPEC)).total_uecu


async def test_a_quote_gone_stale_is_refused_with_the_re_quote(reloadable) -> None:
    server, stub = reloadable
    await grant(stub, ORG, 10 * ECU)
    shown = await stub.Preview(pb.PreviewRequest(account=pb.Account(organization=ORG), job=SPEC))
    assert (shown.quote.total_uecu, shown.quote.rate_card_version) == (SPEC_TOTAL, V1)
    v2_total = await reload_v2(server)
    assert v2_total != SPEC_TOTAL

    state, b = await snapshot(server.settings), await balance(stub)
    exc = await refused(approve(stub, "j", SPEC_TOTAL, job=SPEC, rate_card_version=V1))
    code, reason, meta = info(exc)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUOTE_STALE")
    assert meta == {
        "job_id": "j", "approved_version": V1, "rate_card_version": V2,
        "total_uecu": str(v2_total),
    }  # fmt: skip
    assert str(v2_total) in (exc.details() or "")
    assert (await snapshot(server.settings), await balance(stub)) == (state, b)
    assert info(await refused(stub.GetJob(pb.GetJobRequest(organization=ORG, job_id="j"))))[1] == (
        "JOB_NOT_FOUND"
    )

    # The user approves the re-quote: pinned to V2.
    j = (await approve(stub, "j", v2_total, job=SPEC, rate_card_version=V2)).job
    assert (j.approved_uecu, j.rate_card_version, j.job_type) == (
        v2_total, V2, pb.JOB_TYPE_INFERENCE,
    )  # fmt: skip
    await balance(stub)


async def test_an_approval_retried_after_a_reload_is_its_replay(reloadable) -> None:
    server, stub = reloadable
    await grant(stub, ORG, 10 * ECU)
    first = await approve(stub, "j", SPEC_TOTAL, job=SPEC, rate_card_version=V1)
    await reload_v2(server)
    state = await snapshot(server.settings)
    again = await approve(stub, "j", SPEC_TOTAL, job=SPEC, rate_card_version=V1)
    assert again.replayed and again.job == first.job
    assert await snapshot(server.settings) == state

    # Its steps are priced with the job's version (V1), not the current one.
    s = await stub.Reserve(
        pb.ReserveRequest(
            reservation_id="s1", account=pb.Account(organization=ORG), job=SPEC, job_id="j"
        )
    )
    assert (s.hold.amount_uecu, s.quote.rate_card_version) == (SPEC_TOTAL, V1)
    assert s.job_remaining_uecu == 0
    await balance(stub)


async def test_a_sidecar_that_did_not_approve_prices_steps_with_the_jobs_version(
    store, settings: Settings, tmp_path: Path
) -> None:
    """Two engines on one store: one approved at V1; the other's current card is V2 and it
    never saw the job. Its first step is priced with V2, refused by the store naming V1,
    priced again with V1; it remembers V1 for the next steps."""
    v2_file = tmp_path / "v2.toml"
    v2_file.write_text(v2_text())
    approver = QuotaEngine(store, settings, rates=RateCardRegistry.from_file(EXAMPLE_RATE_CARD))
    rates = RateCardRegistry()
    rates.register(EXAMPLE_RATE_CARD)
    rates.load(v2_file)
    worker = QuotaEngine(store, settings, rates=rates)
    try:
        await approver.grant(ORG, "seed", 10 * ECU, GrantKind.TOP_UP)
        account = AccountRef(ORG)
        spec = job_from_pb(SPEC)
        await approver.approve_job(
            account,
            JobApproval("j", SPEC_TOTAL, JobType.INFERENCE, rate_card_version=V1, spec=spec),
        )
        assert approver.jobs.pinned(ORG, "j") == V1 and worker.jobs.pinned(ORG, "j") is None
        item = ReserveItem("s1", 0, None, job=spec)  # type: ignore[arg-type]
        out = await worker.reserve(account, [item], job_id="j")
        assert out.holds[0].amount_uecu == SPEC_TOTAL
        assert out.quotes[0].rate_card_version == V1 and out.job_room_uecu == 0
        assert worker.jobs.pinned(ORG, "j") == V1
        assert_conserved(await worker.balance(ORG))
    finally:
        approver.close()
        worker.close()


# -- an abandoned job ends by itself --------------------------------------------------------------


async def test_an_abandoned_job_ends_by_itself_and_returns_its_money(sidecar, stub) -> None:
    store = sidecar.store
    await grant(stub, ORG, 10 * ECU)
    await approve(stub, "gone", 2 * ECU, ttl_ms=60_000)
    await step(stub, "s1", 500_000, "gone")  # its own ttl is an hour
    store.clock_offset_ms = 50_000
    beat = await stub.HeartbeatJob(pb.HeartbeatJobRequest(organization=ORG, job_id="gone"))
    assert beat.job.state == OPEN and beat.job.deadline_unix_ms == store_now(beat) + 60_000
    store.clock_offset_ms = 109_000  # 59 s after the heartbeat: still alive
    await store.sweep(ORG)
    assert (await get_job(stub, "gone")).state == OPEN

    store.clock_offset_ms = 111_000  # 61 s without a step or heartbeat
    await store.sweep(ORG)  # the background sweeper's pass
    j = await get_job(stub, "gone")
    assert (j.state, j.returned_uecu, j.remaining_uecu, j.held_uecu, j.steps_ended) == (
        pb.JOB_STATE_ABANDONED, 2 * ECU, 0, 0, 1,
    )  # fmt: skip
    b = await balance(stub)
    assert (b.held_uecu, b.available_uecu, b.expired_uecu) == (0, 10 * ECU, 2 * ECU)
    for call in (
        stub.HeartbeatJob(pb.HeartbeatJobRequest(organization=ORG, job_id="gone")),
        step(stub, "s2", 1, "gone"),
    ):
        ended = (grpc.StatusCode.FAILED_PRECONDITION, "JOB_CLOSED")
        assert info(await refused(call)) == (*ended, {"job_id": "gone", "state": "abandoned"})
    # Its step expired with it; a late commit still records (and bills) what the step used.
    c = await commit(stub, "s1", 400_000)
    assert (c.late, c.committed_uecu) == (True, 400_000)
    b = await balance(stub)
    assert (b.committed_uecu, b.available_uecu) == (400_000, 10 * ECU - 400_000)


def store_now(beat: pb.JobResponse) -> int:
    """The store's clock when it answered a heartbeat (its deadline less the ttl)."""
    return beat.job.deadline_unix_ms - beat.job.ttl_ms


# -- no job without Redis ------------------------------------------------------------------------


async def test_job_steps_are_never_granted_in_degraded_mode(private_redis, tmp_path) -> None:
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{private_redis.port}/0",
        redis_timeout_ms=150,
        redis_connect_timeout_ms=150,
        degraded_allowance_uecu=1 * ECU,
        degraded_journal=str(tmp_path / "degraded.jsonl"),
    )
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await grant(stub, ORG, 10 * ECU)
            await approve(stub, "j", 2 * ECU)
            private_redis.freeze()
            try:
                for call in (
                    step(stub, "s1", 1_000, "j"),
                    approve(stub, "j2", 1_000),
                    stub.CloseJob(pb.CloseJobRequest(organization=ORG, job_id="j")),
                ):
                    assert info(await refused(call))[:2] == (
                        grpc.StatusCode.UNAVAILABLE, StoreUnavailable.reason,
                    )  # fmt: skip
                # The same step off the job is granted locally, within the allowance.
                wallet = await stub.Reserve(step_request("s1", 1_000, ""), timeout=5)
                assert wallet.degraded
            finally:
                private_redis.thaw()
            # UNAVAILABLE is an unknown outcome: the frozen Redis may run those calls once
            # thawed. Whatever it ran, the counters add up.
            await balance(stub)
    finally:
        await server.stop(grace=0)


# -- the client: async with client.job(...) -------------------------------------------------------

PLAN = {
    "items": [
        {
            "traceEval": {
                "traces": 10,
                "judges": [
                    {"judgeModel": JUDGE, "promptTokensPerCall": 800, "maxOutputTokensPerCall": 100}
                ],
            }
        }
    ]
}
#: One trace of the plan: what each step holds.
TRACE = {"items": [{"traceEval": {**PLAN["items"][0]["traceEval"], "traces": 1}}]}


def used(i: int) -> list[UsageLine]:
    """What evaluating trace ``i`` really used: less than its worst case."""
    return [
        UsageLine("judge", JUDGE, tokens_in=500 + i, tokens_out=40, calls=1),
        UsageLine("trace", calls=1),
    ]


@pytest_asyncio.fixture
async def client(sidecar: SidecarServer) -> AsyncIterator[AsyncQuotaClient]:
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN) as c:
        await c.grant(ORG, 10 * ECU, grant_id="seed")
        yield c


async def test_client_job_approves_draws_and_closes(client: AsyncQuotaClient) -> None:
    shown = await client.preview(ORG, PLAN)
    committed = 0
    async with client.job(ORG, "eval-1", shown, job=PLAN) as run:
        assert run.is_open and run.view is not None
        assert (run.view.approved_uecu, run.view.rate_card_version) == (shown.quote.total_uecu, V1)
        assert run.view.job_type == "trace_eval"
        for i in range(8):
            async with run.hold(job=TRACE) as h:
                assert h.rate_card_version == V1
                committed += (await h.commit(usage_lines=used(i))).committed_uecu
        # A worker of another process draws with the job's id on its own client.
        async with client.hold(ORG, job=TRACE, job_id="eval-1") as h:
            committed += (await h.commit(usage_lines=used(8))).committed_uecu
        one = await run.reserve(job=TRACE)
        assert one.job_room_uecu == (await run.refresh()).room_uecu
    final = run.view
    assert final.state is JobState.CLOSED and not run.is_open
    assert (final.committed_uecu, final.steps, final.steps_committed) == (committed, 10, 9)
    assert final.returned_uecu == final.approved_uecu - committed
    assert run.accuracy == committed / final.approved_uecu
    b = await client.balance(ORG)
    assert_conserved(b)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (committed, 0, 10 * ECU - committed)
    # Entering again (a restarted coordinator) answers the ended job: nothing is held again.
    async with client.job(ORG, "eval-1", shown, job=PLAN) as again:
        assert again.view is not None and again.view.replayed and not again.is_open
    assert (await client.balance(ORG)).available_uecu == b.available_uecu


async def test_client_job_is_closed_when_its_block_raises(client: AsyncQuotaClient) -> None:
    with pytest.raises(RuntimeError, match="worker crashed"):
        async with client.job(ORG, "eval-2", 2 * ECU, job_type="judge") as run:
            await run.reserve(500_000, job_type="judge", model=JUDGE)
            raise RuntimeError("worker crashed")
    assert run.view is not None and run.view.state is JobState.CLOSED
    assert run.view.returned_uecu == 2 * ECU
    b = await client.balance(ORG)
    assert_conserved(b)
    assert (b.held_uecu, b.available_uecu) == (0, 10 * ECU)
    with pytest.raises(ClientInsufficientEcu) as ei:
        async with client.job(ORG, "eval-3", 1 * ECU, job_type="judge", policy="refuse") as run:
            await run.reserve(1 * ECU, job_type="judge", model=JUDGE)
            await run.reserve(1, job_type="judge", model=JUDGE)
    assert ei.value.metadata["scope"] == "job"
    assert run.view is not None and run.view.returned_uecu == 1 * ECU


async def test_sync_client_job(sidecar: SidecarServer, client: AsyncQuotaClient) -> None:
    def worker() -> tuple[Any, int]:
        with QuotaClient(f"127.0.0.1:{sidecar.port}") as c:
            shown = c.preview(ORG, PLAN)
            spent = 0
            with c.job(ORG, "eval-s", shown, job=PLAN) as run:
                for i in range(3):
                    with run.hold(job=TRACE) as h:
                        spent += h.commit(usage_lines=used(i)).committed_uecu
            return run.view, spent

    final, spent = await asyncio.to_thread(worker)
    assert final.state is JobState.CLOSED and final.committed_uecu == spent
    assert final.returned_uecu == final.approved_uecu - spent
    b = await client.balance(ORG)
    assert_conserved(b)
    assert (b.committed_uecu, b.available_uecu) == (spent, 10 * ECU - spent)


async def test_client_job_heartbeats_while_its_block_runs(
    sidecar: SidecarServer, client: AsyncQuotaClient
) -> None:
    """A wall-clock mechanism, never timed: the block waits until three heartbeats (more than
    one ttl) were accepted, then the job is still open; every sweep meanwhile could have
    ended it."""
    async with client.job(ORG, "beat", 1 * ECU, job_type="judge", ttl_ms=300) as run:
        await wait_until(lambda: run.heartbeats >= 3, "three heartbeats")
        await sidecar.store.sweep(ORG)
        assert (await run.refresh()).state is JobState.OPEN
        assert run.heartbeat_error is None
    assert run.view is not None and run.view.state is JobState.CLOSED
    assert_conserved(await client.balance(ORG))


async def test_a_failed_heartbeat_is_recorded_and_never_kills_the_block(
    client: AsyncQuotaClient,
) -> None:
    """The job ends behind the block's back: the next heartbeat is refused, recorded, and stops
    the heartbeat; the block carries on, and its exit closes the job again (a replay)."""
    async with client.job(ORG, "ended", 1 * ECU, job_type="judge", ttl_ms=300) as run:
        keeper = run.keeper
        await client.close_job(ORG, "ended")
        error = await wait_until(lambda: run.heartbeat_error, "the refused heartbeat")
        assert isinstance(error, FailedPrecondition)
        assert (error.reason, error.metadata) == (
            "JOB_CLOSED",
            {"job_id": "ended", "state": "closed"},
        )
        await wait_until(lambda: keeper is not None and keeper.done(), "the heartbeat stopping")
        assert keeper is not None and keeper.exception() is None
        assert (await client.balance(ORG)).held_uecu == 0  # the block goes on
    assert run.keeper is None and run.view is not None and run.view.state is JobState.CLOSED
    assert_conserved(await client.balance(ORG))


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    proc = start_serve(
        tmp_path_factory.mktemp("serve") / "serve.log", ECU_RATE_CARD_FILE=EXAMPLE_RATE_CARD
    )
    yield proc
    stop_serve(proc)


def cli_json(serve: Any, *args: str) -> dict[str, Any]:
    from tests.test_cli import cli

    return json.loads(ok(cli(serve, *args, "--json")))


def conserved(serve: Any, org: str) -> None:
    with QuotaClient(serve.target) as c:
        assert_conserved(c.balance(org))


def test_cli_job_commands(serve: Any) -> None:
    from tests.test_cli import cli

    org = "cli-jobs"
    cli_json(serve, "grant", org, "10ECU", "--grant-id", "seed")
    j = cli_json(serve, "job", "approve", org, "run-1", "3ECU", "--job-type", "judge")
    assert (j["state"], j["approved_uecu"], j["room_uecu"], j["replayed"]) == (
        "open", 3 * ECU, 3 * ECU, False,
    )  # fmt: skip
    assert (j["policy"], j["job_type"], j["accuracy"]) == ("refuse", "judge", 0.0)
    r = cli_json(serve, "reserve", org, "1ECU", "--job-type", "judge", "--model", JUDGE,
                 "--job", "run-1", "--id", "s1")  # fmt: skip
    assert (r["job_id"], r["job_remaining_uecu"], r["available_uecu"]) == (
        "run-1",
        2 * ECU,
        7 * ECU,
    )
    cli_json(serve, "commit", org, "s1", "400000")
    shown = cli_json(serve, "job", "show", org, "run-1")
    assert (shown["committed_uecu"], shown["drawn_uecu"], shown["steps_committed"]) == (
        400_000, 400_000, 1,
    )  # fmt: skip
    assert cli_json(serve, "job", "heartbeat", org, "run-1")["state"] == "open"
    closed = cli_json(serve, "job", "close", org, "run-1")
    assert (closed["state"], closed["returned_uecu"], closed["available_uecu"]) == (
        "closed", 2_600_000, 9_600_000,
    )  # fmt: skip
    assert closed["accuracy"] == 400_000 / (3 * ECU)
    assert cli_json(serve, "job", "close", org, "run-1")["replayed"] is True
    text = ok(cli(serve, "job", "show", org, "run-1"))
    assert "closed" in text and "13.3% of the approval committed" in text

    # A previewed job spec, approved at the preview's total and version.
    p = cli_json(serve, "preview", str(EXAMPLE_JOB), "--org", org)
    j = cli_json(serve, "job", "approve", org, "run-2", str(p["total_uecu"]),
                 "--job", str(EXAMPLE_JOB), "--rate-card-version", p["rate_card_version"],
                 "--policy", "wallet")  # fmt: skip
    assert (j["approved_uecu"], j["rate_card_version"], j["policy"]) == (
        p["total_uecu"], p["rate_card_version"], "wallet",
    )  # fmt: skip

    missing = cli(serve, "job", "show", org, "nope")
    assert missing.returncode == 1
    assert "error: NOT_FOUND JOB_NOT_FOUND: no job nope" in missing.stderr
    total, version = str(p["total_uecu"] + 1), p["rate_card_version"]
    job_file = str(EXAMPLE_JOB)
    mismatch = cli(
        serve,
        "job",
        "approve",
        org,
        "run-3",
        total,
        "--job",
        job_file,
        "--rate-card-version",
        version,
    )
    assert mismatch.returncode == 1 and "INVALID_ARGUMENT QUOTE_MISMATCH" in mismatch.stderr
    assert run_cli("job", "approve", org, "x").returncode == 2  # usage: the amount is missing
    conserved(serve, org)


# -- settings ------------------------------------------------------------------------------------


def test_job_ttl_settings_are_bounded() -> None:
    assert (Settings().job_ttl_ms, Settings().job_max_ttl_ms) == (900_000, 7 * 86_400_000)
    with pytest.raises(SettingsError, match="ECU_JOB_TTL_MS: must lie between ECU_MIN_TTL_MS"):
        Settings.from_env({"ECU_JOB_TTL_MS": "500"})
    with pytest.raises(SettingsError, match=r"ECU_JOB_MAX_TTL_MS \(60000\), got 900000"):
        Settings.from_env({"ECU_JOB_MAX_TTL_MS": "60000"})
    s = Settings.from_env({"ECU_JOB_TTL_MS": "60000", "ECU_JOB_MAX_TTL_MS": "60000"})
    assert (s.job_ttl_ms, s.job_max_ttl_ms) == (60_000, 60_000)


# -- the README's example ------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "approved_job.py"


def test_the_approved_job_example_runs_end_to_end(serve: Any) -> None:
    """examples/approved_job.py (the README's preview -> approve -> workers -> close) against a
    real ``serve``: its accuracy line adds up, and the wallet says the same."""
    from tests.test_cli import clean_env

    org = "example-co"
    cli_json(serve, "grant", org, "25ECU", "--grant-id", "seed")
    args = ["--org", org, "--job-id", "ex-1", "--traces", "40", "--stop-after", "10"]
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", serve.target, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    m = re.fullmatch(
        r"job ex-1 closed: approved (\d+) uECU, committed (\d+) uECU in 10 steps, "
        r"returned (\d+) uECU; accuracy (\d+\.\d)% of the preview",
        last,
    )
    assert m, out.stdout
    approved, committed, returned = (int(m.group(i)) for i in (1, 2, 3))
    assert returned == approved - committed and 0 < committed < approved // 3
    assert m.group(4) == f"{100 * committed / approved:.1f}"
    job = cli_json(serve, "job", "show", org, "ex-1")
    assert (job["approved_uecu"], job["committed_uecu"], job["state"]) == (
        approved, committed, "closed",
    )  # fmt: skip
    b = cli_json(serve, "balance", org)
    assert (b["committed_uecu"], b["held_uecu"]) == (committed, 0)
    assert b["available_uecu"] == 25 * ECU - committed
    conserved(serve, org)
    # Run again, the preview expects what the first run committed (scaled to its worst case).
    again = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", serve.target, *args[:2], "--job-id", "ex-2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert again.returncode == 0, again.stderr
    expected = again.stdout.splitlines()[1]
    assert expected == (
        f"expected: {committed} uECU, as its last 1 closed trace evaluations went"
    ), again.stdout
    assert "expected" not in out.stdout
