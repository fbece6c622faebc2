"""Degraded mode: fail-closed by default; with an allowance, bounded local grants journaled on
disk, replayed exactly once when Redis returns, surviving a SIGKILL of the sidecar."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ecu_sidecar import errors
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.engine import Journal, QuotaEngine
from ecu_sidecar.engine.degraded import now_ms as degraded_now_ms
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.metrics import FlusherMetrics, Metrics
from ecu_sidecar.model import (
    UECU_PER_ECU,
    AccountRef,
    Balance,
    CommitItem,
    GrantKind,
    JobType,
    ReserveItem,
    Usage,
)
from ecu_sidecar.pricing import InferenceSpec, RateCardRegistry, UsageLine
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import SettingsError
from ecu_sidecar.store import RedisStore
from tests.conftest import (
    ADMIN_METADATA,
    ADMIN_TOKEN,
    EXAMPLE_RATE_CARD,
    FAST_RECONNECT,
    REDIS_PORT,
    drop_keys,
    make_settings,
    require_redis,
    wait_until,
)
from tests.tcp_proxy import TcpProxy
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
    await wait_until(lambda: journal.pending() == 0, "the journal entries replayed")


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
            assert sample("ecu_degraded_replay_failures_total") == 0
            assert sample("ecu_degraded_grants_total") == 2  # r1 and r3; the replay of r1 not
            assert sample("ecu_degraded_granted_uecu_total") == 600 + 300
            assert sample("ecu_degraded_journal_pending") == 3
            redis.thaw()
            await wait_replayed(server.journal)
            assert sample("ecu_degraded_journal_pending") == 0
            assert sample("ecu_degraded_replay_failures_total") == 0
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
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as ch:
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
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as ch:
            await ready(ch)
            stub = quota_pb2_grpc.QuotaStub(ch)

            async def replayed() -> pb.Balance | None:
                b = (await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))).balance
                return b if b.committed_uecu else None

            b = await wait_until(replayed, "the journal replayed by the new process")
            assert (b.committed_uecu, b.balance_uecu) == (640, 10_000 - 640)
    finally:
        redis.thaw()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


# -- the engine against Redis behind a proxy: bounded local commits, replays that settle --------

PCT = 20  # ECU_OVERAGE_MAX_PERCENT of these tests
GRANTED = 10_000_000


class Outage:
    """An engine in degraded mode whose Redis (the shared one, under the test's key prefix) is
    reached through a TcpProxy that the test takes down and brings back; ``direct`` reads the
    truth past the proxy."""

    def __init__(self, tmp_path: Path, allowance: int = ALLOWANCE, **overrides: Any) -> None:
        require_redis()
        self.proxy = TcpProxy(REDIS_PORT)
        self.path = tmp_path / "degraded.jsonl"
        self.allowance = allowance
        self.settings = make_settings(
            "redis",
            **{
                "redis_url": f"redis://127.0.0.1:{self.proxy.port}/0",
                # Long enough for a loaded machine; a lost reply costs one timeout.
                "redis_timeout_ms": 1_000,
                "redis_connect_timeout_ms": 1_000,
                "overage_max_percent": PCT,
                "degraded_allowance_uecu": allowance,
                "degraded_journal": str(self.path),
                **overrides,
            },
        )
        self.direct_settings = make_settings("redis", key_prefix=self.settings.key_prefix)
        self.store = RedisStore.from_settings(self.settings)
        self.direct = RedisStore.from_settings(self.direct_settings)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.journal = self.open_journal()
        self.engine = self.new_engine()

    def open_journal(self) -> Journal:
        """The journal as a (re)started process finds it on disk."""
        journal = Journal.open(str(self.path), self.allowance)
        journal.on_failed = self.metrics.degraded_replay_failures.inc
        return journal

    def new_engine(self, ledger: Any = None) -> QuotaEngine:
        return QuotaEngine(self.store, self.settings, ledger=ledger, journal=self.journal)

    def down(self) -> None:
        """Redis unreachable: new connections refused, established ones cut."""
        self.proxy.mode = "refuse"
        self.proxy.cut()

    def up(self) -> None:
        self.proxy.heal()

    def failures(self) -> float:
        return self.registry.get_sample_value("ecu_degraded_replay_failures_total") or 0.0

    async def balance(self, org: str) -> Balance:
        b = await self.direct.balance(org)
        assert b.conservation_faults() == []
        return b

    async def close(self) -> None:
        self.proxy.close()
        await drop_keys(self.direct_settings)
        await self.store.close()
        await self.direct.close()


@pytest_asyncio.fixture
async def outage(tmp_path: Path) -> AsyncIterator[Outage]:
    o = Outage(tmp_path)
    yield o
    await o.close()


async def funded_org(o: Outage, org: str = "acme") -> str:
    await o.engine.grant(org, "g", GRANTED, GrantKind.TOP_UP)
    return org


def step(rid: str, amount: int) -> ReserveItem:
    return ReserveItem(rid, amount, JobType.GEPA, ttl_ms=60_000)


async def reserve_lost_reply(o: Outage, account: AccountRef, item: ReserveItem) -> Any:
    """Reserve while Redis runs the call but its reply is lost (the call times out): the
    engine grants the hold locally although it also exists in Redis."""
    o.proxy.heal()
    o.proxy.cut()
    await o.store.balance(account.organization)  # a fresh connection, its PING answered
    o.proxy.swallow_replies = True
    try:
        return await o.engine.reserve(account, [item])
    finally:
        o.proxy.heal()
        o.proxy.cut()


def journal_ops(path: Path) -> list[str]:
    return [json.loads(x)["op"] for x in path.read_text().splitlines()]


async def test_a_local_commit_is_bounded_by_its_hold(tmp_path: Path) -> None:
    """Issue 14 item 6: 900,000 ECU committed on a 1 ECU local hold (allowance 1 ECU) bills
    the hold plus its overage bound, the rest recorded unbilled; in the answer, the journal, and
    in Redis after the replay."""
    ecu = UECU_PER_ECU
    o = Outage(tmp_path, allowance=1 * ecu)
    try:
        org = await funded_org(o)
        o.down()
        out = await o.engine.reserve(AccountRef(org), [step("big", 1 * ecu)])
        assert out.degraded
        (c,) = await o.engine.commit(org, [CommitItem("big", 900_000 * ecu, Usage(calls=1))])
        bound = 1 * ecu * PCT // 100
        assert c.error is None and c.degraded
        assert (c.committed_uecu, c.released_uecu, c.overage_uecu) == (ecu + bound, 0, bound)
        assert c.unbilled_overage_uecu == 900_000 * ecu - (ecu + bound)
        assert c.available_uecu == ecu - (ecu + bound)
        line = json.loads(o.path.read_text().splitlines()[-1])
        assert (line["op"], line["actual"], line["billed"]) == (
            "commit",
            900_000 * ecu,
            ecu + bound,
        )
        # Nothing reached Redis meanwhile.
        assert (await o.balance(org)).committed_uecu == 0
        o.up()
        assert await o.engine.replay_degraded() == 1
        b = await o.balance(org)
        assert b.committed_uecu == ecu + bound
        assert b.balance_uecu == GRANTED - (ecu + bound)
        assert b.held_uecu == 0
        assert o.journal.pending() == 0 and o.path.read_text() == ""
    finally:
        await o.close()


async def test_a_local_commit_or_release_replayed_answers_what_was_journaled(
    outage: Outage,
) -> None:
    """A retried commit of a local hold answers the recorded outcome (replayed); another actual
    is an idempotency conflict, a commit of a released hold HOLD_RELEASED, a release of a
    committed one HOLD_COMMITTED; none of them writes to the journal."""
    o = outage
    org = await funded_org(o)
    o.down()
    for rid in ("c", "r"):
        await o.engine.reserve(AccountRef(org), [step(rid, 500)])
    first = await o.engine.commit(org, [CommitItem("c", 450, Usage(calls=2))])
    rel = await o.engine.release(org, "r")
    assert (rel.released_uecu, rel.replayed, rel.degraded) == (500, False, True)
    lines = o.path.read_text()
    (again,) = await o.engine.commit(org, [CommitItem("c", 450, Usage(calls=2))])
    assert again.replayed and again.degraded
    assert (again.committed_uecu, again.released_uecu) == (first[0].committed_uecu, 50)
    (other,) = await o.engine.commit(org, [CommitItem("c", 451, Usage(calls=2))])
    assert isinstance(other.error, errors.IdempotencyConflict)
    (released,) = await o.engine.commit(org, [CommitItem("r", 10)])
    assert isinstance(released.error, errors.HoldReleased)
    assert (await o.engine.release(org, "r")).replayed
    with pytest.raises(errors.HoldCommitted):
        await o.engine.release(org, "c")
    assert o.path.read_text() == lines, "no second decision was journaled"


async def test_replay_settles_a_reserve_that_reached_redis(outage: Outage) -> None:
    """Issue 14 item 6: a reserve that timed out but ran in Redis. Its local twin is replayed
    as that real hold, never a conflict: committed locally, the real hold is committed (billed
    once, from the hold, not as an orphan); released locally, it is released; still open, it
    stays the real hold, committed once later."""
    o = outage
    org = await funded_org(o)
    for rid, amount in (("spent", 300), ("dropped", 300), ("open", 200)):
        assert (await reserve_lost_reply(o, AccountRef(org), step(rid, amount))).degraded
    o.down()
    (spent,) = await o.engine.commit(org, [CommitItem("spent", 250, Usage(calls=1))])
    assert (spent.committed_uecu, spent.released_uecu, spent.degraded) == (250, 50, True)
    await o.engine.release(org, "dropped")
    landed = await o.balance(org)
    assert (landed.held_uecu, landed.outstanding_holds) == (800, 3), "the reserves ran"
    o.up()
    assert await o.engine.replay_degraded() == 3
    assert o.failures() == 0 and o.journal.pending() == 0
    b = await o.balance(org)
    assert (b.held_uecu, b.reserved_uecu, b.released_uecu) == (200, 800, 300 + 50)
    assert (b.committed_uecu, b.committed_from_holds_uecu, b.orphan_committed_uecu) == (
        250,
        250,
        0,
    )
    (c,) = await o.engine.commit(org, [CommitItem("open", 150)])
    assert c.error is None and not c.degraded and c.committed_uecu == 150
    b = await o.balance(org)
    assert (b.committed_uecu, b.held_uecu, b.orphan_committed_uecu) == (400, 0, 0)
    assert b.balance_uecu == GRANTED - 400


async def test_a_refused_entry_never_blocks_the_entries_after_it(outage: Outage) -> None:
    """Entries Redis definitely refuses (a reservation id taken with other parameters, a commit
    conflicting with the one Redis has) are marked failed, counted and kept in the journal;
    the billing entry after them is replayed."""
    o = outage
    org = await funded_org(o)
    await o.engine.reserve(AccountRef(org), [step("y", 400), step("x", 600)])
    await o.engine.commit(org, [CommitItem("y", 100)])
    o.down()
    await o.engine.reserve(AccountRef(org, team="other"), [step("x-twin", 700)])
    o.up()
    await o.direct.reserve(AccountRef(org), [step("x-twin", 50)])  # another sidecar took it
    o.down()
    (y,) = await o.engine.commit(org, [CommitItem("y", 200)])  # Redis committed 100
    (x,) = await o.engine.commit(org, [CommitItem("x", 550)])  # the billing entry, last
    assert y.degraded and x.degraded
    assert journal_ops(o.path) == ["reserve", "remote_commit", "remote_commit"]

    assert await o.engine.replay_degraded() == 0, "Redis down: nothing replayed"
    assert o.journal.pending() == 3 and o.failures() == 0
    o.up()
    assert await o.engine.replay_degraded() == 1
    assert o.failures() == 2
    assert o.journal.pending() == 0
    b = await o.balance(org)
    assert b.committed_uecu == 100 + 550, "the billing entry after the refused ones was replayed"
    assert b.held_uecu == 50
    # The failed entries stay in the journal for the operator, and are not replayed again.
    assert journal_ops(o.path) == ["reserve", "failed", "remote_commit", "failed"]
    assert o.path.stat().st_mode & 0o777 == 0o600
    reloaded = Journal.open(str(o.path), o.allowance)
    assert reloaded.pending() == 0
    assert sorted((e.rid, e.failed) for e in reloaded.failed) == [
        ("x-twin", "IDEMPOTENCY_CONFLICT"),
        ("y", "IDEMPOTENCY_CONFLICT"),
    ]
    assert await o.engine.replay_degraded() == 0 and o.failures() == 2
    # A restarted process keeps them through its own outage and replay.
    o.journal = o.open_journal()
    o.engine = o.new_engine()
    o.down()
    assert (await o.engine.reserve(AccountRef(org), [step("after", 100)])).degraded
    (x,) = await o.engine.commit(org, [CommitItem("x", 550)])  # a replay, journaled again
    o.up()
    assert await o.engine.replay_degraded() == 2 and o.failures() == 2
    assert journal_ops(o.path) == ["reserve", "failed", "remote_commit", "failed"]
    b = await o.balance(org)
    assert (b.committed_uecu, b.held_uecu) == (100 + 550, 50 + 100)


async def test_the_ledger_bills_each_degraded_commit_once_across_a_crash_mid_replay(
    tmp_path: Path,
) -> None:
    """The replay runs twice (a crash after the scripts ran, before the journal recorded it):
    the second pass only repeats (Redis answers replays), and the SQLite ledger after a flush
    bills each commit once: a local hold's (orphan, bounded), a landed reserve's (its real
    hold), and a Redis hold's commit journaled during the outage."""
    db = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(db)
    ledger.migrate()
    o = Outage(tmp_path, ledger_url=db)
    try:
        o.engine = o.new_engine(ledger)
        org = await funded_org(o)
        await o.engine.reserve(AccountRef(org), [step("remote", 300)])
        assert (await reserve_lost_reply(o, AccountRef(org), step("landed", 200))).degraded
        o.down()
        await o.engine.reserve(AccountRef(org), [step("local", 400)])
        for rid, actual in (("local", 500), ("landed", 210), ("remote", 250)):
            (c,) = await o.engine.commit(org, [CommitItem(rid, actual, Usage(calls=1))])
            assert c.degraded and c.error is None
        assert c.committed_uecu == 250  # a Redis hold's commit answers what was asked
        on_disk = o.path.read_text()  # what a crash right after the scripts leaves behind
        o.up()
        assert await o.engine.replay_degraded() == 3
        first = await o.balance(org)
        local_billed = 400 + 400 * PCT // 100
        assert first.committed_uecu == local_billed + 210 + 250
        assert first.orphan_committed_uecu == local_billed

        o.path.write_text(on_disk)
        o.journal = o.open_journal()  # the restarted process
        o.engine = o.new_engine(ledger)
        assert await o.engine.replay_degraded() == 3
        again = await o.balance(org)
        assert again == first, "the second pass changed nothing in Redis"
        assert o.failures() == 0 and o.path.read_text() == ""

        await drain_into(o, ledger, db)
        rows = ledger_rows(db, org, "reservation_id, amount_uecu, actual_uecu, orphan")
        assert rows == [
            ("landed", 210, 210, 0),
            ("local", local_billed, 500, 1),
            ("remote", 250, 250, 0),
        ]
        assert ledger.balance(org) == first.balance_uecu
    finally:
        await o.close()
        ledger.close()


async def test_a_journal_written_before_bounded_commits_is_replayed(outage: Outage) -> None:
    """Journals of the previous format (no t0, TTL or billed amount recorded) stay readable:
    a local hold's t0 is its deadline (fixed, so its event id is too), its commit counts as
    billed at the actual, and an open hold is reserved for the rest of its lifetime."""
    o = outage
    org = await funded_org(o)
    deadline = degraded_now_ms() + 60_000
    hold = {"team": "", "project": "", "user": "", "job": "gepa", "model": ""}
    lines = [
        {"op": "reserve", "org": org, "reservation_id": "old1", "amount_uecu": 300, **hold,
         "deadline_ms": deadline},
        {"op": "commit", "org": org, "rid": "old1", "actual": 250, "usage": [0, 0, 1]},
        {"op": "reserve", "org": org, "reservation_id": "old2", "amount_uecu": 100, **hold,
         "deadline_ms": deadline},
        {"op": "remote_commit", "org": org, "rid": "gone", "actual": 50, "usage": [0, 0, 0],
         "n": 0},
        {"op": "done", "kind": "remote", "org": org, "rid": "gone"},
    ]  # fmt: skip
    o.path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    o.journal = o.open_journal()
    o.engine = o.new_engine()
    assert o.journal.pending() == 2
    old1 = o.journal.holds[(org, "old1")]
    assert (old1.t0_ms, old1.billed_uecu, old1.ttl_ms) == (deadline, 250, 0)
    assert o.journal.used(org) == 300 + 100
    assert await o.engine.replay_degraded() == 2
    b = await o.balance(org)
    assert (b.committed_uecu, b.orphan_committed_uecu, b.held_uecu) == (250, 250, 100)


async def test_an_open_local_hold_redis_cannot_cover_waits_until_its_deadline(
    outage: Outage,
) -> None:
    """An open local hold Redis cannot cover stays local (pending) while it may still be
    committed; once its deadline has passed it expired: replayed as nothing to bill."""
    o = outage
    org = await funded_org(o)
    now = degraded_now_ms()
    hold = {"org": org, "amount_uecu": GRANTED + 1, "team": "", "project": "", "user": "",
            "job": "gepa", "model": "", "t0_ms": now - 120_000, "ttl_ms": 60_000}  # fmt: skip
    lines = [
        {"op": "reserve", "reservation_id": "late", **hold, "deadline_ms": now - 60_000},
        {"op": "reserve", "reservation_id": "live", **hold, "deadline_ms": now + 60_000},
    ]
    o.path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    o.journal = o.open_journal()
    o.engine = o.new_engine()
    assert await o.engine.replay_degraded() == 1
    assert [e.rid for e in o.journal.pending_entries()] == ["live"]
    assert o.failures() == 0
    b = await o.balance(org)
    assert (b.held_uecu, b.reserved_uecu, b.committed_uecu) == (0, 0, 0)


async def test_a_priced_local_commit_reaches_the_ledger_with_its_lines(tmp_path: Path) -> None:
    """A commit priced from usage lines while Redis is down keeps its rate card version and
    priced lines through the journal and the replay, into the ledger."""
    db = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(db)
    ledger.migrate()
    o = Outage(tmp_path, allowance=GRANTED)
    rates = RateCardRegistry.from_file(EXAMPLE_RATE_CARD, warm_encodings=False)
    try:
        o.engine = QuotaEngine(o.store, o.settings, rates=rates, journal=o.journal)
        org = await funded_org(o)
        job = [InferenceSpec("gpt-4o-mini", prompt_tokens=1_000, max_output_tokens=500)]
        o.down()
        held = await o.engine.reserve(
            AccountRef(org), [ReserveItem("priced", 0, JobType.INFERENCE, ttl_ms=60_000, job=job)]
        )
        version = held.holds[0].rate_card_version
        assert held.degraded and version == rates.current.version
        used = [UsageLine("inference", "gpt-4o-mini", tokens_in=1_000, tokens_out=200, calls=1)]
        (c,) = await o.engine.commit(
            org, [CommitItem("priced", 0, rate_card_version=version, usage_lines=used)]
        )
        assert c.degraded and c.error is None and c.quote is not None
        assert 0 < c.committed_uecu < held.holds[0].amount_uecu
        o.up()
        assert await o.engine.replay_degraded() == 1
        await drain_into(o, ledger, db)
        rows = ledger_rows(db, org, "rate_card_version, breakdown, amount_uecu, orphan")
        assert len(rows) == 1
        assert rows[0][0] == version and json.loads(rows[0][1])
        assert (rows[0][2], rows[0][3]) == (c.committed_uecu, 1)
    finally:
        await o.close()
        ledger.close()


async def drain_into(o: Outage, ledger: Any, db: str) -> None:
    """Flush the test's outboxes into the ledger."""
    settings = make_settings(
        "redis",
        key_prefix=o.settings.key_prefix,
        ledger_url=db,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
    )
    store = RedisStore.from_settings(settings)
    try:
        await Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry())).drain()
    finally:
        await store.close()


def ledger_rows(db: str, org: str, columns: str) -> list[Any]:
    with sqlite3.connect(db.removeprefix("sqlite://")) as conn:
        return conn.execute(
            f"SELECT {columns} FROM usage_entries WHERE org_id = ? ORDER BY reservation_id",
            (org,),
        ).fetchall()


async def test_a_replay_after_the_tombstones_are_purged_is_settled_by_the_ledger(
    tmp_path: Path,
) -> None:
    """The crash-repeat comes back after Redis forgot the settled holds (tombstones purged): the
    ledger's record answers the repeat as a replay, so neither Redis nor the ledger bills
    again: a landed reserve committed locally (its commit's event id carries Redis's t0, which
    the journal does not know) and a Redis hold's commit journaled during the outage."""
    db = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(db)
    ledger.migrate()
    o = Outage(tmp_path, ledger_url=db)
    try:
        o.engine = o.new_engine(ledger)
        org = await funded_org(o)
        await o.engine.reserve(AccountRef(org), [step("remote", 300)])
        assert (await reserve_lost_reply(o, AccountRef(org), step("landed", 200))).degraded
        o.down()
        for rid, actual in (("landed", 210), ("remote", 250)):
            (c,) = await o.engine.commit(org, [CommitItem(rid, actual, Usage(calls=1))])
            assert c.degraded and c.error is None
        on_disk = o.path.read_text()
        o.up()
        assert await o.engine.replay_degraded() == 2
        await drain_into(o, ledger, db)
        first = await o.balance(org)
        for store in (o.store, o.direct):
            store.clock_offset_ms = o.settings.tombstone_ttl_ms + 60_000
        await o.direct.sweep(org)  # purges the tombstones

        o.path.write_text(on_disk)
        o.journal = o.open_journal()
        o.engine = o.new_engine(ledger)
        assert await o.engine.replay_degraded() == 2
        assert o.failures() == 0
        assert (await o.balance(org)).committed_uecu == first.committed_uecu == 210 + 250
        await drain_into(o, ledger, db)
        rows = ledger_rows(db, org, "reservation_id, amount_uecu")
        assert rows == [("landed", 210), ("remote", 250)]
        assert ledger.balance(org) == first.balance_uecu
    finally:
        await o.close()
        ledger.close()


async def test_a_hold_committed_locally_during_its_own_replay_is_replayed_again(
    tmp_path: Path,
) -> None:
    """The replay reserves an open local hold; before Redis's answer arrives, the hold is
    committed locally (Redis unreachable for that call). The reserve's success does not mark
    the hold done: the next pass replays its commit, against the real hold."""
    o = Outage(tmp_path, redis_timeout_ms=10_000)
    try:
        org = await funded_org(o)
        o.down()
        assert (await o.engine.reserve(AccountRef(org), [step("h", 400)])).degraded
        o.up()
        await o.store.balance(org)  # connected again before the delay
        o.proxy.delay_s = 1.0  # each way: the reply arrives a second after Redis ran it
        replay = asyncio.create_task(o.engine.replay_degraded())
        while (await o.direct.balance(org)).held_uecu == 0:
            assert not replay.done()
        # What commit_batch does when its own call answers UNAVAILABLE:
        out = o.engine.degraded.commit(org, [CommitItem("h", 300)])
        assert out.outcomes[0].committed_uecu == 300 and out.outcomes[0].degraded
        assert await replay == 0, "the hold's reserve replayed, its commit not yet"
        o.proxy.delay_s = 0.0
        assert o.journal.pending() == 1
        assert await o.engine.replay_degraded() == 1
        b = await o.balance(org)
        assert (b.committed_uecu, b.committed_from_holds_uecu, b.held_uecu) == (300, 300, 0)
        assert o.path.read_text() == ""
    finally:
        await o.close()


async def test_a_local_hold_settled_after_redis_returns_but_before_its_replay(
    outage: Outage,
) -> None:
    """Redis answers again before the replay ran: Redis knows neither local hold, but the
    journal does. Their commit and release go to the journal (usage is never dropped), and
    the replay then bills the commit once."""
    o = outage
    org = await funded_org(o)
    o.down()
    for rid in ("c", "r"):
        assert (await o.engine.reserve(AccountRef(org), [step(rid, 100)])).degraded
    o.up()
    (c,) = await o.engine.commit(org, [CommitItem("c", 90)])
    assert c.error is None and c.degraded and c.committed_uecu == 90
    rel = await o.engine.release(org, "r")
    assert rel.degraded and rel.released_uecu == 100
    assert (await o.balance(org)).committed_uecu == 0, "nothing billed before the replay"
    assert await o.engine.replay_degraded() == 2
    b = await o.balance(org)
    assert (b.committed_uecu, b.orphan_committed_uecu, b.held_uecu) == (90, 90, 0)
    assert await o.engine.replay_degraded() == 0
    assert (await o.balance(org)).committed_uecu == 90
