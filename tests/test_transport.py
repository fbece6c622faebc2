"""One bound, one retry rule and one error mapping whatever the transport (store/transport.py):
the same behaviour tests on the multiplexed channel (redis://), redis-py's pool alone (what
rediss:// and Sentinel URLs use), redis-py's cluster client and the embedded store."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis

from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.model import AccountRef, GrantKind, JobType, ReserveItem
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore, Transport
from tests.conftest import make_settings, open_store
from tests.redis_cluster import RedisClusterProcess, cluster_or_skip
from tests.test_unavailable import PrivateRedis, free_port

TIMEOUT_MS = 300

KINDS = ["multiplexed", "pooled", "cluster"]


@dataclass
class Target:
    """A store on one transport kind, and what the test does to its Redis."""

    store: RedisStore
    settings: Settings
    ports: list[int]
    pids: list[int]

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def flush_scripts(self) -> None:
        for port in self.ports:
            with self.admin(port) as c:
                assert c.script_flush()

    def cut_connections(self) -> None:
        """Every client connection but the admin's closed by Redis (a peer reset)."""
        for port in self.ports:
            with self.admin(port) as c:
                c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    def freeze(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcess]:
    with cluster_or_skip(masters=3) as c:
        yield c


@pytest_asyncio.fixture(params=KINDS)
async def target(
    request: pytest.FixtureRequest, private_redis: PrivateRedis
) -> AsyncIterator[Target]:
    if request.param == "cluster":
        c: RedisClusterProcess = request.getfixturevalue("cluster")
        settings = make_settings(
            "redis", redis_url=c.url, redis_cluster=True, redis_timeout_ms=TIMEOUT_MS
        )
        transport = Transport.cluster(settings)
        ports, pids = list(c.ports), [p.pid for p in c.processes]
    else:
        settings = make_settings(
            "redis",
            redis_url=f"redis://127.0.0.1:{private_redis.port}/0",
            redis_timeout_ms=TIMEOUT_MS,
        )
        opened = {"multiplexed": Transport.multiplexed, "pooled": Transport.pooled}
        transport = opened[request.param](settings)
        assert transport.multiplexed_scripts == (request.param == "multiplexed")
        assert private_redis.proc is not None
        ports, pids = [private_redis.port], [private_redis.proc.pid]
    t = Target(RedisStore(transport, settings), settings, ports, pids)
    yield t
    t.thaw()
    await t.store.close()


def org() -> str:
    return f"org-{time.monotonic_ns()}"


async def test_a_flushed_script_cache_falls_back_to_eval(target: Target) -> None:
    name = org()
    await target.store.grant(name, "g", 1_000, GrantKind.TOP_UP, 0)
    target.flush_scripts()
    out = await target.store.reserve(
        AccountRef(name), [ReserveItem("r", 10, JobType.GEPA, "", 60_000)]
    )
    assert out.available_uecu == 990
    assert (await target.store.balance(name)).held_uecu == 10


async def test_a_silent_redis_is_unavailable_within_the_bound(target: Target) -> None:
    name = org()
    await target.store.grant(name, "g", 1_000, GrantKind.TOP_UP, 0)
    target.freeze()
    try:
        for call in (
            lambda: target.store.balance(name),
            lambda: target.store.reserve(AccountRef(name), [ReserveItem("r", 1, JobType.GEPA)]),
            lambda: target.store.ping(),
        ):
            started = time.monotonic()
            # The bound's own message; on a Cluster the client's socket timeout (the same
            # ECU_REDIS_TIMEOUT_MS, which its failover handling reads) may come first.
            with pytest.raises(StoreUnavailable, match=r"within|unreachable: TimeoutError"):
                await call()
            assert time.monotonic() - started < 3 * TIMEOUT_MS / 1000 + 0.5
    finally:
        target.thaw()
    # The same store serves again (the reserve may have run on thawing: an unknown outcome).
    assert (await target.store.balance(name)).granted_uecu == 1_000


async def test_a_broken_connection_is_sent_once_more(target: Target) -> None:
    name = org()
    await target.store.grant(name, "g", 1_000, GrantKind.TOP_UP, 0)
    for i in range(3):
        target.cut_connections()
        out = await target.store.reserve(
            AccountRef(name), [ReserveItem(f"r{i}", 10, JobType.GEPA, "", 60_000)]
        )
        assert not out.replayed and out.available_uecu == 1_000 - 10 * (i + 1)


async def test_a_restarted_redis_is_served_again_and_a_dead_one_is_unavailable(
    private_redis: PrivateRedis,
) -> None:
    """Standalone kinds (a cluster's restart is a failover: tests/test_cluster.py)."""
    for opened in (Transport.multiplexed, Transport.pooled):
        settings = make_settings(
            "redis",
            redis_url=f"redis://127.0.0.1:{private_redis.port}/0",
            redis_timeout_ms=TIMEOUT_MS,
        )
        store = RedisStore(opened(settings), settings)
        try:
            await store.grant("acme", "g", 1_000, GrantKind.TOP_UP, 0)
            private_redis.kill()
            private_redis.start()  # empty: the account is gone, the connections broken
            await store.grant("acme", "g", 500, GrantKind.TOP_UP, 0)
            assert (await store.balance("acme")).granted_uecu == 500
            private_redis.kill()
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await store.balance("acme")
            private_redis.start()
        finally:
            await store.close()


async def test_the_embedded_store_falls_back_to_eval_too() -> None:
    settings = make_settings("embedded")
    store = open_store(settings)
    direct: Any = None
    try:
        from tests.conftest import direct_client

        direct = direct_client(settings)
        await store.grant("acme", "g", 1_000, GrantKind.TOP_UP, 0)
        await direct.script_flush()
        out = await store.reserve(
            AccountRef("acme"), [ReserveItem("r", 10, JobType.GEPA, "", 60_000)]
        )
        assert out.available_uecu == 990
    finally:
        if direct is not None:
            await direct.aclose()
        await store.close()


class TlsRedis:
    """A redis-server of the test's own serving TLS only, with a CA and a certificate for
    127.0.0.1 made for it."""

    def __init__(self, directory: Path) -> None:
        self.ca = str(directory / "ca.pem")
        key, cert, ca_key = (str(directory / n) for n in ("key.pem", "cert.pem", "ca.key"))
        run = functools.partial(subprocess.run, check=True, capture_output=True)
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=test-ca", "-keyout", ca_key, "-out", self.ca])  # fmt: skip
        csr = str(directory / "req.csr")
        run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", key, "-out", csr])  # fmt: skip
        ext = directory / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key,
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", cert])  # fmt: skip
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", self.ca,
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for attempt in range(200):
            try:
                with self.admin() as c:
                    c.ping()
                return
            except redis.ConnectionError:
                assert attempt < 199, "the TLS redis-server did not come up"
                time.sleep(0.05)

    def admin(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.ca, socket_timeout=5
        )

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("openssl or redis-server not on PATH")
    t = TlsRedis(tmp_path)
    yield t
    t.close()


@pytest.mark.parametrize("kind", ["multiplexed", "pooled"])
async def test_rediss_behaves_as_redis(tls_redis: TlsRedis, kind: str) -> None:
    """rediss:// takes the multiplexed channel as redis:// does (the pool alone beside it, for
    comparison): NOSCRIPT falls back to EVAL, a broken connection is sent once more."""
    settings = make_settings(
        "redis",
        redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}",
        redis_timeout_ms=2_000,
    )
    transport = Transport.open(settings) if kind == "multiplexed" else Transport.pooled(settings)
    assert transport.multiplexed_scripts == (kind == "multiplexed")
    store = RedisStore(transport, settings)
    try:
        await store.grant("acme", "g", 1_000, GrantKind.TOP_UP, 0)
        with tls_redis.admin() as admin:
            assert admin.script_flush()
        one = ReserveItem("r1", 10, JobType.GEPA, "", 60_000)
        assert (await store.reserve(AccountRef("acme"), [one])).available_uecu == 990
        with tls_redis.admin() as admin:
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        two = ReserveItem("r2", 10, JobType.GEPA, "", 60_000)
        assert (await store.reserve(AccountRef("acme"), [two])).available_uecu == 980
    finally:
        await store.close()
