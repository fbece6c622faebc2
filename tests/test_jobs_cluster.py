"""Approved jobs on a real 3-master Redis Cluster (started from redis-server by the suite;
issue 16, docs/jobs.md "How it is proved").

One organization on each master, all at once, through a gRPC sidecar on the cluster: a job
completes all its steps after other traffic drained the wallet to zero; a job short-circuited
after 10 % of its steps returns exactly the rest on close; a replayed close changes no key;
the ledger, drained by the flusher, agrees with Redis. Then the rebuild scenarios of
tests/test_job_ledger.py on the cluster: an open job restored exactly after a full or partial
loss of its organization's keys, and a closed one answering a replayed close.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from redis.crc import key_slot

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.server import SidecarServer
from tests.conftest import ADMIN_METADATA, drop_keys, make_settings, snapshot
from tests.redis_cluster import RedisClusterProcess, slot_owners
from tests.test_job_ledger import agree
from tests.test_job_ledger import (
    test_a_closed_job_answers_a_replayed_close_after_a_full_loss as closed_after_loss,
)
from tests.test_job_ledger import test_a_rebuild_restores_an_open_job_exactly as rebuilt_exactly
from tests.test_rebuild import Stack

pytestmark = pytest.mark.cluster

ECU = 1_000_000
HOUR_MS = 3_600_000
JUDGE = "gpt-4o-mini"


@pytest_asyncio.fixture
async def stack(redis_cluster: RedisClusterProcess, tmp_path: Path) -> AsyncIterator[Stack]:
    """Store, ledger (SQLite), engine and flusher of one test on the cluster."""
    settings = make_settings(
        "redis",
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_timeout_ms=2_000,
        redis_connect_timeout_ms=2_000,
        ledger_url=f"sqlite://{tmp_path}/ledger.db",
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
    )
    ledger = open_ledger(settings.ledger_url)
    ledger.migrate()
    s = Stack(settings, ledger)
    assert s.store.kind == "cluster"
    yield s
    await drop_keys(settings)
    await s.store.close()
    await s.direct.aclose()
    ledger.close()


def one_per_master(redis_cluster: RedisClusterProcess) -> list[str]:
    """Three organization ids whose hash tags land on three different masters."""
    owners = slot_owners(redis_cluster.ports[0])

    def master(org: str) -> int:
        slot = key_slot(org.encode())
        return next(p for p, ranges in owners.items() if any(lo <= slot <= hi for lo, hi in ranges))

    chosen: dict[int, str] = {}
    for i in range(200):
        chosen.setdefault(master(f"jobs-{i}"), f"jobs-{i}")
    assert len(chosen) == len(redis_cluster.ports) == 3
    return sorted(chosen.values())


async def refused(call: Any) -> dict[str, str]:
    from tests.test_service import details

    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    info = details(ei.value)["ErrorInfo"]
    return {"code": ei.value.code().name, "reason": info.reason, **info.metadata}


async def life_of_two_jobs(stub: Any, settings: Any, org: str) -> int:
    """One organization's scenario; returns what it committed in all."""
    await stub.Grant(
        pb.GrantRequest(
            grant_id="seed", organization=org, amount_uecu=10 * ECU, kind=pb.GRANT_KIND_TOP_UP
        ),
        metadata=ADMIN_METADATA,
    )
    acct = pb.Account(organization=org)

    async def approve(job_id: str, amount: int) -> pb.Job:
        request = pb.ApproveJobRequest(
            job_id=job_id,
            account=acct,
            approved_total_uecu=amount,
            job_type=pb.JOB_TYPE_JUDGE,
            ttl_ms=HOUR_MS,
        )
        return (await stub.ApproveJob(request)).job

    def step(rid: str, amount: int, job_id: str) -> Any:
        return stub.Reserve(
            pb.ReserveRequest(
                reservation_id=rid,
                account=acct,
                amount_uecu=amount,
                job_type=pb.JOB_TYPE_JUDGE,
                model=JUDGE,
                ttl_ms=HOUR_MS,
                job_id=job_id,
            )
        )

    async def commit(rid: str, actual: int) -> pb.CommitResponse:
        return await stub.Commit(
            pb.CommitRequest(reservation_id=rid, organization=org, actual_uecu=actual)
        )

    assert (await approve("run", 4 * ECU)).remaining_uecu == 4 * ECU  # 20 steps of 0.2 ECU
    assert (await approve("short", 2 * ECU)).remaining_uecu == 2 * ECU  # 100 steps of 20,000

    # Other traffic (no job) drains the wallet to zero.
    other = pb.ReserveRequest(
        reservation_id="other", account=acct, amount_uecu=4 * ECU, job_type=pb.JOB_TYPE_GEPA
    )
    assert (await stub.Reserve(other)).available_uecu == 0
    assert (await commit("other", 4 * ECU)).available_uecu == 0
    one_more = pb.ReserveRequest(
        reservation_id="other-2", account=acct, amount_uecu=1, job_type=pb.JOB_TYPE_GEPA
    )
    got = await refused(stub.Reserve(one_more))
    assert (got["code"], got["scope"], got["available"]) == (
        "RESOURCE_EXHAUSTED",
        "organization",
        "0",
    )

    # Every step of the run is granted at zero available.
    for i in range(20):
        s = await step(f"run-{i}", 200_000, "run")
        assert (s.available_uecu, s.job_remaining_uecu) == (0, 4 * ECU - 200_000 * (i + 1))
    for i in range(20):
        c = await commit(f"run-{i}", 150_000)
        assert (c.committed_uecu, c.released_uecu, c.available_uecu) == (150_000, 50_000, 0)

    # The other job stops after 10 % of its 100 steps: its close returns exactly the rest.
    short = 0
    for i in range(10):
        await step(f"short-{i}", 20_000, "short")
        short += (await commit(f"short-{i}", 11_000 + 999 * i)).committed_uecu
    assert short == 10 * 11_000 + 999 * 45
    closed = await stub.CloseJob(pb.CloseJobRequest(organization=org, job_id="short"))
    assert (closed.job.state, closed.job.committed_uecu, closed.job.returned_uecu) == (
        pb.JOB_STATE_CLOSED, short, 2 * ECU - short,
    )  # fmt: skip
    assert closed.available_uecu == 2 * ECU - short

    # A replayed close answers the same and changes no key of the organization.
    async def keys() -> dict[bytes, Any]:
        tag = b"{" + org.encode() + b"}"
        return {k: v for k, v in (await snapshot(settings)).items() if tag in k}

    before = await keys()
    assert len(before) >= 6
    again = await stub.CloseJob(pb.CloseJobRequest(organization=org, job_id="short"))
    assert again.replayed and again.job == closed.job
    assert await keys() == before

    run = await stub.CloseJob(pb.CloseJobRequest(organization=org, job_id="run"))
    assert (run.job.committed_uecu, run.job.returned_uecu) == (3 * ECU, 1 * ECU)
    assert run.available_uecu == 2 * ECU - short + 1 * ECU
    b = (await stub.GetBalance(pb.GetBalanceRequest(organization=org))).balance
    assert (b.held_uecu, b.committed_uecu) == (0, 4 * ECU + 3 * ECU + short)
    assert b.available_uecu == 10 * ECU - b.committed_uecu
    return b.committed_uecu


async def test_jobs_on_every_master_complete_at_zero_balance_and_return_the_rest(
    redis_cluster: RedisClusterProcess, stack: Stack
) -> None:
    orgs = one_per_master(redis_cluster)
    # The sidecar has no ledger of its own: the test's flusher drains the outboxes.
    sidecar_settings = make_settings(
        "redis",
        key_prefix=stack.settings.key_prefix,
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_timeout_ms=2_000,
        redis_connect_timeout_ms=2_000,
    )
    server = SidecarServer(sidecar_settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            spent = await asyncio.gather(
                *(life_of_two_jobs(stub, stack.settings, org) for org in orgs)
            )
    finally:
        await server.stop(grace=0)
    assert spent == [7 * ECU + 10 * 11_000 + 999 * 45] * 3
    for org in orgs:
        await agree(stack, org)  # the ledger holds what Redis holds, hold counters too
        rows = await asyncio.to_thread(stack.ledger.consumption, org, by="job")
        assert sorted((r.key, r.amount_uecu) for r in rows) == sorted(
            [("", 4 * ECU), ("run", 3 * ECU), ("short", 10 * 11_000 + 999 * 45)]
        )


@pytest.mark.parametrize("lost", ["all", "jobs", "jsteps", "acct"])
async def test_a_rebuild_on_the_cluster_restores_an_open_job_exactly(
    stack: Stack, lost: str
) -> None:
    """tests/test_job_ledger.py's scenario, its keys on one of the cluster's masters."""
    await rebuilt_exactly(stack, lost)


async def test_a_closed_job_answers_a_replayed_close_after_a_full_loss_on_the_cluster(
    stack: Stack,
) -> None:
    await closed_after_loss(stack)
