"""Degraded mode: fail-closed by default; with an allowance, bounded local grants journaled on
disk, replayed exactly once when Redis returns, surviving a SIGKILL of the sidecar."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.degraded import Journal
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import SettingsError
from tests.conftest import ADMIN_METADATA, ADMIN_TOKEN, make_settings
from tests.test_cli import clean_env, free_port
from tests.test_unavailable import PrivateRedis

ALLOWANCE = 1_000
ORG = pb.Account(organization="acme")


@pytest.fixture
def redis(private_redis: PrivateRedis) -> PrivateRedis:
    return private_redis


def reserve(rid: str, amount: int) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=rid, account=ORG, amount_uecu=amount, job_type=pb.JOB_TYPE_GEPA
    )


def commit(rid: str, actual: int) -> pb.CommitRequest:
    return pb.CommitRequest(
        reservation_id=rid, organization="acme", actual_uecu=actual, usage=pb.Usage(calls=1)
    )


async def wait_replayed(journal: Journal) -> None:
    for _ in range(400):
        if journal.pending() == 0:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{journal.pending()} journal entries never replayed")


def test_an_allowance_needs_a_journal() -> None:
    with pytest.raises(SettingsError, match="ECU_DEGRADED_JOURNAL"):
        make_settings("embedded", degraded_allowance_uecu=1_000)


async def test_bounded_local_grants_then_exact_replay(redis: PrivateRedis, tmp_path: Path) -> None:
    journal_path = tmp_path / "degraded.jsonl"
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{redis.port}/0",
        redis_timeout_ms=150,
        redis_connect_timeout_ms=150,
        sweep_interval_ms=50,
        degraded_allowance_uecu=ALLOWANCE,
        degraded_journal=str(journal_path),
    )
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = quota_pb2_grpc.QuotaStub(ch)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=10_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            before = await stub.Reserve(reserve("before", 2_000))  # a hold that lives in Redis
            assert not before.degraded

            redis.freeze()  # unreachable, state kept
            r1 = await stub.Reserve(reserve("r1", 600), timeout=5)
            assert r1.degraded and r1.available_uecu == ALLOWANCE - 600
            assert (await stub.Reserve(reserve("r1", 600), timeout=5)).hold.amount_uecu == 600
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(reserve("r2", 500), timeout=5)  # past the allowance
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "allowance" in ei.value.details()
            c1 = await stub.Commit(commit("r1", 450), timeout=5)
            assert c1.degraded and c1.committed_uecu == 450 and c1.released_uecu == 150
            c0 = await stub.Commit(commit("before", 1_500), timeout=5)  # usage never dropped
            assert c0.degraded and c0.committed_uecu == 1_500
            r3 = await stub.Reserve(reserve("r3", 300), timeout=5)
            assert r3.degraded
            rel = await stub.Release(
                pb.ReleaseRequest(reservation_id="r3", organization="acme"), timeout=5
            )
            assert rel.degraded and rel.released_uecu == 300
            lines = [json.loads(x) for x in journal_path.read_text().splitlines()]
            assert [x["op"] for x in lines] == [
                "reserve",
                "commit",
                "remote_commit",
                "reserve",
                "release",
            ]

            sample = server.registry.get_sample_value
            assert sample("ecu_degraded_grants_total") == 2  # r1 and r3; the replay of r1 not
            assert sample("ecu_degraded_granted_uecu_total") == 600 + 300
            assert sample("ecu_degraded_journal_pending") == 3
            redis.thaw()
            await wait_replayed(server.journal)
            assert sample("ecu_degraded_journal_pending") == 0
            b = (await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))).balance
            assert b.committed_uecu == 450 + 1_500
            assert b.balance_uecu == 10_000 - 450 - 1_500
            # r1's reserve may also have reached Redis (it was on the wire when Redis froze):
            # then its replayed commit settles that hold, otherwise it bills a hold-less commit.
            # Either way it is billed once and nothing stays held.
            assert b.held_uecu == 0
            assert b.orphan_committed_uecu + b.committed_from_holds_uecu == 450 + 1_500
            assert journal_path.read_text() == "", "a fully replayed journal is truncated"
            # Replays are idempotent: the ids are in Redis now.
            again = await stub.Commit(commit("r1", 450))
            assert again.replayed and not again.degraded
    finally:
        redis.thaw()
        await server.stop(grace=0)


async def test_the_journal_survives_a_sigkill(redis: PrivateRedis, tmp_path: Path) -> None:
    journal_path = tmp_path / "degraded.jsonl"
    port = free_port()
    env = clean_env(
        ECU_LISTEN=f"127.0.0.1:{port}",
        ECU_ADMIN_TOKEN=ADMIN_TOKEN,
        ECU_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        ECU_REDIS_TIMEOUT_MS="150",
        ECU_REDIS_CONNECT_TIMEOUT_MS="150",
        ECU_SWEEP_INTERVAL_MS="50",
        ECU_DEGRADED_ALLOWANCE_UECU=str(ALLOWANCE),
        ECU_DEGRADED_JOURNAL=str(journal_path),
    )

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ecu_sidecar", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(ch: grpc.aio.Channel) -> None:
        await asyncio.wait_for(ch.channel_ready(), timeout=30)

    proc = serve()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await ready(ch)
            stub = quota_pb2_grpc.QuotaStub(ch)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=10_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
                timeout=5,
            )
            redis.freeze()
            assert (await stub.Reserve(reserve("k1", 700), timeout=5)).degraded
            assert (await stub.Commit(commit("k1", 640), timeout=5)).degraded
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        redis.thaw()
        proc = serve()  # a new process finds the journal and replays it
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await ready(ch)
            stub = quota_pb2_grpc.QuotaStub(ch)
            for _ in range(400):
                b = (await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))).balance
                if b.committed_uecu:
                    break
                await asyncio.sleep(0.025)
            assert (b.committed_uecu, b.balance_uecu) == (640, 10_000 - 640)
    finally:
        redis.thaw()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
