"""Approved jobs under concurrency and crashes (issue 16, docs/jobs.md "How it is proved").

- Eight real ``ecu-sidecar serve`` processes on one real Redis draw 1,000 steps of ONE job at
  once (commits below and above the hold, releases), while other traffic drains the wallet to
  zero and the second half of the steps runs at zero available. Under policy refuse the job
  never bills one µECU beyond its approval; under policy wallet what it takes beyond its room
  stays within its bounds. Every step is refused only when it did not fit (the refusal names
  the room), every acknowledged answer adds up to the job's counters, and after the close the
  ledger, drained by the flusher, says exactly what Redis says.
- A worker process using the Python client (``client.job(...)``) is SIGKILLed mid-job, after
  N acknowledged commits and with one step held: nothing it committed is lost (Redis and the
  ledger's rows), its held step expires into the job's room, and a restarted worker finishes
  and closes the job with the money adding up.

The 3-master Redis Cluster's proofs are in tests/test_jobs_cluster.py; the undecodable bytes
of the job RPCs in tests/test_undecodable.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.jobs import JobState
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import GrantKind
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from ecu_sidecar.store.keys import org_keys
from tests.chaos.support import ROOT, SidecarProcess, sidecar_env
from tests.conftest import (
    EXAMPLE_RATE_CARD,
    FAST_RECONNECT,
    REDIS_URL,
    Database,
    assert_conserved,
    drop_keys,
    make_settings,
    open_store,
    require_redis,
    wait_until,
    wait_until_sync,
)
from tests.test_job_ledger import agree
from tests.test_jobs import grant
from tests.test_rebuild import Stack
from tests.test_service import details

ECU = 1_000_000
HOUR_MS = 3_600_000
JUDGE = "gpt-4o-mini"
PCT = Settings().overage_max_percent
SIDECARS = 8
STEPS = 1_000
#: Steps in flight at once, over all sidecars.
IN_FLIGHT = 32


def bound(hold: int) -> int:
    """A step's overage bound (docs/architecture.md): floor(hold × pct / 100)."""
    return hold * PCT // 100


# -- eight `ecu-sidecar serve` processes on one Redis ---------------------------------------------


@dataclass
class Fleet:
    """The sidecar processes of this module: one key prefix, one target each."""

    prefix: str
    procs: list[SidecarProcess]

    @property
    def targets(self) -> list[str]:
        return [p.target for p in self.procs]


def serving(proc: SidecarProcess) -> bool:
    if proc.proc.poll() is not None:
        raise AssertionError(f"sidecar exited at start-up:\n{proc.stderr()}")
    with grpc.insecure_channel(proc.target, options=FAST_RECONNECT) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Eight sidecars started together (started once for the module's tests): no ledger of
    their own (the test drains their outboxes with its flusher, so none is trimmed)."""
    require_redis()
    env = sidecar_env(
        REDIS_URL=REDIS_URL,
        RATE_CARD_FILE=EXAMPLE_RATE_CARD,
        OUTBOX_MAX_LEN=0,
        REDIS_TIMEOUT_MS=5_000,
        EVENT_LOOP="asyncio",
    )
    procs: list[SidecarProcess] = []
    try:
        for _ in range(SIDECARS):
            procs.append(SidecarProcess(env))
        for p in procs:
            wait_until_sync(lambda p=p: serving(p), f"sidecar {p.target} serving", limit_s=60)
        yield Fleet(env["ECU_KEY_PREFIX"], procs)
    finally:
        for p in procs:
            p.close()


@dataclass
class Run:
    """A test's organization on the fleet: a stub per sidecar, the ledger and its flusher."""

    org: str
    stubs: list[Any]
    stack: Stack

    def stub(self, i: int) -> Any:
        return self.stubs[i % len(self.stubs)]


@pytest_asyncio.fixture
async def run(fleet: Fleet, database: Database) -> AsyncIterator[Run]:
    settings = make_settings(
        "redis",
        key_prefix=fleet.prefix,
        ledger_url=database.url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    stack = Stack(settings, ledger)
    channels = [grpc.aio.insecure_channel(t) for t in fleet.targets]
    org = "fleet-" + os.urandom(4).hex()
    try:
        yield Run(org, [quota_pb2_grpc.QuotaStub(c) for c in channels], stack)
    finally:
        for c in channels:
            await c.close()
        client = stack.direct
        keys = org_keys(fleet.prefix, org)
        await client.delete(*keys)
        await stack.store.close()
        await client.aclose()
        ledger.close()


# -- one job's 1,000 steps -----------------------------------------------------------------------


@dataclass
class Step:
    """One planned step and what the sidecars answered."""

    i: int
    hold: int
    action: str
    """'below', 'above' (some beyond the bound) or 'release'."""
    actual: int
    granted: pb.ReserveResponse | None = None
    refusal: dict[str, str] | None = None
    committed: pb.CommitResponse | None = None
    released: pb.ReleaseResponse | None = None

    @property
    def rid(self) -> str:
        return f"step-{self.i:04d}"


def plan(seed: int) -> list[Step]:
    rng = random.Random(seed)
    steps = []
    for i in range(STEPS):
        hold = rng.randint(1_000, 20_000)
        roll = rng.random()
        if roll < 0.55:
            steps.append(Step(i, hold, "below", rng.randint(0, hold)))
        elif roll < 0.8:
            steps.append(Step(i, hold, "above", hold + rng.randint(1, 2 * bound(hold) + 1)))
        else:
            steps.append(Step(i, hold, "release", 0))
    return steps


def meta(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    info = details(exc)["ErrorInfo"]
    return {"code": exc.code().name, "reason": info.reason, **info.metadata}


async def take_step(stub: Any, org: str, job_id: str, s: Step) -> None:
    try:
        s.granted = await stub.Reserve(
            pb.ReserveRequest(
                reservation_id=s.rid,
                account=pb.Account(organization=org),
                amount_uecu=s.hold,
                job_type=pb.JOB_TYPE_JUDGE,
                model=JUDGE,
                ttl_ms=HOUR_MS,
                job_id=job_id,
            ),
            timeout=30,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        s.refusal = meta(exc)
        return
    if s.action == "release":
        s.released = await stub.Release(
            pb.ReleaseRequest(reservation_id=s.rid, organization=org), timeout=30
        )
    else:
        s.committed = await stub.Commit(
            pb.CommitRequest(reservation_id=s.rid, organization=org, actual_uecu=s.actual),
            timeout=30,
        )


@dataclass
class Drain:
    """Other traffic of the organization (no job): what it committed."""

    committed: int = 0
    calls: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)


async def drain_wallet(r: Run, chunk: int, out: Drain, paced: Progress) -> None:
    """Reserve and commit off the job, round the sidecars, until nothing is available: a
    chunk each time the job's steps made ``paced.every`` more steps of progress."""
    available = (await r.stub(0).GetBalance(pb.GetBalanceRequest(organization=r.org))).balance
    left = available.available_uecu
    while left > 0:
        await paced.reached(out.calls * paced.every)
        out.calls += 1
        stub, rid = r.stub(out.calls), f"other-{out.calls}"
        amount = min(chunk, left)
        try:
            await stub.Reserve(
                pb.ReserveRequest(
                    reservation_id=rid,
                    account=pb.Account(organization=r.org),
                    amount_uecu=amount,
                    job_type=pb.JOB_TYPE_GEPA,
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:  # the job's steps took from the wallet meanwhile
            out.refused.append(meta(exc))
            b = await stub.GetBalance(pb.GetBalanceRequest(organization=r.org))
            left = b.balance.available_uecu
            continue
        c = await stub.Commit(
            pb.CommitRequest(reservation_id=rid, organization=r.org, actual_uecu=amount),
            timeout=30,
        )
        out.committed += c.committed_uecu
        left = c.available_uecu


@dataclass
class Progress:
    """Steps done so far, for the drain to keep pace with."""

    every: int
    done: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def step_done(self) -> None:
        async with self.changed:
            self.done += 1
            self.changed.notify_all()

    async def reached(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.done >= n)


async def draw(
    r: Run, job_id: str, steps: list[Step], drained: asyncio.Event, progress: Progress
) -> None:
    """All steps, IN_FLIGHT at a time, step i on sidecar i mod 8; the second half only once
    the wallet is drained."""
    queue = iter(steps)

    async def worker() -> None:
        for s in queue:
            if s.i >= len(steps) // 2:
                await drained.wait()
            await take_step(r.stub(s.i), r.org, job_id, s)
            await progress.step_done()

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


#: The drain's chunks: it ends within the first half of the steps.
CHUNKS = 40


async def drawn_concurrently(
    r: Run, job_id: str, steps: list[Step], budget: int
) -> tuple[Drain, int]:
    """The steps and the drain at once (the drain spread over the first half of the steps);
    the wallet's available once drained."""
    drained = asyncio.Event()
    other = Drain()
    progress = Progress(every=len(steps) // 2 // CHUNKS)

    async def drain() -> None:
        try:
            await drain_wallet(r, budget // CHUNKS, other, progress)
        finally:
            drained.set()

    await asyncio.gather(draw(r, job_id, steps, drained, progress), drain())
    b = (await r.stub(3).GetBalance(pb.GetBalanceRequest(organization=r.org))).balance
    return other, b.available_uecu


def check_answers(steps: list[Step], wallet: bool = False) -> None:
    """What every step's answers say on their own: refused only when it did not fit, each
    commit billed within its hold's bound with the rest recorded unbilled. Under policy wallet
    a step beyond the room may be refused by the wallet, for the part the room lacks."""
    for s in steps:
        if s.refusal is not None:
            got = s.refusal
            assert got["reason"] == "INSUFFICIENT_ECU", got
            # Refused only because it did not fit: what was left was less than what it needed.
            assert int(got["available"]) < int(got["requested"]), got
            if got["scope"] == "job":
                assert int(got["requested"]) == s.hold, got
            else:
                assert wallet and got["scope"] == "organization", got
                assert 0 < int(got["requested"]) <= s.hold, got
            continue
        assert s.granted is not None and s.granted.hold.amount_uecu == s.hold
        if s.action == "release":
            assert s.released is not None
            assert (s.released.released_uecu, s.released.state) == (
                s.hold, pb.HOLD_STATE_RELEASED,
            )  # fmt: skip
            continue
        c = s.committed
        assert c is not None and not c.late
        assert min(s.actual, s.hold) <= c.committed_uecu <= min(s.actual, s.hold + bound(s.hold))
        assert c.unbilled_overage_uecu == s.actual - c.committed_uecu
        assert c.released_uecu == s.hold - min(s.actual, s.hold)


async def job_rows(r: Run, job_id: str) -> tuple[dict[str, tuple[int, ...]], int, tuple[Any, ...]]:
    """The ledger's view of the job: its usage rows by reservation (billed, actual, hold,
    job_uecu, unbilled), the extra its reserve rows drew, and its jobs row."""

    def read() -> tuple[dict[str, tuple[int, ...]], int, tuple[Any, ...]]:
        with r.stack.ledger.backend.transaction(write=False) as tx:
            usage = tx.rows(
                "SELECT reservation_id, amount_uecu, actual_uecu, hold_uecu, job_uecu, "
                "unbilled_uecu FROM usage_entries WHERE org_id = ? AND job_id = ?",
                (r.org, job_id),
            )
            (extra,) = tx.rows(
                "SELECT COALESCE(SUM(extra_uecu), 0) FROM hold_events "
                "WHERE org_id = ? AND job_id = ? AND kind = 'reserve'",
                (r.org, job_id),
            )
            (job,) = tx.rows(
                "SELECT state, approved_uecu, returned_uecu, committed_at_end_uecu "
                "FROM jobs WHERE org_id = ? AND job_id = ?",
                (r.org, job_id),
            )
        return {str(row[0]): tuple(int(v) for v in row[1:]) for row in usage}, int(extra[0]), job

    return await asyncio.to_thread(read)


async def settle_and_close(
    r: Run, job_id: str, steps: list[Step], approved: int
) -> tuple[pb.Job, pb.Job]:
    """The job with every step settled (its counters are the answers' sums), then closed."""
    granted = [s for s in steps if s.granted is not None]
    commits = [s.committed for s in granted if s.committed is not None]
    j = (await r.stub(5).GetJob(pb.GetJobRequest(organization=r.org, job_id=job_id))).job
    assert (j.state, j.held_uecu, j.approved_uecu) == (pb.JOB_STATE_OPEN, 0, approved)
    assert j.committed_uecu == sum(c.committed_uecu for c in commits)
    assert (j.steps, j.steps_committed, j.steps_ended) == (
        len(granted), len(commits), len(granted) - len(commits),
    )  # fmt: skip
    closed = await r.stub(6).CloseJob(pb.CloseJobRequest(organization=r.org, job_id=job_id))
    end = closed.job
    assert (end.state, end.committed_uecu, end.remaining_uecu, end.held_uecu) == (
        pb.JOB_STATE_CLOSED, j.committed_uecu, 0, 0,
    )  # fmt: skip
    assert end.returned_uecu == j.remaining_uecu
    again = await r.stub(7).CloseJob(pb.CloseJobRequest(organization=r.org, job_id=job_id))
    assert again.replayed and again.job == end
    return j, end


async def ledger_agrees(r: Run, job_id: str, steps: list[Step], end: pb.Job) -> Any:
    """Drained by the flusher, the ledger says what Redis and the answers say; returns its
    usage rows of the job."""
    await agree(r.stack, r.org)  # totals and hold counters equal Redis's
    usage, extra, job = await job_rows(r, job_id)
    commits = {s.rid: s for s in steps if s.committed is not None}
    assert set(usage) == set(commits)
    for rid, s in commits.items():
        billed, actual, hold, _, unbilled = usage[rid]
        c = s.committed
        assert c is not None
        assert (billed, actual, hold, unbilled) == (
            c.committed_uecu, s.actual, s.hold, c.unbilled_overage_uecu,
        )  # fmt: skip
    assert sum(u[0] for u in usage.values()) == end.committed_uecu
    assert extra == end.extra_uecu
    assert job == ("closed", end.approved_uecu, end.returned_uecu, end.committed_uecu)
    return usage


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_eight_sidecars_never_bill_a_refuse_job_beyond_its_approval(run: Run) -> None:
    r = run
    steps = plan(16)
    approved = sum(s.hold for s in steps) * 45 // 100  # the room runs out in the second half
    other_budget = 2 * ECU
    await grant(r.stub(0), r.org, approved + other_budget)
    await r.stub(1).ApproveJob(
        pb.ApproveJobRequest(
            job_id="big",
            account=pb.Account(organization=r.org),
            approved_total_uecu=approved,
            job_type=pb.JOB_TYPE_JUDGE,
            ttl_ms=HOUR_MS,
        )
    )

    other, available = await drawn_concurrently(r, "big", steps, other_budget)
    # The wallet is at zero: the job's steps never touch it, so the drain took exactly the rest.
    assert (available, other.committed, other.refused) == (0, other_budget, [])
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await r.stub(2).Reserve(
            pb.ReserveRequest(
                reservation_id="other-late",
                account=pb.Account(organization=r.org),
                amount_uecu=1,
                job_type=pb.JOB_TYPE_GEPA,
            )
        )
    assert meta(ei.value)["scope"] == "organization"

    check_answers(steps)
    second = steps[STEPS // 2 :]
    # Every step of the second half that was granted was granted at zero available.
    assert {s.granted.available_uecu for s in second if s.granted is not None} == {0}
    refused = [s for s in steps if s.refusal is not None]
    assert refused and all(s.refusal["scope"] == "job" for s in refused)  # type: ignore[index]
    assert all(s.refusal["scope_id"] == "big" for s in refused)  # type: ignore[index]
    # Some steps that fit were granted after the room had refused others (the room refills).
    first_refusal = min(s.i for s in refused)
    assert any(s.granted is not None for s in steps[first_refusal:])

    j, end = await settle_and_close(r, "big", steps, approved)
    # Never one µECU beyond the approval: billed from the job's money only, the rest unbilled.
    assert j.committed_uecu <= approved and j.extra_uecu == 0
    assert j.remaining_uecu == approved - j.committed_uecu
    assert end.committed_uecu + end.returned_uecu == approved
    unbilled = sum(s.committed.unbilled_overage_uecu for s in steps if s.committed is not None)
    assert unbilled > 0  # commits beyond what the room held were recorded, not billed

    b = await r.stack.balance(r.org)
    assert (b.held_uecu, b.overage_uecu, b.unbilled_overage_uecu) == (0, 0, unbilled)
    assert b.committed_uecu == other_budget + end.committed_uecu
    assert b.available_uecu == end.returned_uecu
    usage = await ledger_agrees(r, "big", steps, end)
    assert all(billed == job_uecu for billed, _, _, job_uecu, _ in usage.values())


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_eight_sidecars_keep_a_wallet_job_within_its_bounds(run: Run) -> None:
    r = run
    steps = plan(61)
    # The room runs out in the first half: steps draw beyond it from the wallet meanwhile.
    approved = sum(s.hold for s in steps) * 25 // 100
    extra_max = approved * PCT // 100
    other_budget = 2 * ECU
    await grant(r.stub(0), r.org, approved + other_budget)
    j = (
        await r.stub(1).ApproveJob(
            pb.ApproveJobRequest(
                job_id="wide",
                account=pb.Account(organization=r.org),
                approved_total_uecu=approved,
                job_type=pb.JOB_TYPE_JUDGE,
                ttl_ms=HOUR_MS,
                policy=pb.JOB_POLICY_WALLET,
            )
        )
    ).job
    assert j.extra_max_uecu == extra_max

    other, available = await drawn_concurrently(r, "wide", steps, other_budget)
    assert available <= 0
    check_answers(steps, wallet=True)
    second = steps[STEPS // 2 :]
    assert all(s.granted.available_uecu <= 0 for s in second if s.granted is not None)
    assert any(s.granted is not None for s in second)

    j, end = await settle_and_close(r, "wide", steps, approved)
    assert 0 < j.extra_uecu <= extra_max
    usage = await ledger_agrees(r, "wide", steps, end)
    # What a step billed beyond the job's money is a wallet overage within its hold's bound.
    beyond = {rid: billed - job_uecu for rid, (billed, _, _, job_uecu, _) in usage.items()}
    assert all(0 <= v <= bound(usage[rid][2]) for rid, v in beyond.items())
    assert sum(beyond.values()) > 0  # some commits went beyond hold + room: not vacuous
    job_money = sum(u[3] for u in usage.values())
    # The job's money (approval + extra) is what its steps took from it plus what it returned.
    assert job_money + end.returned_uecu == approved + j.extra_uecu
    assert end.committed_uecu == job_money + sum(beyond.values())
    assert end.committed_uecu <= approved + extra_max + sum(bound(s.hold) for s in steps)

    b = await r.stack.balance(r.org)
    assert (b.held_uecu, b.overage_uecu) == (0, sum(beyond.values()))
    assert b.committed_uecu == other.committed + end.committed_uecu
    assert_conserved(b)


# -- a worker SIGKILLed mid-job ------------------------------------------------------------------

WORKER = """
import json, sys
from ecu_sidecar.client import QuotaClient

cfg = json.loads(sys.argv[1])
report = open(cfg["report"], "a", buffering=1)
with QuotaClient(cfg["target"]) as client:
    with client.job(cfg["org"], cfg["job_id"], cfg["approved"], job_type="judge",
                    ttl_ms=cfg["job_ttl_ms"]) as run:
        report.write(json.dumps({"approved": run.view.approved_uecu,
                                 "replayed": run.view.replayed}) + "\\n")
        for i, (hold, actual) in enumerate(cfg["steps"]):
            rid = f"{cfg['name']}-{i}"
            with run.hold(hold, job_type="judge", model=cfg["model"], ttl_ms=cfg["step_ttl_ms"],
                          reservation_id=rid) as step:
                out = step.commit(actual)
                report.write(json.dumps({"committed": rid, "uecu": out.committed_uecu}) + "\\n")
        if cfg["hang"]:
            step = run.hold(cfg["hang"], job_type="judge", model=cfg["model"],
                            ttl_ms=cfg["step_ttl_ms"], reservation_id=cfg["name"] + "-held")
            step.__enter__()
            report.write(json.dumps({"held": step.reservation_id}) + "\\n")
            sys.stdin.read()  # until killed
    report.write(json.dumps({"closed": run.view.returned_uecu,
                             "committed": run.view.committed_uecu}) + "\\n")
"""


def worker(target: str, report: Path, name: str, **cfg: Any) -> subprocess.Popen[bytes]:
    """A worker process: the Python client, each acknowledged commit reported to ``report``
    (one JSON line, written after the answer arrived)."""
    cfg = {"target": target, "report": str(report), "name": name, "hang": 0, **cfg}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )


def reported(report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.endswith("}")]


@dataclass
class Crash:
    """A sidecar on real Redis (no ledger of its own) and the test's store, ledger, flusher."""

    sidecar: SidecarServer
    stack: Stack

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.sidecar.port}"


@pytest_asyncio.fixture
async def crash(database: Database) -> AsyncIterator[Crash]:
    require_redis()
    settings = make_settings(
        "redis", ledger_url=database.url, outbox_max_len=0, flusher_claim_idle_ms=0
    )
    sidecar = SidecarServer(
        make_settings("redis", key_prefix=settings.key_prefix, outbox_max_len=0),
        store=open_store(settings),
    )
    await sidecar.start()
    ledger = open_ledger(database.url)
    ledger.migrate()
    stack = Stack(settings, ledger)
    try:
        yield Crash(sidecar, stack)
    finally:
        await sidecar.stop(grace=0)
        await drop_keys(settings)
        await stack.store.close()
        await stack.direct.aclose()
        ledger.close()


def plan_worker(rng: random.Random, n: int, above: bool) -> list[tuple[int, int]]:
    """``n`` steps (hold, actual); with ``above`` some commit above their hold."""
    holds = [rng.randint(10_000, 90_000) for _ in range(n)]
    return [(h, rng.randint(0, h + (bound(h) if above else 0))) for h in holds]


def acknowledged(lines: list[dict[str, Any]]) -> dict[str, int]:
    return {line["committed"]: line["uecu"] for line in lines if "uecu" in line}


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_worker_killed_mid_job_loses_no_committed_step(
    crash: Crash, tmp_path: Path
) -> None:
    stack, store = crash.stack, crash.stack.store
    org, job_id, approved, step_ttl, hung = "crash-co", "crashy", 3 * ECU, 60_000, 70_000
    rng = random.Random(3)
    first, second = plan_worker(rng, 12, above=True), plan_worker(rng, 5, above=False)
    common = {
        "org": org, "job_id": job_id, "approved": approved, "job_ttl_ms": HOUR_MS,
        "step_ttl_ms": step_ttl, "model": JUDGE,
    }  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await stack.engine.grant(org, "seed", 10 * ECU, GrantKind.TOP_UP)
        # Worker 1 approves the job, commits its steps, holds one more and is SIGKILLed.
        report1 = tmp_path / "worker-1.jsonl"
        procs.append(worker(crash.target, report1, "w1", steps=first, hang=hung, **common))
        lines = await wait_until(
            lambda: (got := reported(report1)) and "held" in got[-1] and got,
            "worker 1 committing its steps and holding one more",
            limit_s=60,
        )
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(timeout=10) == -signal.SIGKILL
        acked = acknowledged(lines)
        assert len(acked) == len(first)

        job = await store.job(org, job_id)
        assert job.state is JobState.OPEN
        assert job.committed_uecu == sum(acked.values())
        assert (job.steps, job.steps_committed, job.steps_held_uecu) == (13, 12, hung)
        assert job.room_uecu == approved - job.committed_uecu - hung

        # Nobody keeps the held step alive now: past its deadline it expires into the room.
        crash.sidecar.store.clock_offset_ms = store.clock_offset_ms = step_ttl + 1_000
        assert (await store.sweep(org)).expired == 1
        job = await store.job(org, job_id)
        assert (job.state, job.steps_held_uecu, job.steps_ended) == (JobState.OPEN, 0, 1)
        assert job.room_uecu == approved - sum(acked.values())

        # A restarted worker enters the same job (its approval's replay), finishes, closes.
        report2 = tmp_path / "worker-2.jsonl"
        procs.append(worker(crash.target, report2, "w2", steps=second, **common))
        _, err = await asyncio.to_thread(procs[1].communicate, None, 60)
        assert procs[1].returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    lines2 = reported(report2)
    assert lines2[0] == {"approved": approved, "replayed": True}
    acked2 = acknowledged(lines2)
    assert acked2 == {f"w2-{i}": actual for i, (_, actual) in enumerate(second)}
    total = sum(acked.values()) + sum(acked2.values())
    assert lines2[-1] == {"closed": approved - total, "committed": total}

    b = await stack.balance(org)
    assert (b.committed_uecu, b.held_uecu, b.balance_uecu) == (total, 0, 10 * ECU - total)
    await agree(stack, org)

    def rows() -> tuple[dict[str, int], list[tuple[Any, ...]]]:
        with stack.ledger.backend.transaction(write=False) as tx:
            usage = tx.rows(
                "SELECT reservation_id, amount_uecu FROM usage_entries "
                "WHERE org_id = ? AND job_id = ?",
                (org, job_id),
            )
            ends = tx.rows(
                "SELECT kind, amount_uecu FROM hold_events WHERE org_id = ? "
                "AND reservation_id = ? AND kind <> 'reserve'",
                (org, "w1-held"),
            )
        return {str(rid): int(amount) for rid, amount in usage}, ends

    usage, ends = await asyncio.to_thread(rows)
    assert usage == {**acked, **acked2}  # every acknowledged commit, nothing more
    assert [(str(k), int(a)) for k, a in ends] == [("expire", hung)]
