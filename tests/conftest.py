"""Shared fixtures: real Redis (required in CI), the embedded store, a running sidecar.

Set ECU_REQUIRE_SERVICES=1 (CI does) to turn "Redis unreachable -> skip" into a failure.
Every test gets its own key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import pytest_asyncio

from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import Conservation
from ecu_sidecar.model import Balance, GrantKind
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore, Transport

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
#: The example rate card shipped in the repository (docs/pricing.md).
EXAMPLE_RATE_CARD = str(Path(__file__).resolve().parent.parent / "ratecards" / "example.toml")
REQUIRE_SERVICES = os.environ.get("ECU_REQUIRE_SERVICES", "") not in ("", "0", "false")
ADMIN_TOKEN = "test-admin-token"


class ManualClock:
    """A monotonic clock (seconds) the test moves by hand: passed where the product takes a
    ``clock``, so a test steps time instead of sleeping."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


#: How often the polling helpers look again: short, as what they wait for is another process,
#: thread or task, not time passing.
POLL_S = 0.01


async def wait_until(condition: Callable[[], Any], what: str, limit_s: float = 20.0) -> Any:
    """Poll ``condition`` (a plain or async callable) until it returns something true, and
    return that; fail saying ``what`` did not happen after ``limit_s``. Only for what another
    task, thread or process brings about, never to let time pass for the code under test (step
    a clock for that). The one polling loop of the tests, with wait_until_sync."""
    give_up = time.monotonic() + limit_s
    while True:
        ok = condition()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return ok
        assert time.monotonic() < give_up, f"{what}: not within {limit_s:g} s"
        await asyncio.sleep(POLL_S)


def wait_until_sync(condition: Callable[[], Any], what: str, limit_s: float = 20.0) -> Any:
    """wait_until for code without an event loop (fixtures, helper classes, threads)."""
    give_up = time.monotonic() + limit_s
    while not (ok := condition()):
        assert time.monotonic() < give_up, f"{what}: not within {limit_s:g} s"
        time.sleep(POLL_S)
    return ok


#: gRPC channel options for a client that may connect before its server listens: attempts 50 ms
#: apart (the default backoff waits 1 s after a refused connection, then longer).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]


#: assert_conserved's default for the ledger: not asked (a row of None is an unknown organization).
_UNASKED: Any = object()


def assert_conserved(
    balance: Balance | None = None, ledger: Conservation | None = _UNASKED
) -> None:
    """The product's conservation identities hold, checked by the product's own definitions:
    Redis's counters (``balance``) by ``Balance.conservation_faults`` (ecu_sidecar/model.py);
    the ledger's (``ledger``, what ``Ledger.conservation`` returned) by its query's ``ok``; and
    given both, the ledger holds Redis's wallet counters (after a drain). The tests' one
    conservation check: none re-derives the identities."""
    if balance is not None:
        faults = balance.conservation_faults()
        assert faults == [], faults
    if ledger is _UNASKED:
        return
    assert ledger is not None and ledger.ok, ledger
    if balance is not None:
        got = (ledger.granted_uecu, ledger.expired_grants_uecu, ledger.committed_uecu)
        want = (balance.granted_uecu, balance.expired_grants_uecu, balance.committed_uecu)
        assert (got, ledger.balance_uecu) == (want, balance.balance_uecu), (ledger, balance)


def redis_reachable(host: str = REDIS_HOST, port: int = REDIS_PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> None:
    """Skip when Redis is down, unless the run forbids skipping (CI): then fail."""
    if redis_reachable():
        return
    message = f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and ECU_REQUIRE_SERVICES is set", pytrace=False)
    pytest.skip(message)


def make_settings(backend: str, **overrides: Any) -> Settings:
    """Settings for a test: a fresh key prefix, the admin token, the given backend."""
    raw: dict[str, tuple[str, Any]] = {
        "key_prefix": ("test", "t" + uuid.uuid4().hex[:12]),
        "admin_token": ("test", ADMIN_TOKEN),
        "listen": ("test", "127.0.0.1:0"),
        "rate_card_file": ("test", EXAMPLE_RATE_CARD),
        # Generous: a loaded CI machine must not turn functional tests into latency tests
        # (the tests of the timeout itself set their own).
        "redis_timeout_ms": ("test", 2_000),
        "ledger_timeout_ms": ("test", 10_000),
    }
    if backend == "redis":
        raw["redis_url"] = ("test", REDIS_URL)
    for key, value in overrides.items():
        raw[key] = ("test", value)
    return Settings.from_mapping(raw)


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each engine test runs on real Redis and on the embedded store."""
    if request.param == "redis":
        require_redis()
    return request.param


@pytest.fixture
def settings(backend: str) -> Settings:
    return make_settings(backend)


#: The embedded stores' servers, by key prefix (each test has its own): direct_client reaches
#: the same data as the store open_store made.
_EMBEDDED_SERVERS: dict[str, Any] = {}


def open_store(settings: Settings) -> RedisStore:
    """The store under test, as ``RedisStore.from_settings`` makes it; on the embedded backend
    its in-process server is kept so that ``direct_client`` reaches the same data."""
    if not settings.embedded:
        return RedisStore.from_settings(settings)
    import fakeredis

    server = _EMBEDDED_SERVERS.setdefault(settings.key_prefix, fakeredis.FakeServer())
    return RedisStore(Transport.embedded(settings, server), settings)


def direct_client(settings: Settings) -> Any:
    """A Redis client of the test's own on the store's server (same URL, or the embedded server
    ``open_store`` made), to look at or damage keys under ``settings.key_prefix`` directly. It
    waits longer than the product (ECU_REDIS_CONNECT_TIMEOUT_MS is 250 ms): a look that lands
    on a moment when the loaded test machine stalls must not fail the test."""
    if settings.embedded:
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=_EMBEDDED_SERVERS[settings.key_prefix])
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_url, socket_connect_timeout=10)
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=10, socket_timeout=30)


@pytest_asyncio.fixture
async def store(settings: Settings) -> AsyncIterator[RedisStore]:
    st = open_store(settings)
    yield st
    await drop_keys(settings)
    await st.close()
    _EMBEDDED_SERVERS.pop(settings.key_prefix, None)


@pytest_asyncio.fixture
async def direct(settings: Settings) -> AsyncIterator[Any]:
    """``direct_client(settings)``, closed after the test."""
    client = direct_client(settings)
    yield client
    await client.aclose()


@pytest.fixture
def engine(store: RedisStore, settings: Settings) -> QuotaEngine:
    return QuotaEngine(store, settings)


async def drop_keys(settings: Settings) -> None:
    """Delete a test's keys (also a test's way to make Redis lose them). An embedded store not
    made by ``open_store`` is left alone: its keys go with it."""
    if settings.embedded and settings.key_prefix not in _EMBEDDED_SERVERS:
        return
    client = direct_client(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
        for k in keys:
            await client.delete(k)
    finally:
        await client.aclose()


async def snapshot(settings: Settings) -> dict[bytes, Any]:
    """Every key under the test's prefix with its full contents (streams, hashes, zsets), read
    with ``direct_client`` (on the embedded backend, of a store ``open_store`` made)."""
    client = direct_client(settings)
    out: dict[bytes, Any] = {}
    try:
        async for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
            kind = (await client.type(key)).decode()
            if kind == "hash":
                out[key] = ("hash", await client.hgetall(key))
            elif kind == "zset":
                out[key] = ("zset", await client.zrange(key, 0, -1, withscores=True))
            elif kind == "stream":
                out[key] = ("stream", await client.xrange(key))
            else:
                out[key] = (kind, await client.dump(key))
    finally:
        await client.aclose()
    return out


async def funded(engine: QuotaEngine, amount: int, org: str | None = None) -> str:
    """A fresh organization granted ``amount`` µECU."""
    org = org or "org-" + uuid.uuid4().hex[:8]
    await engine.grant(org, "seed-" + uuid.uuid4().hex[:8], amount, GrantKind.TOP_UP)
    return org


@pytest_asyncio.fixture
async def sidecar(settings: Settings) -> AsyncIterator[SidecarServer]:
    """A running sidecar on 127.0.0.1 (ephemeral port), on the test's backend."""
    server = SidecarServer(settings, store=open_store(settings))
    await server.start()
    yield server
    try:
        await drop_keys(settings)
    finally:
        # Stopped even when the cleanup fails: a grpc.aio server left running keeps its poller
        # thread alive, and pytest then hangs at exit instead of reporting the failure.
        await server.stop(grace=0)


@pytest_asyncio.fixture
async def stub(sidecar: SidecarServer) -> AsyncIterator[quota_pb2_grpc.QuotaStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield quota_pb2_grpc.QuotaStub(channel)


ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


# -- the ledger databases ----------------------------------------------------------------

PG_URL = os.environ.get("ECU_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_error() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=2):
            return None
    except Exception as exc:
        return f"PostgreSQL is not reachable at {PG_URL}: {exc}"


def require_postgres() -> None:
    """Skip when PostgreSQL is down, unless the run forbids skipping (CI): then fail."""
    error = postgres_error()
    if error is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(error + " and ECU_REQUIRE_SERVICES is set", pytrace=False)
    pytest.skip(error)


@dataclass
class Database:
    """A fresh, empty database for one test, and raw access to it (to inject faults)."""

    dialect: str
    url: str

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        if self.dialect == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite://")) as conn:
                conn.execute(sql, params)
        else:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql.replace("?", "%s"), params)


@pytest.fixture
def pair() -> Iterator[Any]:
    """A Redis primary and its replica of the test's own (tests/replicated_redis.py)."""
    from tests.replicated_redis import ReplicatedRedis

    require_redis()
    servers = ReplicatedRedis()
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", f"sqlite://{tmp_path}/ledger.db")
        return
    require_postgres()
    import psycopg

    schema = "ledger_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield Database("postgresql", f"{PG_URL}{sep}options=-csearch_path%3D{schema}")
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_admin(sql: str) -> None:
    """One statement on the test server's maintenance connection (autocommit)."""
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@contextlib.contextmanager
def own_pg_database() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of the test's own, (name, url), for faults that act on a whole
    database (read-only, refusing connections); dropped afterwards, whatever happened."""
    require_postgres()
    name = "ecu_test_" + uuid.uuid4().hex[:12]
    pg_admin(f"CREATE DATABASE {name}")
    parts = urlsplit(PG_URL)
    try:
        yield name, urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        pg_admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_read_only(name: str, on: bool) -> None:
    """Make a database's new sessions read-only (``default_transaction_read_only``), as a
    standby's are, and end its open sessions so that a pool reconnects to read-only ones; or
    let new sessions write again (open ones stay as they were opened)."""
    if on:
        pg_admin(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        pg_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )
    else:
        pg_admin(f"ALTER DATABASE {name} RESET default_transaction_read_only")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """One 3-master Redis Cluster (tests/redis_cluster.py) for the whole session, shared by
    every module that needs it; torn down (processes, directory) at the end."""
    from tests.redis_cluster import cluster_or_skip

    with cluster_or_skip(masters=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_settings(redis_cluster: Any) -> Settings:
    """Settings of a test on the session's cluster (its own key prefix)."""
    # Generous timeouts: a loaded CI machine must not turn this into a latency test.
    return make_settings(
        "redis",
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_timeout_ms=2_000,
        redis_connect_timeout_ms=2_000,
    )


@pytest.fixture
def private_redis() -> Iterator[Any]:
    """A redis-server of the test's own on 127.0.0.1 (tests.test_unavailable.PrivateRedis), to
    kill, freeze and restart."""
    from tests.test_unavailable import PrivateRedis

    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server binary not found and ECU_REQUIRE_SERVICES is set")
        pytest.skip("redis-server binary not found")
    server = PrivateRedis()
    server.start()
    yield server
    server.close()
