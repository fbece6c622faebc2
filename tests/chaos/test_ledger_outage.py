"""PostgreSQL refuses the flusher, then comes back: the flusher backs off, keeps every event in
the outboxes, and catches up exactly.

The machine's PostgreSQL server is never stopped. The test creates a database of its own,
makes it refuse connections (``ALTER DATABASE … ALLOW_CONNECTIONS false`` and
``pg_terminate_backend`` of its sessions: the open pool connections die, new ones are refused),
and later allows them again; the database is dropped at the end.

While the ledger is away, traffic keeps flowing into Redis: ``ecu_flusher_write_errors_total``
grows (slowly: the flusher backs off instead of hot-looping), the outboxes keep their entries.
When it is back, the flusher drains them; the ledger then equals Redis exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from ecu_sidecar import errors
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import AccountRef, CommitItem, GrantKind, JobType, ReserveItem, Usage
from ecu_sidecar.store import RedisStore
from tests.chaos.support import audit, ledger_agrees, new_flusher, scale, write_result
from tests.conftest import PG_URL, drop_keys, make_settings, require_postgres, require_redis

pytestmark = pytest.mark.chaos

ORGS = [f"pg-{i}" for i in range(3)]


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def own_database() -> Iterator[tuple[str, str]]:
    """A database of the test's own: (name, url); dropped afterwards, whatever happened."""
    name = "ecu_chaos_" + uuid.uuid4().hex[:12]
    admin(f"CREATE DATABASE {name}")
    parts = urlsplit(PG_URL)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    try:
        yield name, url
    finally:
        admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def refuse(name: str) -> None:
    admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )


def allow(name: str) -> None:
    admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


async def traffic(engine: QuotaEngine, stop: asyncio.Event, seed: int) -> int:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        org = rng.choice(ORGS)
        rid = f"t{seed}-{n}"
        n += 1
        amount = rng.randint(1_000, 30_000)
        try:
            await engine.reserve(AccountRef(org), [ReserveItem(rid, amount, JobType.GEPA)])
        except errors.InsufficientEcu:
            continue
        if rng.random() < 0.7:
            actual = rng.choice([0, amount // 2, amount, 2 * amount])
            await engine.commit(org, [CommitItem(rid, actual, Usage(calls=1))])
        else:
            await engine.release(org, rid)
        await asyncio.sleep(0.002)
    return n


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (a function returning a bool or an awaitable of one), bounded."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ok = predicate()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout_s}s")


async def test_postgres_refuses_then_returns_flusher_catches_up() -> None:
    require_redis()
    require_postgres()
    outages = scale(1, 4)
    with own_database() as (name, url):
        settings = make_settings(
            "redis",
            ledger_url=url,
            flusher_interval_ms=10,
            flusher_claim_idle_ms=0,
            flusher_discovery_interval_ms=0,
            reconcile_interval_ms=200,
        )
        with open_ledger(url) as setup:  # the schema, without the outage's short pool wait
            setup.migrate()
        ledger = open_ledger(url, timeout_s=0.5)
        store = RedisStore.from_settings(settings)
        engine = QuotaEngine(store, settings, ledger=ledger)
        flusher = new_flusher(store, ledger, settings)
        reg = flusher.metrics.registry

        def metric(name: str, labels: dict[str, str] | None = None) -> float:
            return reg.get_sample_value(name, labels or {}) or 0.0

        async def outbox_length() -> int:
            return sum([(await store.outbox_state(o)).length for o in ORGS])

        async def caught_up() -> bool:
            for org in ORGS:
                state = await flusher.reader.state(org)
                if not (state.fully_flushed and state.length == 0):
                    return False
            return True

        stop_flusher = asyncio.Event()
        runner = asyncio.create_task(flusher.run(stop_flusher))
        stats: list[dict[str, Any]] = []
        try:
            for org in ORGS:
                await engine.grant(org, "g1", 500_000_000, GrantKind.TOP_UP)
            for outage in range(outages):
                stop = asyncio.Event()
                load = [
                    asyncio.create_task(traffic(engine, stop, 10 * outage + s)) for s in range(4)
                ]
                await asyncio.sleep(0.3)
                errors_before = metric("ecu_flusher_write_errors_total")
                refuse(name)
                t_down = time.monotonic()
                await wait_for(
                    lambda b=errors_before: metric("ecu_flusher_write_errors_total") >= b + 2,
                    20,
                    "two failed ledger writes",
                )
                await asyncio.sleep(0.5)
                backlog = await outbox_length()
                assert backlog > 0, "events must stay in the outbox while the ledger is away"
                down_s = time.monotonic() - t_down
                errors_down = metric("ecu_flusher_write_errors_total") - errors_before
                # Backing off, not hot-looping: a handful of attempts per second at most.
                assert errors_down <= 10 * down_s + 5, (errors_down, down_s)
                allow(name)
                t_up = time.monotonic()
                await asyncio.sleep(0.2)
                stop.set()
                ops = sum(await asyncio.gather(*load))
                await wait_for(caught_up, 60, "the flusher catching up")
                stats.append(
                    {
                        "ops": ops,
                        "down_s": round(down_s, 2),
                        "write_errors": errors_down,
                        "backlog_while_down": backlog,
                        "catch_up_s": round(time.monotonic() - t_up, 2),
                    }
                )
            for org in ORGS:
                await audit(store, org, settings)
                await ledger_agrees(ledger, store, org)
        finally:
            stop_flusher.set()
            await asyncio.wait_for(runner, 30)
            await drop_keys(settings)
            await store.close()
            ledger.close()
    result = {
        "outages": stats,
        "events_written": metric("ecu_flusher_events_total", {"result": "written"}),
        "events_redelivered_and_skipped": metric(
            "ecu_flusher_events_total", {"result": "duplicate"}
        ),
        "lost": 0,
        "applied_twice": 0,
    }
    write_result("postgres_outage", result)
    print(f"postgres outage: {result}")
