"""What a failover took back out of Redis is found and repaired whole, under traffic (issue 18).

With the wait off (ECU_REDIS_WAIT_REPLICAS=0), changes the primary acknowledged and the
flusher moved into the ledger can die with the primary when its replica lagged. The flusher
finds the promoted node's new history (its run and replication ids, recorded per organization:
epoch.lua), fences the organization (changes answer UNAVAILABLE/REBUILDING), drains its outbox
and rebuilds it from the ledger: every counter, every hold, not only the balance. The events
the promoted node emits again for changes the ledger already holds are duplicates, not
conflicts, and a hold ends once. Against a real primary and replica behind a TCP proxy (the
stable address a failover is repointed behind), the ledger on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from ecu_sidecar import errors
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind, JobType, ReserveItem, Usage
from ecu_sidecar.store.keys import org_keys
from tests.conftest import Database, drop_keys, make_settings, require_redis, wait_until
from tests.replicated_redis import ReplicatedRedis
from tests.tcp_proxy import TcpProxy
from tests.test_flusher import Stack

ACCOUNT = AccountRef("acme", "t1", "p1", "u1")


def item(rid: str, amount: int = 10_000) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.INFERENCE, "gpt-4o", 600_000)


def used(rid: str, actual: int) -> CommitItem:
    return CommitItem(rid, actual, Usage(10, 5, 1))


@pytest_asyncio.fixture
async def stack(pair: ReplicatedRedis, database: Database) -> AsyncIterator[tuple[Stack, Any]]:
    proxy = TcpProxy(pair.primary.port)
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        redis_timeout_ms=1_000,
        redis_connect_timeout_ms=300,
        ledger_url=database.url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
        rebuild_fence_ms=5_000,
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    s = Stack(settings, ledger)
    try:
        yield s, proxy
    finally:
        await s.store.close()
        ledger.close()
        proxy.close()


async def retrying(call: Any) -> Any:
    """A worker's retry with the same ids: through the failover's unavailability and the
    rebuild's fence."""

    async def served() -> tuple[Any] | None:
        try:
            return (await call(),)
        except errors.StoreUnavailable:
            return None

    (result,) = await wait_until(served, "served again")
    return result


async def fail_over(pair: ReplicatedRedis, proxy: TcpProxy) -> None:
    await asyncio.to_thread(pair.kill_primary_and_promote)
    proxy.retarget(pair.replica.port)
    proxy.cut()


async def test_changes_the_ledger_holds_and_redis_lost_are_restored_under_traffic(
    pair: ReplicatedRedis, stack: tuple[Stack, Any]
) -> None:
    s, proxy = stack
    org = ACCOUNT.organization
    await s.engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
    for rid in ("a", "b", "c"):
        await s.engine.reserve(ACCOUNT, [item(rid)])
    await s.engine.commit(org, [used("a", 4_000)])
    await s.flusher.drain()
    assert await s.flusher.reconcile() == {org: 0}  # records the node's epoch

    # Acknowledged, and moved into the ledger, while the replica held them back.
    pair.hold_back()
    await s.engine.commit(org, [used("b", 7_000)])
    await s.engine.release(org, "c")
    await s.engine.reserve(ACCOUNT, [item("d", 20_000)])
    await s.engine.grant(org, "g2", 50_000, GrantKind.TOP_UP)
    assert await s.flusher.drain() == 4
    await fail_over(pair, proxy)

    # The promoted node never saw them: b is active again, c held, d and g2 unknown.
    lost = await retrying(lambda: s.engine.balance(org))
    assert (lost.committed_uecu, lost.granted_uecu, lost.outstanding_holds) == (4_000, 1_000_000, 2)

    # Traffic goes on meanwhile, retrying through the rebuild's fence: some steps before the
    # rebuild, some after it (counted, not slept for).
    stop = asyncio.Event()
    steps = 0

    async def traffic() -> None:
        nonlocal steps
        while not stop.is_set():
            rid = f"t{steps}"
            for call in (
                lambda rid=rid: s.engine.reserve(ACCOUNT, [item(rid, 1_000)]),
                lambda rid=rid: s.engine.commit(org, [used(rid, 500)]),
            ):
                await retrying(call)
            steps += 1

    worker = asyncio.create_task(traffic())
    try:
        await wait_until(lambda: steps >= 3 or worker.done(), "traffic before the rebuild")
        await retrying(s.flusher.reconcile)  # finds the new epoch: fences, drains, rebuilds
        after = steps
        await wait_until(lambda: steps >= after + 3 or worker.done(), "traffic after it")
    finally:
        stop.set()
        await worker
    assert steps > 0
    assert s.metric("ecu_flusher_history_rebuilds_total") == 1
    assert s.metric("ecu_hydrations_total") == 1

    await s.flusher.drain()
    b = await s.engine.balance(org)
    assert b.conservation_faults() == [], b.conservation_faults()
    traffic_committed = 500 * steps
    assert b.committed_uecu == 4_000 + 7_000 + traffic_committed
    assert b.granted_uecu == 1_050_000
    assert b.balance_uecu == 1_050_000 - b.committed_uecu
    assert (b.outstanding_holds, b.held_uecu) == (1, 20_000)  # d, restored live

    # The ledger agrees, counts every change once and quarantined nothing.
    c = s.ledger.conservation(org)
    assert c is not None and c.ok, c
    assert (c.granted_uecu, c.committed_uecu, c.balance_uecu) == (
        b.granted_uecu,
        b.committed_uecu,
        b.balance_uecu,
    )
    assert s.ledger.quarantined(org=org) == []

    # Retries of the lost changes are answered as what the ledger holds, not applied again.
    [again] = await s.engine.commit(org, [used("b", 7_000)])
    assert again.error is None and again.replayed and again.committed_uecu == 7_000
    [released] = await s.engine.commit(org, [used("c", 1_000)])
    assert isinstance(released.error, errors.HoldReleased)
    [done] = await s.engine.commit(org, [used("d", 15_000)])
    assert done.error is None and done.committed_uecu == 15_000
    await s.flusher.drain()
    assert s.ledger.conservation(org).committed_uecu == b.committed_uecu + 15_000  # type: ignore[union-attr]
    final = await s.engine.balance(org)
    assert final.conservation_faults() == []
    assert final.committed_uecu == b.committed_uecu + 15_000


async def test_the_fence_refuses_changes_until_the_rebuild(
    pair: ReplicatedRedis, stack: tuple[Stack, Any]
) -> None:
    """A changed epoch fences the organization: every change answers REBUILDING (changing
    nothing), reads answer, sweeps and notices wait; the rebuild lifts the fence, and a fence
    whose flusher died lapses by itself."""
    s, _proxy = stack
    org = "fenced-" + uuid.uuid4().hex[:6]
    account = AccountRef(org)
    await s.engine.grant(org, "g1", 100_000, GrantKind.TOP_UP)
    await s.engine.reserve(account, [item("r1", 90_000)])
    # The account recorded the node's epoch when its first grant created it.
    now = (await s.store.epochs([org]))[org]
    assert now and await s.store.check_epoch(org, now, 60_000) is None
    assert await s.store.check_epoch(org, "run-1:repl-2", 3_600_000) == now
    before = await s.engine.balance(org)
    raw = aioredis.Redis(port=pair.primary.port)
    keys = org_keys(s.settings.key_prefix, org)
    try:
        outbox = await raw.xlen(keys[4])
        attempts: list[Any] = [
            lambda: s.store.reserve(account, [item("r2", 1_000)]),
            lambda: s.store.commit(org, [used("r1", 10)], 0),
            lambda: s.store.release(org, "r1"),
            lambda: s.store.extend(org, "r1", 60_000, 1),
            lambda: s.store.grant(org, "g2", 1_000, GrantKind.TOP_UP, 0),
            lambda: s.store.set_cap(org, "team", "t1", 5_000),
            lambda: s.store.set_auto_topup(org, 10_000, 50_000),
        ]
        for attempt in attempts:
            with pytest.raises(errors.Rebuilding) as ei:
                await attempt()
            assert ei.value.reason == "REBUILDING"
            assert org in ei.value.message
            assert 0 < int(ei.value.metadata["retry_after_ms"]) <= 3_600_000
        # The hold's deadline passes: no sweep while fenced (it would add to the outbox).
        s.store.clock_offset_ms = 700_000
        after = await s.store.balance(org)
        assert (after.outstanding_holds, after.held_uecu) == (1, 90_000)
        assert after.committed_uecu == before.committed_uecu
        assert await raw.xlen(keys[4]) == outbox  # nothing emitted

        # A fence lapses when nobody lifts it.
        s.store.clock_offset_ms = 0
        await raw.hset(keys[0], "fence", "1")
        out = await s.store.reserve(account, [item("r2", 1_000)])
        assert not out.replayed

        # The rebuild lifts it, and records the epoch of the node it rebuilt on.
        assert await s.store.check_epoch(org, "run-2:repl-3", 60_000) == now  # until rebuilt
        assert await s.flusher.reconciler.rebuild_fenced(org)
        assert await s.store.check_epoch(org, now, 60_000) is None
        assert await raw.hget(keys[0], "fence") is None
        rebuilt = await s.engine.balance(org)
        assert rebuilt.conservation_faults() == []
        assert (rebuilt.outstanding_holds, rebuilt.held_uecu) == (2, 91_000)
    finally:
        await raw.aclose()


async def test_epochs_name_the_node_history(
    pair: ReplicatedRedis, stack: tuple[Stack, Any]
) -> None:
    """The epoch is the node's run id and replication id: a promotion changes it."""
    s, proxy = stack
    first = (await s.store.epochs(["x"]))["x"]
    run_id, _, replid = first.partition(":")
    assert len(run_id) == 40 and len(replid) == 40
    assert (await s.store.epochs(["y"]))["y"] == first
    await fail_over(pair, proxy)
    second = (await retrying(lambda: s.store.epochs(["x"])))["x"]
    assert second != first and second.partition(":")[0] != run_id


async def test_a_fenced_organization_answers_unavailable_rebuilding_over_grpc(
    tmp_path: object,
) -> None:
    """Over the wire: UNAVAILABLE with reason REBUILDING and retry_after_ms in the ErrorInfo,
    and degraded mode decides nothing locally (Redis answered; the caller's retry is served)."""
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.api.v1 import quota_pb2_grpc
    from ecu_sidecar.server import SidecarServer
    from tests.conftest import ADMIN_METADATA

    require_redis()
    settings = make_settings(
        "redis", degraded_allowance_uecu=1_000, degraded_journal=f"{tmp_path}/degraded.jsonl"
    )
    server = SidecarServer(settings)
    await server.start()
    org = "fenced-" + uuid.uuid4().hex[:6]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization=org, amount_uecu=1_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            store = server.engine.store
            now = (await store.epochs([org]))[org]
            assert await store.check_epoch(org, "a:c", 60_000) == now
            reserve = pb.ReserveRequest(
                reservation_id="r1",
                account=pb.Account(organization=org),
                amount_uecu=10,
                job_type=pb.JOB_TYPE_GEPA,
            )
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(reserve, timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(ei.value)
            info = error_details_pb2.ErrorInfo()
            assert status is not None and status.details[0].Unpack(info)
            assert info.reason == "REBUILDING"
            assert 0 < int(info.metadata["retry_after_ms"]) <= 60_000
            assert server.engine.journal is not None
            assert server.engine.journal.pending() == 0  # nothing decided locally
            b = await store.balance(org)
            assert (b.outstanding_holds, b.balance_uecu) == (0, 1_000)
    finally:
        await server.stop(grace=0)
        await drop_keys(settings)
