"""Redis SIGKILLed mid-load and restarted on the same data directory (AOF, ``appendfsync
always``): no acknowledged operation is lost.

A sidecar (in this process) serves several gRPC workers that reserve, commit, release and
abandon holds over several organizations. Each round the private redis-server is SIGKILLed
while calls are in flight, left down for a moment (calls answer UNAVAILABLE, fast), and
restarted on the same port and directory. Afterwards every call whose outcome was unknown is
retried with the same ids, and then:

- every call that was answered OK is in Redis: its hold record exists with its amount; an
  acknowledged commit has state C and the committed amount the worker was told; an
  acknowledged release has state R (or E);
- every account's counters equal the sums of its hold records (nothing lost, nothing counted
  twice) and conservation holds;
- the outboxes survived too: drained into a SQLite ledger, the ledger equals Redis.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from ecu_sidecar.ledger import open_ledger
from tests.chaos.support import (
    Recorder,
    audit,
    check_acked,
    grant,
    ledger_agrees,
    new_flusher,
    replay_unknown,
    scale,
    serving,
    worker,
    write_result,
)
from tests.conftest import make_settings

pytestmark = pytest.mark.chaos

ORGS = [f"aof-{i}" for i in range(4)]


async def test_redis_sigkill_with_aof_loses_no_acknowledged_operation(
    redis_servers: Any, tmp_path: Path
) -> None:
    redis = redis_servers(aof=True)
    url = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(url)
    ledger.migrate()
    settings = make_settings(
        "redis",
        redis_url=redis.url,
        redis_timeout_ms=300,
        redis_connect_timeout_ms=300,
        ledger_url=url,
        flusher_claim_idle_ms=0,
        flusher_discovery_interval_ms=0,
    )
    rounds = scale(3, 12)
    rec = Recorder()
    rng = random.Random(7)
    async with serving(settings) as (server, stub):
        for org in ORGS:
            await grant(stub, org, 50_000_000)
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(worker(rec, stub, ORGS, stop, seed, deadline_s=3.0))
            for seed in range(8)
        ]
        downtime: list[float] = []
        in_flight: list[int] = []
        try:
            for _ in range(rounds):
                await asyncio.sleep(rng.uniform(0.2, 0.5))
                for _ in range(200):  # the kill must land while calls are in flight
                    if any(not c.code for c in rec.calls):
                        break
                    await asyncio.sleep(0.005)
                in_flight.append(sum(1 for c in rec.calls if not c.code))
                redis.kill()
                t0 = time.monotonic()
                await asyncio.sleep(0.15)
                redis.start()
                downtime.append(time.monotonic() - t0)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        codes = rec.codes()
        acked = sum(1 for c in rec.calls if c.ok)
        # Every failure was the store being away, answered as such; nothing else.
        failures = {k: v for k, v in codes.items() if not k.startswith(("OK", "RESOURCE"))}
        assert set(failures) <= {"UNAVAILABLE/STORE_UNAVAILABLE"}, failures
        unknown = await replay_unknown(rec, stub)
        store = server.store
        for org in ORGS:
            check_acked(await audit(store, org, settings), rec, org)
        flusher = new_flusher(store, ledger, settings)
        await flusher.drain()
        for org in ORGS:
            await ledger_agrees(ledger, store, org)
    ledger.close()
    result = {
        "kills": rounds,
        "calls": len(rec.calls),
        "acknowledged": acked,
        "unknown_then_retried": unknown,
        "in_flight_at_each_kill": in_flight,
        "codes": codes,
        "lost": 0,
        "max_downtime_s": round(max(downtime), 3),
    }
    write_result("redis_sigkill_aof", result)
    print(f"redis SIGKILL (AOF always): {result}")
