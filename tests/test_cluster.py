"""The engine on a real 3-master Redis Cluster (started from redis-server by the suite).

What this proves, beyond "it does not raise":
- every key one script touches hashes to one slot (CLUSTER KEYSLOT, asked of the server), and a
  script given keys of two organizations is refused with CROSSSLOT by the same cluster, so the
  guard the scenario relies on is real;
- organizations spread over every master: each master stores some organization's keys, and
  each key sits on the master that owns its slot;
- the full life cycle (grant, caps, single and batch reserve, commit with overage, release,
  extend, expiry by sweep, late commit, replays and conflicts) across 60 organizations at once
  gives exact, conserved counters per organization;
- the NOSCRIPT fallback: after SCRIPT FLUSH on every node, operations still succeed and the
  scripts end up cached on every master again;
- a fresh client's concurrent first burst succeeds (redis-py misroutes a cold client's
  commands; RedisStore must follow the MOVED replies without tearing down its connections);
- the gRPC sidecar serves Reserve/Commit against the cluster.

A node's OOM (and READONLY, CLUSTERDOWN, ...) answers StoreUnavailable, and a burst past the
pool size waits for a connection instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.errors import (
    AccountNotFound,
    GrantAlreadyExpired,
    HoldNotFound,
    HoldReleased,
    IdempotencyConflict,
    InsufficientEcu,
    StaleSequence,
    StoreUnavailable,
)
from ecu_sidecar.model import (
    AccountRef,
    CommitItem,
    GrantKind,
    HoldState,
    JobType,
    ReserveItem,
    Usage,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import SUFFIXES, org_keys
from ecu_sidecar.store.scripts import SCRIPTS
from tests.conftest import ADMIN_METADATA, assert_conserved, direct_client, make_settings
from tests.redis_cluster import HOST, RedisClusterProcess, slot_owners

pytestmark = pytest.mark.cluster

ORGS = [f"org-{i:02d}" for i in range(60)]
SLOTS = 16_384


# -- fixtures -------------------------------------------------------------------------------


# redis_cluster (one 3-master cluster for the session) and cluster_settings: tests/conftest.py


@pytest_asyncio.fixture
async def cluster_store(cluster_settings: Settings) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_settings(cluster_settings)
    assert store.kind == "cluster"
    yield store
    await store.close()


@pytest_asyncio.fixture
async def cluster_direct(cluster_settings: Settings) -> AsyncIterator[Any]:
    """A cluster client of the test's own (same URL and key prefix as ``cluster_store``)."""
    client = direct_client(cluster_settings)
    yield client
    await client.aclose()


@pytest.fixture
def cluster_engine(cluster_store: RedisStore, cluster_settings: Settings) -> QuotaEngine:
    return QuotaEngine(cluster_store, cluster_settings)


@pytest_asyncio.fixture
async def nodes(redis_cluster: RedisClusterProcess) -> AsyncIterator[dict[int, aioredis.Redis]]:
    """A plain (non-cluster) client per master, to ask each node directly."""
    clients = {p: aioredis.Redis(host=HOST, port=p, socket_timeout=5) for p in redis_cluster.ports}
    yield clients
    for c in clients.values():
        await c.aclose()


def owner_of(owners: dict[int, list[tuple[int, int]]], slot: int) -> int:
    for port, ranges in owners.items():
        if any(lo <= slot <= hi for lo, hi in ranges):
            return port
    raise AssertionError(f"slot {slot} has no owner")


# -- the scenario every organization runs ---------------------------------------------------


@dataclass(frozen=True)
class Expected:
    granted: int
    committed: int
    held: int
    reserved: int
    committed_from_holds: int
    released: int
    expired: int
    overage: int
    unbilled: int
    late: int
    outstanding: int
    expired_holds: int
    team_held: int
    team_used: int
    project_held: int
    project_used: int
    events: int


def grant_of(i: int) -> int:
    # Each organization gets a different amount, so keys mixed up between organizations
    # could not produce the right totals by accident.
    return 1_000_000 + 1_000 * i


async def phase_one(engine: QuotaEngine, i: int) -> None:
    """Everything up to the expiry: grant, caps, reserves, commits, release, extends."""
    org = ORGS[i]
    granted = grant_of(i)

    g = await engine.grant(org, "g1", granted, GrantKind.TOP_UP)
    assert (g.balance_uecu, g.available_uecu, g.replayed) == (granted, granted, False)
    g = await engine.grant(org, "g1", granted, GrantKind.TOP_UP)
    assert (g.balance_uecu, g.replayed) == (granted, True)
    with pytest.raises(IdempotencyConflict):
        await engine.grant(org, "g1", granted + 1, GrantKind.TOP_UP)

    team = await engine.set_cap(org, "team", "ta", 300_000)
    assert (team.cap_uecu, team.held_uecu, team.used_uecu) == (300_000, 0, 0)
    project = await engine.set_cap(org, "project", "pa", 500_000)
    assert project.cap_uecu == 500_000

    # Single reserve, its replay, and a conflicting reuse of the id.
    acct = AccountRef(org, team="ta", project="pa", user="u1")
    r1 = [ReserveItem("r1", 100_000, JobType.INFERENCE, "gpt-4o", 60_000)]
    r = await engine.reserve(acct, r1)
    assert (r.available_uecu, r.replayed) == (granted - 100_000, False)
    assert [(h.reservation_id, h.amount_uecu, h.state) for h in r.holds] == [
        ("r1", 100_000, HoldState.ACTIVE)
    ]
    r = await engine.reserve(acct, r1)
    assert (r.available_uecu, r.replayed) == (granted - 100_000, True)
    with pytest.raises(IdempotencyConflict):
        await engine.reserve(acct, [ReserveItem("r1", 100_001, JobType.INFERENCE, "gpt-4o")])

    # Batch reserve: five holds in one script, all or nothing.
    batch = [ReserveItem(f"b{k}", 30_000, JobType.GEPA, "", 60_000) for k in range(5)]
    r = await engine.reserve(acct, batch, batch=True)
    assert r.available_uecu == granted - 250_000 and not r.replayed
    assert [h.reservation_id for h in r.holds] == [f"b{k}" for k in range(5)]
    r = await engine.reserve(acct, batch, batch=True)
    assert r.replayed and r.available_uecu == granted - 250_000

    # Each level refuses what it cannot cover, and a refused batch leaves no trace.
    with pytest.raises(InsufficientEcu) as ei:  # team: 300k cap - 250k held = 50k left
        await engine.reserve(
            acct,
            [ReserveItem("x1", 30_000, JobType.GEPA), ReserveItem("x2", 30_000, JobType.GEPA)],
            batch=True,
        )
    assert ei.value.metadata["scope"] == "team" and ei.value.metadata["available"] == "50000"
    with pytest.raises(InsufficientEcu) as ei:  # project: 500k cap - 250k held
        await engine.reserve(
            AccountRef(org, project="pa"), [ReserveItem("x3", 250_001, JobType.GEPA)]
        )
    assert ei.value.metadata["scope"] == "project"
    with pytest.raises(InsufficientEcu) as ei:  # organization
        await engine.reserve(AccountRef(org), [ReserveItem("x4", granted, JobType.GEPA)])
    assert ei.value.metadata["scope"] == "organization"

    # A short hold that will expire (ttl 1 s; the test moves the clock, nothing sleeps).
    r = await engine.reserve(
        AccountRef(org, project="pa"), [ReserveItem("e1", 10_000, JobType.ENGINE, "", 1_000)]
    )
    assert r.available_uecu == granted - 260_000

    # Commit below the hold (the rest is released), its replay, a conflicting replay.
    usage = Usage(tokens_in=10, calls=1)
    (c,) = await engine.commit(org, [CommitItem("r1", 80_000, usage)])
    assert (c.committed_uecu, c.released_uecu, c.replayed, c.error) == (80_000, 20_000, False, None)
    (c2,) = await engine.commit(org, [CommitItem("r1", 80_000, usage)])
    assert c2.replayed and (c2.committed_uecu, c2.available_uecu) == (80_000, c.available_uecu)
    for other in (CommitItem("r1", 81_000, usage), CommitItem("r1", 80_000)):
        (c2,) = await engine.commit(org, [other])
        assert isinstance(c2.error, IdempotencyConflict)

    # Batch commit: exact, below, above the hold (bounded overage), and an unknown id.
    out = await engine.commit(
        org,
        [
            CommitItem("b0", 30_000),
            CommitItem("b1", 10_000),
            CommitItem("b2", 40_000),  # hold 30k, +20% bound: billed 36k, 4k unbilled
            CommitItem("ghost", 1),
        ],
        batch=True,
    )
    got = [
        (o.committed_uecu, o.released_uecu, o.overage_uecu, o.unbilled_overage_uecu) for o in out
    ]
    assert got[:3] == [(30_000, 0, 0, 0), (10_000, 20_000, 0, 0), (36_000, 0, 6_000, 4_000)]
    assert isinstance(out[3].error, HoldNotFound)
    assert all(o.error is None for o in out[:3])

    # Release, its replay, and a commit of the released hold.
    rel = await engine.release(org, "b3")
    assert (rel.released_uecu, rel.state, rel.replayed) == (30_000, HoldState.RELEASED, False)
    rel = await engine.release(org, "b3")
    assert (rel.released_uecu, rel.replayed) == (30_000, True)
    (c,) = await engine.commit(org, [CommitItem("b3", 1)])
    assert isinstance(c.error, HoldReleased)

    # Extend (heartbeats), its replay and a stale sequence.
    e = await engine.extend(org, "b4", 120_000, 1)
    assert not e.replayed
    again = await engine.extend(org, "b4", 120_000, 1)
    assert again.replayed and again.deadline_unix_ms == e.deadline_unix_ms
    e2 = await engine.extend(org, "b4", 120_000, 2)
    assert e2.deadline_unix_ms >= e.deadline_unix_ms
    with pytest.raises(StaleSequence):
        await engine.extend(org, "b4", 120_000, 1)


async def phase_two(engine: QuotaEngine, i: int) -> Expected:
    """After the clock moved past e1's deadline: sweep, then release or late-commit e1."""
    org = ORGS[i]
    out = await engine.store.sweep(org)
    assert (out.expired, out.waiting) == (1, 0)  # e1 expired; b4 was extended, still live
    out = await engine.store.sweep(org)
    assert (out.expired, out.waiting) == (0, 0)
    late = 0
    if i % 2 == 0:
        rel = await engine.release(org, "e1")
        assert (rel.released_uecu, rel.state) == (0, HoldState.EXPIRED)
    else:
        (c,) = await engine.commit(org, [CommitItem("e1", 5_000)])
        assert (c.committed_uecu, c.late, c.error) == (5_000, True, None)
        late = 5_000
    committed = 80_000 + 30_000 + 10_000 + 36_000 + late
    return Expected(
        granted=grant_of(i),
        committed=committed,
        held=30_000,  # b4
        reserved=100_000 + 5 * 30_000 + 10_000,
        committed_from_holds=80_000 + 30_000 + 10_000 + 30_000,
        released=20_000 + 20_000 + 30_000,
        expired=10_000,
        overage=6_000,
        unbilled=4_000,
        late=late,
        outstanding=1,
        expired_holds=1,
        team_held=30_000,
        team_used=156_000,
        project_held=30_000,
        project_used=156_000 + late,
        # grant, 2 caps, r1, 5 batch, e1, commit r1, 3 batch commits, release b3,
        # 2 extends, expire e1, and the late commit on odd organizations.
        events=18 + (1 if late else 0),
    )


async def check_balance(engine: QuotaEngine, i: int, exp: Expected) -> None:
    b = await engine.balance(ORGS[i])
    got = (
        b.granted_uecu, b.committed_uecu, b.held_uecu, b.reserved_uecu,
        b.committed_from_holds_uecu, b.released_uecu, b.expired_uecu, b.overage_uecu,
        b.unbilled_overage_uecu, b.late_committed_uecu, b.outstanding_holds, b.expired_holds,
    )  # fmt: skip
    want = (
        exp.granted, exp.committed, exp.held, exp.reserved, exp.committed_from_holds,
        exp.released, exp.expired, exp.overage, exp.unbilled, exp.late, exp.outstanding,
        exp.expired_holds,
    )  # fmt: skip
    assert got == want, ORGS[i]
    assert_conserved(b)
    assert b.expired_grants_uecu == 0 and b.available_uecu == b.balance_uecu - b.held_uecu
    assert [(t.id, t.cap_uecu, t.held_uecu, t.used_uecu) for t in b.teams] == [
        ("ta", 300_000, exp.team_held, exp.team_used)
    ]
    assert [(p.id, p.cap_uecu, p.held_uecu, p.used_uecu) for p in b.projects] == [
        ("pa", 500_000, exp.project_held, exp.project_used)
    ]


# -- tests ----------------------------------------------------------------------------------


async def test_org_keys_share_one_slot_and_orgs_cover_every_master(
    redis_cluster: RedisClusterProcess, nodes: dict[int, aioredis.Redis]
) -> None:
    node = nodes[redis_cluster.ports[0]]
    owners = slot_owners(redis_cluster.ports[0])
    assert set(owners) == set(redis_cluster.ports), "expected exactly the 3 started masters"
    assert sum(hi - lo + 1 for r in owners.values() for lo, hi in r) == SLOTS
    masters_used: set[int] = set()
    for org in ORGS:
        keys = org_keys("ecu", org)
        assert len(keys) == len(SUFFIXES)
        slots = {await node.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}
        assert len(slots) == 1, f"{org}: keys hash to several slots {slots}"
        (slot,) = slots
        assert slot == key_slot(org.encode())  # the hash tag is exactly the org id
        masters_used.add(owner_of(owners, slot))
    assert masters_used == set(redis_cluster.ports), "organizations do not reach every master"


async def test_cross_slot_script_is_refused(
    redis_cluster: RedisClusterProcess, nodes: dict[int, aioredis.Redis]
) -> None:
    """Control: the cluster really enforces one slot per script, so the scenario proves it."""
    owners = slot_owners(redis_cluster.ports[0])
    a, b = "org-00", next(o for o in ORGS if key_slot(o.encode()) != key_slot(b"org-00"))
    port = owner_of(owners, key_slot(a.encode()))
    keys = (org_keys("ecu", a)[0], org_keys("ecu", b)[0])
    # redis-py maps the server's "-CROSSSLOT ..." reply to ClusterCrossSlotError and strips
    # the code from the message.
    with pytest.raises(ClusterCrossSlotError, match="same slot"):
        await nodes[port].eval("return 1", 2, *keys)


async def test_engine_life_cycle_across_60_orgs(
    redis_cluster: RedisClusterProcess,
    cluster_engine: QuotaEngine,
    cluster_store: RedisStore,
    nodes: dict[int, aioredis.Redis],
    cluster_direct: Any,
) -> None:
    engine = cluster_engine
    # Unknown organization: a clean ACCOUNT_NOT_FOUND, not a cluster error.
    with pytest.raises(AccountNotFound):
        await engine.balance("org-nobody")

    await asyncio.gather(*(phase_one(engine, i) for i in range(len(ORGS))))
    cluster_store.clock_offset_ms = 5_000  # past e1's 1 s ttl, far from b4's 120 s
    expected = await asyncio.gather(*(phase_two(engine, i) for i in range(len(ORGS))))
    await asyncio.gather(*(check_balance(engine, i, e) for i, e in enumerate(expected)))
    # The outboxes one at a time: 60 concurrent commands on the test's own cold cluster client
    # can race inside redis-py's async cluster connection setup ('NoneType' ... 'writelines').
    for i, e in enumerate(expected):
        outbox = org_keys(engine.settings.key_prefix, ORGS[i])[SUFFIXES.index("outbox")]
        assert await cluster_direct.xlen(outbox) == e.events, ORGS[i]
    assert await engine.sweep_recent() == 0

    # Every master holds organization keys, every key is on the master owning its slot, and
    # each organization has its six keys (gexp exists only while an expiring grant has a rest).
    prefix = engine.settings.key_prefix
    owners = slot_owners(redis_cluster.ports[0])
    per_node: dict[int, int] = {}
    for port, client in nodes.items():
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        per_node[port] = len(keys)
        for k in keys:
            org = k[k.index("{") + 1 : k.index("}")]
            assert owner_of(owners, key_slot(org.encode())) == port, k
    assert all(n > 0 for n in per_node.values()), per_node
    assert sum(per_node.values()) == 6 * len(ORGS), per_node


async def test_cold_client_concurrent_burst(cluster_settings: Settings) -> None:
    """A fresh client's first calls arrive all at once (a worker starting a run).

    redis-py sends the commands of a not yet initialized cluster client to one node whatever
    their key; the MOVED replies must only be followed, never answered with a full refresh that
    closes the connections of the other in-flight calls (RedisStore uses reinitialize_steps=0).
    Three rounds, each on a new client: with redis-py's default this failed most rounds.
    """
    for round_ in range(3):
        store = RedisStore.from_settings(cluster_settings)
        engine = QuotaEngine(store, cluster_settings)
        try:
            outcomes = await asyncio.gather(
                *(engine.grant(org, f"burst-{round_}", 7, GrantKind.TOP_UP) for org in ORGS),
                return_exceptions=True,
            )
        finally:
            await store.close()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, f"round {round_}: {len(errors)} failed, e.g. {errors[0]!r}"
        assert [o.balance_uecu for o in outcomes] == [7 * (round_ + 1)] * len(ORGS)


async def test_burst_beyond_pool_size_waits_for_a_connection(
    redis_cluster: RedisClusterProcess,
) -> None:
    settings = make_settings(
        "redis",
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_pool_size=4,
        redis_timeout_ms=5_000,
    )
    store = RedisStore.from_settings(settings)
    engine = QuotaEngine(store, settings)
    try:
        await store.ping()
        await asyncio.gather(*(engine.grant(org, "g", 1, GrantKind.TOP_UP) for org in ORGS))
    finally:
        await store.close()


async def test_noscript_fallback_after_script_flush_on_every_node(
    cluster_engine: QuotaEngine,
    nodes: dict[int, aioredis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = cluster_engine
    orgs = ORGS[:30]

    async def work(org: str) -> None:
        await engine.grant(org, "g-" + org, 1_000, GrantKind.STARTER)
        await engine.reserve(AccountRef(org), [ReserveItem("r-" + org, 400, JobType.GEPA)])
        (c,) = await engine.commit(org, [CommitItem("r-" + org, 100)])
        assert c.error is None
        b = await engine.balance(org)
        assert (b.balance_uecu, b.held_uecu, b.released_uecu) == (900, 0, 300)

    shas = [s.sha for s in SCRIPTS.values()]
    await asyncio.gather(*(work(o) for o in orgs[:10]))  # scripts now cached somewhere
    for client in nodes.values():
        assert await client.script_flush() is True
        assert not any(await client.script_exists(*shas))

    caplog.set_level(logging.DEBUG, logger="ecu_sidecar.store.transport")
    await asyncio.gather(*(work(o) for o in orgs[10:]))  # NOSCRIPT -> EVAL on every node
    fallbacks = [r for r in caplog.records if "not cached on this node" in r.getMessage()]
    assert fallbacks, "no NOSCRIPT fallback happened"

    used = [SCRIPTS[n].sha for n in ("grant", "reserve", "commit", "balance")]
    served = {p for p, c in nodes.items() if all(await c.script_exists(*used))}
    # 20 organizations over 3 masters: each master served some, so each re-cached the scripts.
    assert served == set(nodes), f"scripts re-cached only on {served}"


async def test_node_out_of_memory_is_store_unavailable(
    cluster_engine: QuotaEngine, nodes: dict[int, aioredis.Redis]
) -> None:
    org = ORGS[0]
    await cluster_engine.grant(org, "g0", 10, GrantKind.TOP_UP)
    try:
        for client in nodes.values():
            await client.config_set("maxmemory", "1")
        with pytest.raises(StoreUnavailable):
            await cluster_engine.grant(org, "g1", 10, GrantKind.TOP_UP)
    finally:
        for client in nodes.values():
            await client.config_set("maxmemory", "0")
    assert (await cluster_engine.balance(org)).granted_uecu == 10  # the refused grant left no trace


async def test_grpc_reserve_commit_over_cluster(
    redis_cluster: RedisClusterProcess, cluster_settings: Settings
) -> None:
    # One organization per master, so every node serves the gRPC path.
    owners = slot_owners(redis_cluster.ports[0])
    by_master = {owner_of(owners, key_slot(o.encode())): o for o in reversed(ORGS)}
    assert len(by_master) == len(redis_cluster.ports)
    server = SidecarServer(cluster_settings)
    await server.start()
    try:
        assert server.store.kind == "cluster"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            for org in sorted(by_master.values()):
                await stub.Grant(
                    pb.GrantRequest(
                        grant_id="g1",
                        organization=org,
                        amount_uecu=1_000_000,
                        kind=pb.GRANT_KIND_TOP_UP,
                    ),
                    metadata=ADMIN_METADATA,
                )
                r = await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r1",
                        account=pb.Account(organization=org, team="t"),
                        amount_uecu=400_000,
                        job_type=pb.JOB_TYPE_INFERENCE,
                        model="gpt-4o",
                        ttl_ms=60_000,
                    )
                )
                assert r.hold.state == pb.HOLD_STATE_ACTIVE and r.available_uecu == 600_000
                c = await stub.Commit(
                    pb.CommitRequest(
                        reservation_id="r1",
                        organization=org,
                        actual_uecu=150_000,
                        usage=pb.Usage(tokens_in=10),
                    )
                )
                assert (c.committed_uecu, c.released_uecu, c.available_uecu) == (
                    150_000,
                    250_000,
                    850_000,
                )
                b = (await stub.GetBalance(pb.GetBalanceRequest(organization=org))).balance
                assert (b.granted_uecu, b.balance_uecu, b.held_uecu) == (1_000_000, 850_000, 0)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r2",
                        account=pb.Account(organization=ORGS[0]),
                        amount_uecu=850_001,
                        job_type=pb.JOB_TYPE_GEPA,
                    )
                )
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(grace=0)


async def test_flusher_finds_every_outbox_on_every_master(
    cluster_store: RedisStore,
    cluster_settings: Settings,
    tmp_path: Path,
    cluster_direct: Any,
) -> None:
    """Discovery is SCAN on every primary: organizations on all three masters reach the ledger,
    exactly once, and reconcile with zero drift."""
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.ledger import open_ledger
    from ecu_sidecar.metrics import FlusherMetrics

    ledger = open_ledger(f"sqlite://{tmp_path}/cluster-ledger.db")
    ledger.migrate()
    engine = QuotaEngine(cluster_store, cluster_settings, ledger=ledger)
    flusher = Flusher(cluster_store, ledger, cluster_settings, FlusherMetrics(CollectorRegistry()))
    orgs = [f"flush-{i}" for i in range(30)]
    try:
        for i, org in enumerate(orgs):
            await engine.grant(org, "g", 10_000 + i, GrantKind.TOP_UP)
            await engine.reserve(AccountRef(org), [ReserveItem("r", 1_000, JobType.GEPA)])
            await engine.commit(org, [CommitItem("r", 400)])
        assert await flusher.reader.discover() == sorted(orgs)
        moved = await flusher.drain()
        assert moved == 3 * len(orgs)  # grant, reserve, commit
        for i, org in enumerate(orgs):
            assert ledger.balance(org) == 10_000 + i - 400
        # The gauges and the tidying read every master's streams in pipelines, and a dead
        # consumer is removed by a script in its stream's slot.
        ghost = cluster_store.outbox_key(orgs[7])
        await cluster_direct.xgroup_createconsumer(ghost, "ledger", "ghost")
        await flusher.observe()
        assert flusher.metrics.registry.get_sample_value("ecu_outbox_length") == 0
        assert await flusher.reader.forget_consumers(orgs, 0) == 1
        drifts = await flusher.reconcile()
        assert drifts == dict.fromkeys(orgs, 0)
        # Rebuilds stay in the organization's slot: one organization loses its account hash,
        # another its deadline index, each with a hold outstanding.
        lost_acct, lost_index = orgs[0], orgs[1]
        for org in (lost_acct, lost_index):
            await engine.reserve(AccountRef(org), [ReserveItem("open", 500, JobType.GEPA)])
        await flusher.drain()
        await cluster_direct.delete(org_keys(cluster_settings.key_prefix, lost_acct)[0])
        await cluster_direct.delete(org_keys(cluster_settings.key_prefix, lost_index)[2])
        b = await engine.balance(lost_acct)  # rebuilt by the sidecar, hold restored
        assert (b.held_uecu, b.balance_uecu, b.conservation_faults()) == (500, 9_600, [])
        drifts = await flusher.reconcile()  # finds lost_index's keys lost and rebuilds it
        assert lost_index not in drifts and lost_acct not in drifts  # its rebuild is unflushed
        b = await engine.balance(lost_index)
        assert (b.held_uecu, b.outstanding_holds, b.conservation_faults()) == (500, 1, [])
        await flusher.drain()
        assert await flusher.reconcile() == dict.fromkeys(orgs, 0)
    finally:
        ledger.close()


async def test_a_ledger_first_expiring_grant_reads_the_scripts_clock_on_a_cluster(
    cluster_store: RedisStore, cluster_settings: Settings, tmp_path: Path
) -> None:
    """The engine checks a grant's expiry by the scripts' clock (Redis TIME + offset) before the
    ledger write; on a Cluster that clock is read from a node, like any script's."""
    from ecu_sidecar.ledger import open_ledger

    ledger = open_ledger(f"sqlite://{tmp_path}/cluster-ledger.db")
    ledger.migrate()
    engine = QuotaEngine(cluster_store, cluster_settings, ledger=ledger)
    try:
        now = await cluster_store.now_ms()
        out = await engine.grant("starter-org", "s1", 100, GrantKind.STARTER, now + 60_000)
        assert out.balance_uecu == 100
        with pytest.raises(GrantAlreadyExpired):
            await engine.grant("starter-org", "late", 100, GrantKind.STARTER, now - 1)
        assert [g.grant_id for g in ledger.account("starter-org").grants] == ["s1"]  # type: ignore[union-attr]
    finally:
        ledger.close()
