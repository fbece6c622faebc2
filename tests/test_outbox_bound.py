"""Without a ledger the outbox is bounded: the sidecar's background task trims each outbox it
serves to about ECU_OUTBOX_MAX_LEN events and exports ``ecu_outbox_length``; with a ledger, or
where a flusher reads the outbox (a consumer group), nothing is trimmed. On real Redis and on
the embedded store.

The bound is exact, not a guess: XTRIM MAXLEN ~ drops whole stream nodes, and a node holds at
most stream-node-max-entries events (100, the default on both stores), so after a trim an
outbox holds at least MAX_LEN and at most MAX_LEN + 99 events.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind, JobType, ReserveItem
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings, SettingsError
from ecu_sidecar.store.outbox import GROUP
from tests.conftest import direct_client, drop_keys, make_settings, open_store, wait_until
from tests.redis_cluster import cluster_or_skip

#: The bound under test (the smallest allowed: the trims show within a few hundred steps).
MAX_LEN = 100
#: Events a stream node holds at most (stream-node-max-entries, default on Redis and fakeredis).
NODE_MAX_ENTRIES = 100
#: What one trimmed outbox may hold at most: MAX_LEN plus a node that could not go whole.
UPPER = MAX_LEN + NODE_MAX_ENTRIES - 1
#: Steps between two trims: 2 events each (reserve, commit), well within one trim's reach.
TRIM_EVERY = 50


async def started(settings: Settings, **kwargs: object) -> SidecarServer:
    server = SidecarServer(settings, store=open_store(settings), **kwargs)  # type: ignore[arg-type]
    await server.start()
    return server


@pytest_asyncio.fixture
async def quiet(backend: str) -> AsyncIterator[SidecarServer]:
    """A sidecar without a ledger whose background task never runs on its own (the test
    drives each pass), bounding outboxes to MAX_LEN."""
    settings = make_settings(backend, outbox_max_len=MAX_LEN, sweep_interval_ms=3_600_000)
    server = await started(settings)
    yield server
    try:
        await drop_keys(settings)
    finally:
        await server.stop(grace=0)


async def step(server: SidecarServer, org: str, n: int) -> None:
    """n reserve + commit steps, as a worker's batch of n (one event per step each way): 2n
    outbox events."""
    rids = [uuid.uuid4().hex for _ in range(n)]
    items = [ReserveItem(rid, 10, JobType.GEPA) for rid in rids]
    await server.engine.reserve(AccountRef(org), items, batch=True)
    outs = await server.engine.commit(org, [CommitItem(rid, 7) for rid in rids], batch=True)
    assert [o.error for o in outs] == [None] * n


async def outbox(server: SidecarServer, org: str) -> tuple[int, bytes]:
    """The outbox's length and its newest entry's event id."""
    client = direct_client(server.settings)
    try:
        key = server.store.outbox_key(org)
        newest = await client.xrevrange(key, count=1)
        return await client.xlen(key), newest[0][1][b"eid"] if newest else b""
    finally:
        await client.aclose()


async def read_by_a_flusher(server: SidecarServer, org: str) -> None:
    """A flusher's consumer group on the organization's outbox."""
    client = direct_client(server.settings)
    try:
        await client.xgroup_create(server.store.outbox_key(org), GROUP, id="0")
    finally:
        await client.aclose()


def gauge(server: SidecarServer) -> float | None:
    return server.registry.get_sample_value("ecu_outbox_length")


async def test_two_thousand_steps_leave_the_outbox_bounded(quiet: SidecarServer) -> None:
    # The reproduction: 2,000 steps left 4,001 events (a grant, then 2 per step).
    org = "steps-org"
    await quiet.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
    assert gauge(quiet) == 0  # exported from the start
    for done in range(TRIM_EVERY, 2_001, TRIM_EVERY):
        await step(quiet, org, TRIM_EVERY)
        left = await quiet.bound_outboxes()
        n, _ = await outbox(quiet, org)
        assert min(MAX_LEN, 1 + 2 * done) <= n <= UPPER, (done, n)
        assert left == n == gauge(quiet)
    # The newest events stay (the oldest go), and money is untouched by trimming.
    n, newest = await outbox(quiet, org)
    assert MAX_LEN <= n <= UPPER and newest.startswith(b"commit:")
    b = await quiet.engine.balance(org)
    assert b.conservation_faults() == []
    assert (b.committed_uecu, b.released_uecu, b.held_uecu) == (7 * 2_000, 3 * 2_000, 0)


async def test_the_background_task_bounds_every_outbox_it_serves(backend: str) -> None:
    settings = make_settings(backend, outbox_max_len=MAX_LEN, sweep_interval_ms=10)
    server = await started(settings)
    try:
        orgs = ["a-org", "b-org"]
        for org in orgs:
            await server.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
            await step(server, org, 150)
        # Wait for the task's passes (no sleep to let time pass: a condition, with patience).

        async def lengths() -> list[int]:
            return [(await outbox(server, org))[0] for org in orgs]

        async def trimmed() -> bool:
            return max(await lengths()) <= UPPER and gauge(server) == sum(await lengths())

        await wait_until(trimmed, "the background task trimming")
        assert all(MAX_LEN <= n <= UPPER for n in await lengths())
    finally:
        await drop_keys(settings)
        await server.stop(grace=0)


async def test_an_outbox_a_flusher_reads_is_never_trimmed(quiet: SidecarServer) -> None:
    # A sidecar run without the ledger beside flushers that have one: the flusher's consumer
    # group is on the stream, and every event must reach the ledger.
    org = "read-org"
    await quiet.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
    await read_by_a_flusher(quiet, org)
    await step(quiet, org, 200)
    assert await quiet.bound_outboxes() == 401 == gauge(quiet)
    assert (await outbox(quiet, org))[0] == 401


async def test_unbounded_when_set_to_zero(backend: str) -> None:
    settings = make_settings(backend, outbox_max_len=0, sweep_interval_ms=3_600_000)
    server = await started(settings)
    try:
        org = "zero-org"
        await server.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
        await step(server, org, 200)
        assert await server.bound_outboxes() == 401 == gauge(server)
        assert (await outbox(server, org))[0] == 401
    finally:
        await drop_keys(settings)
        await server.stop(grace=0)


async def test_with_a_ledger_nothing_is_trimmed(backend: str, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/ledger.db"
    # A ledger but no flusher in this process (it would drain the outbox): the outbox keeps
    # every event for the flusher, whatever ECU_OUTBOX_MAX_LEN says.
    settings = make_settings(
        backend,
        outbox_max_len=MAX_LEN,
        sweep_interval_ms=3_600_000,
        ledger_url=url,
        flusher_in_serve=False,
    )
    ledger = open_ledger(url)
    ledger.migrate()
    server = await started(settings, ledger=ledger)
    try:
        assert server.flusher is None
        org = "ledger-org"
        await server.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
        await step(server, org, 200)
        assert await server.bound_outboxes() is None
        assert (await outbox(server, org))[0] == 401
        assert gauge(server) is None  # the flushers export it, not this sidecar
    finally:
        await drop_keys(settings)
        await server.stop(grace=0)
        ledger.close()


async def test_bound_outboxes_on_a_redis_cluster() -> None:
    # The outboxes of organizations on different masters, in one pipelined pass (redis-py
    # routes each command by its key); one read by a flusher is left whole.
    with cluster_or_skip(masters=3) as cluster:
        settings = make_settings(
            "redis",
            redis_url=cluster.url,
            redis_cluster=True,
            redis_timeout_ms=2_000,
            redis_connect_timeout_ms=2_000,
            outbox_max_len=MAX_LEN,
            sweep_interval_ms=3_600_000,
        )
        server = await started(settings)
        try:
            assert server.store.kind == "cluster"
            orgs = [f"org-{i}" for i in range(6)]
            for org in orgs:
                await server.engine.grant(org, "seed", 10**9, GrantKind.TOP_UP)
            read = orgs[0]
            await read_by_a_flusher(server, read)
            for org in orgs:
                await step(server, org, 200)
            left = await server.bound_outboxes()
            lengths = {org: (await outbox(server, org))[0] for org in orgs}
            assert lengths[read] == 401
            assert all(MAX_LEN <= lengths[org] <= UPPER for org in orgs[1:]), lengths
            assert left == sum(lengths.values()) == gauge(server)
        finally:
            await server.stop(grace=0)


@pytest.mark.parametrize("value", ["1", "99", "-1", "1000000001"])
def test_outbox_max_len_is_validated(value: str) -> None:
    with pytest.raises(SettingsError, match="ECU_OUTBOX_MAX_LEN"):
        Settings.from_env({"ECU_OUTBOX_MAX_LEN": value})


def test_outbox_max_len_accepts_zero_and_the_minimum() -> None:
    assert Settings().outbox_max_len == 10_000
    assert Settings.from_env({"ECU_OUTBOX_MAX_LEN": "0"}).outbox_max_len == 0
    assert Settings.from_env({"ECU_OUTBOX_MAX_LEN": "100"}).outbox_max_len == 100
