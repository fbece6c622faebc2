"""Acknowledged means durable (ECU_REDIS_WAIT_REPLICAS): a mutation is answered OK only once
the configured replicas hold its write; otherwise UNAVAILABLE with reason
REPLICATION_UNCONFIRMED, an unknown outcome that a retry with the same id settles. Against a
real primary and replica started by the test (tests/replicated_redis.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.errors import ReplicationUnconfirmed, StoreUnavailable
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitItem,
    GrantKind,
    JobType,
    ReserveItem,
    Usage,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import SettingsError, parse_sentinel_url
from ecu_sidecar.store import RedisStore, Transport
from ecu_sidecar.store.keys import org_keys
from tests.conftest import ADMIN_METADATA, make_settings, wait_until, wait_until_sync
from tests.replicated_redis import ReplicatedRedis

WAIT_MS = 100


def durable_settings(pair: ReplicatedRedis, replicas: int = 1) -> object:
    return make_settings(
        "redis",
        redis_url=pair.url,
        redis_wait_replicas=replicas,
        redis_wait_timeout_ms=WAIT_MS,
        redis_timeout_ms=2_000,
    )


@pytest_asyncio.fixture(params=["multiplexed", "pool"])
async def store(request: pytest.FixtureRequest, pair: ReplicatedRedis) -> AsyncIterator[RedisStore]:
    """A store with the wait on, with and without the multiplexed connection (redis://; the
    pool alone is what rediss:// and Sentinel URLs use). Confirmed scripts take the pool in
    both; reads take the multiplexed connection where there is one."""
    settings = durable_settings(pair)
    transport = Transport.multiplexed if request.param == "multiplexed" else Transport.pooled
    st = RedisStore(transport(settings), settings)  # type: ignore[arg-type]
    yield st
    await st.close()


def item(rid: str, amount: int = 100) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.GEPA, "", 60_000, "", "")


def commit_item(rid: str, actual: int) -> CommitItem:
    return CommitItem(rid, actual, Usage(0, 0, 0), "", "")


def balance_of(store: RedisStore, org: str) -> Callable[[], Awaitable[Balance | None]]:
    """For wait_until: the balance of ``org``, or None while the store is unavailable."""

    async def read() -> Balance | None:
        try:
            return await store.balance(org)
        except StoreUnavailable:
            return None

    return read


async def on_replica(pair: ReplicatedRedis, prefix: str, org: str, rid: str) -> bool:
    client = aioredis.Redis(port=pair.replica.port)
    try:
        return bool(await client.hexists(org_keys(prefix, org)[1], rid))
    finally:
        await client.aclose()


async def test_an_acknowledged_write_is_on_the_replica(
    store: RedisStore, pair: ReplicatedRedis
) -> None:
    org = "org-" + uuid.uuid4().hex[:8]
    prefix = store.key_prefix
    await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
    for i in range(20):
        out = await store.reserve(AccountRef(org), [item(f"r{i}")])
        assert not out.replayed
        # Confirmed before answered: the replica holds it now, not eventually.
        assert await on_replica(pair, prefix, org, f"r{i}")
    committed = await store.commit(org, [commit_item("r0", 60)], 0)
    assert committed.outcomes[0].error is None and committed.outcomes[0].committed_uecu == 60
    b = await store.balance(org)
    assert b.conservation_faults() == []


async def test_an_unconfirmed_write_is_unavailable_and_its_retry_a_replay(
    store: RedisStore, pair: ReplicatedRedis
) -> None:
    org = "org-" + uuid.uuid4().hex[:8]
    await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
    await store.reserve(AccountRef(org), [item("before")])
    pair.hold_back()
    with pytest.raises(ReplicationUnconfirmed) as ei:
        await store.reserve(AccountRef(org), [item("held")])
    assert isinstance(ei.value, StoreUnavailable)  # an unknown outcome, like any UNAVAILABLE
    assert "durability is unconfirmed" in ei.value.message
    assert "0 of 1 replicas" in ei.value.message
    assert ei.value.metadata == {"acknowledged": "0", "required": "1"}
    with pytest.raises(ReplicationUnconfirmed):
        await store.commit(org, [commit_item("before", 50)], 0)
    # A retry while the replica still lags writes nothing new, yet is not acknowledged
    # either: the fence makes its WAIT cover the first attempt's write, whichever connection
    # carried it.
    with pytest.raises(ReplicationUnconfirmed):
        await store.reserve(AccountRef(org), [item("held")])
    # Reads do not wait. (The primary did run both: "held" reserved, "before" committed.)
    seen = await store.balance(org)
    assert (seen.outstanding_holds, seen.committed_uecu) == (1, 50)
    pair.let_go()
    again = await store.reserve(AccountRef(org), [item("held")])
    assert again.replayed
    done = await store.commit(org, [commit_item("before", 50)], 0)
    assert done.outcomes[0].replayed and done.outcomes[0].committed_uecu == 50
    b = await store.balance(org)
    assert (b.outstanding_holds, b.held_uecu, b.committed_uecu) == (1, 100, 50)
    assert b.conservation_faults() == []


async def test_a_waiting_write_holds_up_no_other_call(pair: ReplicatedRedis) -> None:
    """WAIT blocks the connection it is sent on: each confirmed call has its own. Twenty
    writes waiting at once for a held-back replica each answer REPLICATION_UNCONFIRMED after
    one wait (100 ms), and a read meanwhile answers at once; queued behind one another on a
    shared connection they would need 2 s, past the 1 s call bound, and answer "did not
    answer" instead."""
    settings = make_settings(
        "redis",
        redis_url=pair.url,
        redis_wait_replicas=1,
        redis_wait_timeout_ms=WAIT_MS,
        redis_timeout_ms=1_000,
    )
    store = RedisStore.from_settings(settings)
    try:
        org = "org-" + uuid.uuid4().hex[:8]
        await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
        pair.hold_back()
        writes = [store.reserve(AccountRef(org), [item(f"r{i}", 10)]) for i in range(20)]
        *outcomes, read = await asyncio.gather(*writes, store.balance(org), return_exceptions=True)
        assert all(isinstance(o, ReplicationUnconfirmed) for o in outcomes), outcomes
        assert not isinstance(read, Exception), read
        assert (await store.balance(org)).outstanding_holds == 20  # the primary ran them all
    finally:
        await store.close()


async def test_no_wait_when_off(pair: ReplicatedRedis) -> None:
    """ECU_REDIS_WAIT_REPLICAS=0: answered without the replica (the write may be lost)."""
    store = RedisStore.from_settings(durable_settings(pair, replicas=0))  # type: ignore[arg-type]
    try:
        org = "org-" + uuid.uuid4().hex[:8]
        await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
        pair.hold_back()
        out = await store.reserve(AccountRef(org), [item("r")])
        assert out.holds[0].amount_uecu == 100
        assert not await on_replica(pair, store.key_prefix, org, "r")
    finally:
        await store.close()


async def test_more_replicas_than_exist_never_confirm(pair: ReplicatedRedis) -> None:
    store = RedisStore.from_settings(durable_settings(pair, replicas=2))  # type: ignore[arg-type]
    try:
        with pytest.raises(ReplicationUnconfirmed) as ei:
            await store.grant("org-x", "g1", 10_000, GrantKind.TOP_UP, 0)
        assert "1 of 2 replicas" in ei.value.message
    finally:
        await store.close()


async def test_grpc_answers_unavailable_with_its_own_reason(pair: ReplicatedRedis) -> None:
    server = SidecarServer(durable_settings(pair))  # type: ignore[arg-type]
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=1_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            request = pb.ReserveRequest(
                reservation_id="r1",
                account=pb.Account(organization="acme"),
                amount_uecu=10,
                job_type=pb.JOB_TYPE_GEPA,
            )
            pair.hold_back()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(request, timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(ei.value)
            assert status is not None and "durability is unconfirmed" in status.message
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            assert info.reason == "REPLICATION_UNCONFIRMED"
            assert (
                server.registry.get_sample_value(
                    "ecu_rpc_errors_total",
                    {"method": "Reserve", "reason": "REPLICATION_UNCONFIRMED"},
                )
                == 1
            )
            assert (
                server.registry.get_sample_value(
                    "ecu_redis_script_errors_total", {"script": "reserve", "error": "unconfirmed"}
                )
                == 1
            )
            # The balance is a read: answered while the replica lags.
            balance = await stub.GetBalance(pb.GetBalanceRequest(organization="acme"), timeout=5)
            assert balance.balance.held_uecu == 10
            pair.let_go()
            out = await stub.Reserve(request, timeout=5)
            assert out.replayed and out.hold.amount_uecu == 10
    finally:
        await server.stop(grace=0)


async def test_the_flusher_meets_a_demoted_primary_as_unavailable(pair: ReplicatedRedis) -> None:
    """READONLY to the flusher's own commands (XACK, XREADGROUP on a replica) is Redis
    unavailable, so the flusher backs off, not a ledger write failure."""
    settings = make_settings("redis", redis_url=f"redis://127.0.0.1:{pair.replica.port}/0")
    store = RedisStore.from_settings(settings)
    primary = aioredis.Redis(port=pair.primary.port)
    try:
        key = store.outbox_key("acme")
        await primary.xgroup_create(key, "ledger", id="0", mkstream=True)
        eid = await primary.xadd(key, {"e": "1"})
        pair.wait_linked()
        reader = store.outbox("c1")
        with pytest.raises(StoreUnavailable) as ei:
            await reader.read(["acme"], 10)
        assert "READONLY" in ei.value.message or "ReadOnlyError" in ei.value.message
        from ecu_sidecar.store.outbox import OutboxEntry

        with pytest.raises(StoreUnavailable):
            await reader.ack([OutboxEntry("acme", eid.decode(), {})])
    finally:
        await primary.aclose()
        await store.close()


# -- settings ------------------------------------------------------------------------------


def test_wait_timeout_must_be_below_the_call_timeout() -> None:
    with pytest.raises(SettingsError, match="ECU_REDIS_WAIT_TIMEOUT_MS: must be below"):
        make_settings(
            "redis", redis_wait_replicas=1, redis_wait_timeout_ms=250, redis_timeout_ms=250
        )
    ok = make_settings(
        "redis", redis_wait_replicas=1, redis_wait_timeout_ms=249, redis_timeout_ms=250
    )
    assert (ok.redis_wait_replicas, ok.redis_wait_timeout_ms) == (1, 249)


def test_wait_replicas_bounds_and_embedded() -> None:
    with pytest.raises(SettingsError, match="between 0 and 16, got 17"):
        make_settings("redis", redis_wait_replicas=17)
    with pytest.raises(SettingsError, match="embedded store has no replicas"):
        make_settings("embedded", redis_wait_replicas=1)
    assert make_settings("redis").redis_wait_replicas == 0


def test_sentinel_urls() -> None:
    url = parse_sentinel_url("redis+sentinel://u:p%40ss@10.0.0.1:26379,10.0.0.2:26380/mymaster/2")
    assert url.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (url.service, url.db, url.username, url.password) == ("mymaster", 2, "u", "p@ss")
    with pytest.raises(SettingsError, match="needs the service name"):
        make_settings("redis", redis_url="redis+sentinel://10.0.0.1:26379")
    with pytest.raises(SettingsError, match="expected host:port"):
        make_settings("redis", redis_url="redis+sentinel://10.0.0.1/mymaster")
    with pytest.raises(SettingsError, match="not a Cluster"):
        make_settings("redis", redis_url="redis+sentinel://10.0.0.1:26379/m", redis_cluster=True)
    with pytest.raises(SettingsError, match="must start with redis://, rediss://, unix:// or"):
        make_settings("redis", redis_url="http://x")


async def test_sentinel_url_follows_a_failover(pair: ReplicatedRedis) -> None:
    """redis+sentinel:// through redis-py's Sentinel support: the primary is asked of the
    Sentinel; after the primary dies and the Sentinel promotes the replica, the same store
    serves from the new primary, and what it acknowledged with the wait on is there."""
    from tests.replicated_redis import PrivateSentinel

    sentinel = PrivateSentinel(pair.primary.port)
    settings = make_settings(
        "redis",
        redis_url=sentinel.url,
        redis_wait_replicas=1,
        redis_wait_timeout_ms=WAIT_MS,
        redis_timeout_ms=1_000,
    )
    transport = Transport.open(settings)
    store = RedisStore(transport, settings)
    try:
        assert store.kind == "standalone" and not transport.multiplexed_scripts
        org = "org-" + uuid.uuid4().hex[:8]
        await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
        await store.reserve(AccountRef(org), [item("r1")])
        pair.primary.kill()
        wait_until_sync(
            lambda: sentinel.primary_port() == pair.replica.port,
            "the Sentinel to promote the replica",
            limit_s=30,
        )
        seen = await wait_until(balance_of(store, org), "the store reaching the promoted replica")
        assert (seen.outstanding_holds, seen.held_uecu) == (1, 100)
        assert seen.conservation_faults() == []
        # The new primary has no replica yet: with the wait on, writes are not acknowledged.
        with pytest.raises(ReplicationUnconfirmed, match="0 of 1 replicas"):
            await store.reserve(AccountRef(org), [item("r2")])
    finally:
        await store.close()
        sentinel.close()


async def test_cluster_waits_on_the_replica_of_the_node_that_ran_the_script() -> None:
    """On a Cluster the script, the fence and WAIT go as one pipeline to the primary of the
    organization's slot: held-back replicas of the other primaries do not matter, the
    replica of that primary does."""
    from redis.crc import key_slot

    from tests.redis_cluster import cluster_or_skip, replicas_by_master, slot_owners

    with cluster_or_skip(masters=3, replicas=1) as cluster:
        settings = make_settings(
            "redis",
            redis_url=cluster.url,
            redis_cluster=True,
            redis_wait_replicas=1,
            redis_wait_timeout_ms=WAIT_MS,
        )
        transport = Transport.cluster(settings)
        store = RedisStore(transport, settings)
        try:
            await store.connect()
            org = "org-" + uuid.uuid4().hex[:8]
            slot = key_slot(org.encode())
            owner = next(
                port
                for port, ranges in slot_owners(cluster.ports[0]).items()
                if any(lo <= slot <= hi for lo, hi in ranges)
            )
            layout = replicas_by_master(cluster.ports[0])
            mine = layout[owner][0]
            others = [r for port, rs in layout.items() if port != owner for r in rs]

            async def granted() -> bool:  # until the fresh replicas acknowledge at all
                try:
                    await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
                    return True
                except ReplicationUnconfirmed:
                    return False

            for attempt in range(100):
                if await granted():
                    break
                assert attempt < 99, "the cluster's replicas never acknowledged"

            def pause(port: int, ms: int) -> None:
                import redis

                with redis.Redis(port=port) as c:
                    if ms:
                        c.execute_command("CLIENT", "PAUSE", ms, "WRITE")
                    else:
                        c.execute_command("CLIENT", "UNPAUSE")

            # A stale route (the slot moved, or a failover the client has not learned yet):
            # the other node answers MOVED without running the script; the pipeline is sent
            # once more to the new owner, and the route is learned.
            manager = transport.client.nodes_manager
            elsewhere = next(p for p in layout if p != owner)
            manager.slots_cache[slot] = [transport.client.get_node("127.0.0.1", elsewhere)]
            moved = await store.reserve(AccountRef(org), [item("r0")])
            assert not moved.replayed
            assert manager.slots_cache[slot][0].port == owner

            for port in others:
                pause(port, 60_000)
            out = await store.reserve(AccountRef(org), [item("r1")])
            assert not out.replayed
            await store.confirm_durable([org])  # the flusher's check: this slot's replica
            pause(mine, 60_000)
            with pytest.raises(ReplicationUnconfirmed, match="0 of 1 replicas"):
                await store.reserve(AccountRef(org), [item("r2")])
            with pytest.raises(ReplicationUnconfirmed, match="0 of 1 replicas"):
                await store.confirm_durable([org])
            for port in [mine, *others]:
                pause(port, 0)

            def caught_up() -> bool:
                import redis

                with redis.Redis(port=owner) as c:
                    info = c.info("replication")
                    return info["slave0"]["offset"] == info["master_repl_offset"]

            wait_until_sync(caught_up, "the replica to catch up")
            again = await store.reserve(AccountRef(org), [item("r2")])
            assert again.replayed
            b = await store.balance(org)
            assert (b.outstanding_holds, b.held_uecu) == (3, 300)
            assert b.conservation_faults() == []
        finally:
            await store.close()


def test_waitaof_joins_wait_only_where_redis_has_it_and_runs_aof() -> None:
    from ecu_sidecar.store.replicas import info_dict, waitaof_applies

    assert not waitaof_applies("7.0.15", True)  # this machine's Redis: WAIT alone
    assert not waitaof_applies("7.2.4", False)  # numlocal 1 is an error without AOF
    assert waitaof_applies("7.2.0", True)
    assert waitaof_applies("8.0.1", True)
    assert not waitaof_applies("garbage", True)
    raw = b"# Server\r\nredis_version:7.2.4\r\nredis_mode:standalone\r\n"
    assert info_dict(raw)["redis_version"] == "7.2.4"
    assert info_dict({"aof_enabled": 1})["aof_enabled"] == 1


async def test_an_unconfirmed_reserve_is_never_granted_locally(
    pair: ReplicatedRedis, tmp_path: object
) -> None:
    """Degraded mode grants holds locally while Redis is unreachable. An unconfirmed write is
    not that: the primary ran it, so a local hold as well would count it twice."""
    settings = make_settings(
        "redis",
        redis_url=pair.url,
        redis_wait_replicas=1,
        redis_wait_timeout_ms=WAIT_MS,
        degraded_allowance_uecu=1_000,
        degraded_journal=f"{tmp_path}/degraded.jsonl",
    )
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=1_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            pair.hold_back()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r1",
                        account=pb.Account(organization="acme"),
                        amount_uecu=10,
                        job_type=pb.JOB_TYPE_GEPA,
                    ),
                    timeout=5,
                )
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(ei.value)
            info = error_details_pb2.ErrorInfo()
            assert status is not None and status.details[0].Unpack(info)
            assert info.reason == "REPLICATION_UNCONFIRMED"
            assert server.engine.journal is not None
            assert server.engine.journal.pending() == 0  # nothing decided locally
    finally:
        await server.stop(grace=0)


async def test_cluster_failover_keeps_what_the_wait_confirmed() -> None:
    """A Cluster primary SIGKILLed and its replica promoted by the cluster itself: the store
    learns the new layout after the first failure, and the confirmed holds of the dead
    primary's organizations are on the promoted replica. (It has no replica of its own yet,
    so with the wait on new writes answer REPLICATION_UNCONFIRMED: fail closed.)"""
    from redis.crc import key_slot

    from tests.redis_cluster import cluster_or_skip, replicas_by_master, slot_owners

    # A 1 s node timeout: the failover the test waits for comes that much sooner.
    with cluster_or_skip(masters=3, replicas=1, node_timeout_ms=1_000) as cluster:
        settings = make_settings(
            "redis",
            redis_url=cluster.url,
            redis_cluster=True,
            redis_wait_replicas=1,
            redis_wait_timeout_ms=WAIT_MS,
        )
        transport = Transport.cluster(settings)
        store = RedisStore(transport, settings)
        try:
            await store.connect()
            org = "org-" + uuid.uuid4().hex[:8]
            slot = key_slot(org.encode())
            owner = next(
                port
                for port, ranges in slot_owners(cluster.ports[0]).items()
                if any(lo <= slot <= hi for lo, hi in ranges)
            )
            layout = replicas_by_master(cluster.ports[0])
            promoted = layout[owner][0]
            for attempt in range(100):  # until the fresh replicas acknowledge at all
                try:
                    await store.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
                    break
                except ReplicationUnconfirmed:
                    assert attempt < 99, "the cluster's replicas never acknowledged"
            for i in range(10):
                await store.reserve(AccountRef(org), [item(f"r{i}")])
            victim = cluster.processes[cluster.ports.index(owner)]
            victim.kill()
            victim.wait(10)
            survivor = next(p for p in cluster.ports if p not in (owner, promoted))
            wait_until_sync(
                lambda: slot_owners(survivor).get(promoted) is not None,
                "the cluster to promote the replica",
                limit_s=60,
            )
            seen = await wait_until(
                balance_of(store, org), "the store reaching the promoted replica"
            )
            assert (seen.outstanding_holds, seen.held_uecu) == (10, 1_000)
            assert seen.conservation_faults() == []
            with pytest.raises(ReplicationUnconfirmed, match="0 of 1 replicas"):
                await store.reserve(AccountRef(org), [item("after")])
        finally:
            await store.close()


# -- the flusher -----------------------------------------------------------------------------


@pytest.mark.parametrize("wait", [1, 0])
async def test_the_ledger_takes_only_what_the_replicas_hold(
    pair: ReplicatedRedis, tmp_path: object, wait: int
) -> None:
    """With the wait on, the flusher confirms on the replicas what it read before the ledger
    takes it: events the replica does not hold stay pending in the outbox (a failover could
    take them back out of Redis, and the ledger would then hold money Redis no longer
    knows). With the wait off they reach the ledger at once: what the test tells apart."""
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.ledger import open_ledger
    from ecu_sidecar.metrics import FlusherMetrics

    org = "org-" + uuid.uuid4().hex[:8]
    settings = durable_settings(pair, replicas=wait)
    unconfirmed = dataclasses.replace(settings, redis_wait_replicas=0)  # type: ignore[type-var]
    writer = RedisStore.from_settings(unconfirmed)
    store = RedisStore.from_settings(settings)  # type: ignore[arg-type]
    ledger = open_ledger(f"sqlite://{tmp_path}/ledger.db")
    ledger.migrate()
    flusher = Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    try:
        await writer.grant(org, "g1", 10_000, GrantKind.TOP_UP, 0)
        assert await flusher.drain() == 1
        pair.hold_back()
        await writer.reserve(AccountRef(org), [item("r1")])
        await writer.commit(org, [commit_item("r1", 60)], 0)
        if wait:
            with pytest.raises(ReplicationUnconfirmed, match="0 of 1 replicas"):
                await flusher.flush_once()
            with pytest.raises(ReplicationUnconfirmed):  # the same batch, retried first
                await flusher.flush_once()
            assert ledger.reservation(org, "r1") is None
            assert ledger.ledger_account(org).balance_uecu == 10_000  # type: ignore[union-attr]
            state = await flusher.reader.state(org)
            assert (state.length, state.pending) == (2, 2)
            pair.let_go()
            assert await flusher.drain() == 2
        else:
            assert await flusher.drain() == 2
            pair.let_go()
        assert ledger.reservation(org, "r1") is not None
        assert ledger.ledger_account(org).balance_uecu == 10_000 - 60  # type: ignore[union-attr]
        state = await flusher.reader.state(org)
        assert state.fully_flushed and state.length == 0
    finally:
        await writer.close()
        await store.close()
        ledger.close()
