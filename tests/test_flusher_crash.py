"""Exactly once under crashes: the real `ecu-sidecar flush` process is SIGKILLed, many times,
at each dangerous point (before the ledger insert; after the commit and before the Redis
acknowledgement) while traffic keeps flowing; afterwards the ledger equals Redis, nothing is
missing, nothing is counted twice, and no entry is left pending. Also two flusher processes at
once, and Redis restarted empty mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from redis.exceptions import ResponseError

from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.ledger import Ledger, open_ledger
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.outbox import GROUP
from tests.conftest import (
    REDIS_URL,
    Database,
    assert_conserved,
    direct_client,
    drop_keys,
    make_settings,
    require_redis,
    wait_until,
)
from tests.test_flusher import item, traffic

ORGS = ["crash-a", "crash-b", "crash-c"]


class Rig:
    """Real Redis, a migrated ledger, and the engine producing traffic in this process."""

    def __init__(self, settings: Settings, ledger: Ledger, url: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.url = url
        self.store = RedisStore.from_settings(settings)
        self.direct = direct_client(settings)
        self.engine = QuotaEngine(self.store, settings, ledger=ledger)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
        env.update(
            ECU_REDIS_URL=self.settings.redis_url,
            ECU_KEY_PREFIX=self.settings.key_prefix,
            ECU_LEDGER_URL=self.url,
            ECU_FLUSHER_BATCH="7",
            ECU_FLUSHER_INTERVAL_MS="5",
            ECU_FLUSHER_CLAIM_IDLE_MS="0",
            ECU_FLUSHER_DISCOVERY_INTERVAL_MS="0",
            ECU_RECONCILE_INTERVAL_MS="100",
            ECU_LOG_LEVEL="WARNING",
        )
        env.update(extra)
        return env

    def flusher(self, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ecu_sidecar", "flush", *args],
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest_asyncio.fixture
async def rig(database: Database) -> AsyncIterator[Rig]:
    require_redis()
    settings = make_settings("redis", redis_url=REDIS_URL, ledger_url=database.url)
    ledger = open_ledger(database.url)
    ledger.migrate()
    r = Rig(settings, ledger, database.url)
    for i, org in enumerate(ORGS):
        await r.engine.grant(org, "g1", 5_000_000 * (i + 1), GrantKind.TOP_UP)
    yield r
    await drop_keys(settings)
    await r.store.close()
    await r.direct.aclose()
    ledger.close()


class Load:
    """Traffic on ORGS from this process until ``stop`` is set; ``rounds`` counts the rounds
    done so far (what a test waits on instead of sleeping)."""

    def __init__(self, engine: QuotaEngine, seed: int) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.rounds = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.gather(*(traffic(self.engine, org, 3, self.rng) for org in ORGS))
            except StoreUnavailable:
                # A loaded machine may time a call out: an unknown outcome, which the audit at
                # the end covers (Redis is the reference); keep the traffic flowing (the
                # timeout itself paced it).
                pass
            self.rounds += 1


async def wait_exit(proc: subprocess.Popen[bytes], limit_s: float = 60) -> tuple[int, str]:
    try:
        await wait_until(lambda: proc.poll() is not None, "the flusher exiting", limit_s)
    except AssertionError:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"flusher did not exit in time:\n{err.decode()[-3000:]}") from None
    _, err = proc.communicate()
    return proc.returncode, err.decode()


async def assert_exactly_once(rig: Rig) -> None:
    for org in ORGS:
        b = await rig.engine.balance(org)
        assert_conserved(b, await asyncio.to_thread(rig.ledger.conservation, org))
        acct = await asyncio.to_thread(rig.ledger.account, org)
        assert acct is not None
        holds = acct.holds
        # Every reserve, release and expiry Redis counted is in the ledger exactly once.
        assert (holds.reserved_uecu, holds.released_uecu, holds.expired_uecu) == (
            b.reserved_uecu,
            b.released_uecu,
            b.expired_uecu,
        )
        key = rig.store.outbox_key(org)
        assert await rig.direct.xlen(key) == 0, "every entry acknowledged and deleted"
        pending = await rig.direct.xpending(key, GROUP)
        assert pending["pending"] == 0


@pytest.mark.parametrize("point", ["before_insert", "after_commit"])
async def test_sigkill_at_each_dangerous_point_loses_and_duplicates_nothing(
    rig: Rig, point: str
) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(Load(rig.engine, seed=len(point)).run(stop))
    kills = 0
    try:
        for round_ in range(6):
            nth = 1 + round_ % 3
            proc = rig.flusher(ECU_FLUSHER_FAULT=f"{point}:{nth}")
            code, err = await wait_exit(proc)
            assert code == -signal.SIGKILL, err
            assert f"SIGKILL at {point} of batch {nth}" in err
            kills += 1
    finally:
        stop.set()
        await load
    assert kills == 6
    # Batches of 7 put the kill points early in each run; the final drain of the backlog the
    # traffic left is not under test, so it takes big batches (small ones took 10 s here).
    proc = rig.flusher("--once", ECU_FLUSHER_BATCH="1000")
    code, err = await wait_exit(proc)
    assert code == 0, err
    await assert_exactly_once(rig)


async def test_two_flusher_processes_at_once(rig: Rig) -> None:
    stop = asyncio.Event()
    load = Load(rig.engine, seed=11)
    running = asyncio.create_task(load.run(stop))
    procs = [rig.flusher(), rig.flusher()]
    # Both flushers drain concurrently while traffic flows: wait until each process has read
    # the outbox (it shows up as a consumer of the group) and traffic went on after that
    # (counted rounds, not a sleep).
    seen: set[int] = set()

    async def both_reading() -> bool:
        for org in ORGS:
            with contextlib.suppress(ResponseError):  # no group yet: nobody has read
                for c in await rig.direct.xinfo_consumers(rig.store.outbox_key(org), GROUP):
                    name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                    seen.update(p.pid for p in procs if f"-{p.pid}-" in name)
        done = running.done() or any(p.poll() is not None for p in procs)
        return len(seen) == len(procs) or done

    await wait_until(both_reading, "both flusher processes reading the outbox", limit_s=60)
    rounds = load.rounds
    await wait_until(lambda: load.rounds >= rounds + 3 or running.done(), "traffic meanwhile")
    stop.set()
    await running
    # SIGTERM: each drains what is left (its final flush) and exits 0.
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        code, err = await wait_exit(proc)
        assert code == 0, err
    lengths = [await rig.direct.xlen(rig.store.outbox_key(o)) for o in ORGS]
    assert lengths == [0] * len(ORGS), "every outbox drained"
    await assert_exactly_once(rig)


async def test_redis_restarted_empty_mid_run(database: Database, tmp_path: Any) -> None:
    """A private redis-server, killed and restarted with nothing: balances are rebuilt from
    the ledger with the holds outstanding there, no reservation can overspend, and a hold made
    before the crash commits as the live hold it is again."""
    from tests.test_unavailable import PrivateRedis

    redis = PrivateRedis()
    redis.start()
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{redis.port}/0",
        ledger_url=database.url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.metrics import FlusherMetrics

    store = RedisStore.from_settings(settings)
    engine = QuotaEngine(store, settings, ledger=ledger)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))
    try:
        org = "phoenix"
        await engine.grant(org, "g1", 1_000_000, GrantKind.TOP_UP)
        await traffic(engine, org, 20, random.Random(2))
        await engine.reserve(AccountRef(org), [item("survivor", 50_000)])
        await flusher.drain()
        ledger_balance = await asyncio.to_thread(ledger.balance, org)
        account = await asyncio.to_thread(ledger.account, org)
        assert account is not None
        outstanding = account.holds.outstanding_uecu  # the survivor and abandoned holds
        assert outstanding >= 50_000

        redis.kill()
        redis.start()  # same port, empty

        b = await engine.balance(org)  # rebuilt on first use, outstanding holds restored
        assert b.balance_uecu == ledger_balance and b.held_uecu == outstanding
        assert_conserved(b)
        # No overspend: exactly what the ledger balance leaves beside the restored holds can
        # be reserved, not a micro-ECU more.
        free = ledger_balance - outstanding
        await engine.reserve(AccountRef(org), [item("all-of-it", free)])
        from ecu_sidecar import errors

        with pytest.raises(errors.InsufficientEcu):
            await engine.reserve(AccountRef(org), [item("one-more", 1)])
        await engine.release(org, "all-of-it")
        # The hold made before the crash is live again: its commit settles it normally.
        (done,) = await engine.commit(org, [CommitItem("survivor", 30_000)])
        assert done.error is None and not done.late and done.committed_uecu == 30_000
        assert done.released_uecu == 20_000
        await flusher.drain()
        b = await engine.balance(org)
        c = await asyncio.to_thread(ledger.conservation, org)
        assert_conserved(b, c)
        assert c is not None and c.balance_uecu == ledger_balance - 30_000 == b.balance_uecu
    finally:
        await store.close()
        ledger.close()
        redis.close()
