"""The multiplexed script channel (ecu_sidecar/store/multiplex.py) against real redis-servers:
replies matched to their callers under concurrency, error replies, timeouts, restarts, a
frozen peer, failover retirement, AUTH/SELECT and Unix sockets."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
import redis
from redis.exceptions import AuthenticationError, ConnectionError, NoScriptError, ResponseError

from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.model import GrantKind
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.multiplex import ScriptChannel, multiplexable
from tests.conftest import make_settings, wait_until
from tests.test_unavailable import PrivateRedis

ECHO = "return {ARGV[1], tonumber(ARGV[2]) * 2}"


def _clients(port: int) -> int:
    """Connections open now, the probe's own included."""
    return int(redis.Redis(port=port).info("clients")["connected_clients"])


def _connections(port: int) -> int:
    """Connections the server has accepted since it started."""
    return int(redis.Redis(port=port).info("stats")["total_connections_received"])


def test_which_urls_are_multiplexed() -> None:
    assert multiplexable("redis://127.0.0.1:6379/0")
    assert multiplexable("unix:///run/redis.sock")
    assert multiplexable("rediss://127.0.0.1:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none")
    # TLS options the channel does not apply: redis-py's pool alone, which does.
    assert not multiplexable("rediss://127.0.0.1:6380/0?ssl_ciphers=HIGH")
    assert not multiplexable("redis+sentinel://127.0.0.1:26379/mymaster")


async def test_concurrent_calls_share_one_connection(private_redis: PrivateRedis) -> None:
    channel = ScriptChannel(f"redis://127.0.0.1:{private_redis.port}/0", connect_timeout_s=2)
    before = _connections(private_redis.port)
    try:
        replies = await asyncio.gather(
            *(channel.execute("EVAL", ECHO, 0, f"caller-{i}", i) for i in range(500))
        )
    finally:
        await channel.close()
    assert replies == [[f"caller-{i}".encode(), 2 * i] for i in range(500)]
    # The info call above and below are connections of their own: one more is the channel's.
    assert _connections(private_redis.port) - before == 2


async def test_error_replies_keep_the_stream_in_step(private_redis: PrivateRedis) -> None:
    channel = ScriptChannel(f"redis://127.0.0.1:{private_redis.port}/0", connect_timeout_s=2)
    try:
        calls = [
            channel.execute("EVALSHA", "0" * 40, 0),
            channel.execute("EVAL", ECHO, 0, "a", 1),
            channel.execute("EVAL", "return redis.call('NOPE')", 0),
            channel.execute("EVAL", ECHO, 0, "b", 2),
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await channel.close()
    assert isinstance(results[0], NoScriptError)  # redis-py's class: the store's fallback
    assert results[1] == [b"a", 2]
    assert isinstance(results[2], ResponseError) and "Unknown Redis command" in str(results[2])
    assert results[3] == [b"b", 4]


async def test_a_late_reply_goes_to_nobody(private_redis: PrivateRedis) -> None:
    """A caller that gave up does not receive another caller's reply, nor leave its own late
    reply to the next caller."""
    channel = ScriptChannel(f"redis://127.0.0.1:{private_redis.port}/0", connect_timeout_s=2)
    slow = (
        "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); "
        "if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 300000 then return 'slow' end end"
    )
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await channel.execute("EVAL", slow, 0)
        assert await channel.execute("EVAL", ECHO, 0, "next", 21) == [b"next", 42]
    finally:
        await channel.close()


async def test_a_restarted_server_is_a_connection_error_then_a_fresh_connection(
    private_redis: PrivateRedis,
) -> None:
    """The channel does not retry (store/transport.py does, tests/test_transport.py): a call on
    a connection the server closed fails with ConnectionError, and the next one connects anew."""
    channel = ScriptChannel(f"redis://127.0.0.1:{private_redis.port}/0", connect_timeout_s=2)
    try:
        assert await channel.execute("EVAL", ECHO, 0, "x", 1) == [b"x", 2]
        private_redis.kill()
        private_redis.start()
        with pytest.raises(ConnectionError):  # sent on the old connection, which is gone
            await channel.execute("EVAL", ECHO, 0, "y", 2)
        assert await channel.execute("EVAL", ECHO, 0, "y", 2) == [b"y", 4]
        private_redis.kill()
        with pytest.raises(ConnectionError):
            await channel.execute("EVAL", ECHO, 0, "z", 3)
    finally:
        await channel.close()


async def test_store_aborts_a_stalled_connection_and_recovers(private_redis: PrivateRedis) -> None:
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{private_redis.port}/0",
        redis_timeout_ms=200,
        redis_connect_timeout_ms=200,
    )
    store = RedisStore.from_settings(settings)
    try:
        await store.grant("acme", "g", 1_000, GrantKind.TOP_UP, 0)
        private_redis.freeze()
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.sweep("acme")
        private_redis.thaw()
        # The connection that owed replies for a whole timeout was aborted: the next call
        # connects afresh (one more connection beside the probe's own) instead of queueing
        # behind it.
        before = _connections(private_redis.port)
        assert (await store.balance("acme")).balance_uecu == 1_000
        assert _connections(private_redis.port) - before == 2
    finally:
        private_redis.thaw()
        await store.close()


async def test_retired_connection_finishes_its_calls(private_redis: PrivateRedis) -> None:
    channel = ScriptChannel(f"redis://127.0.0.1:{private_redis.port}/0", connect_timeout_s=2)
    try:
        await channel.execute("PING")
        before = _connections(private_redis.port)
        pending = [
            asyncio.ensure_future(channel.execute("EVAL", ECHO, 0, "o", i)) for i in range(50)
        ]
        await asyncio.sleep(0)  # written on the old connection
        channel.retire()
        fresh = await channel.execute("EVAL", ECHO, 0, "n", 1)
        assert [await p for p in pending] == [[b"o", 2 * i] for i in range(50)]
        assert fresh == [b"n", 2]
        # A fresh connection took the new call (one more beside the probe's own); the old one
        # closed once drained: the probe and the fresh one are all that is left.
        assert _connections(private_redis.port) - before == 2
        await wait_until(lambda: _clients(private_redis.port) == 2, "the retired connection closed")
    finally:
        await channel.close()


async def test_auth_and_database_from_the_url(private_redis: PrivateRedis) -> None:
    admin = redis.Redis(port=private_redis.port)
    admin.execute_command("ACL", "SETUSER", "ecu", "on", ">s3cret", "~*", "+@all")
    channel = ScriptChannel(
        f"redis://ecu:s3cret@127.0.0.1:{private_redis.port}/3", connect_timeout_s=2
    )
    try:
        await channel.execute("SET", "where", "db3")
        assert redis.Redis(port=private_redis.port, db=3).get("where") == b"db3"
        assert admin.get("where") is None
    finally:
        await channel.close()
    wrong = ScriptChannel(
        f"redis://ecu:wrong@127.0.0.1:{private_redis.port}/0", connect_timeout_s=2
    )
    with pytest.raises(AuthenticationError):
        await wrong.execute("PING")


async def test_unix_socket(private_redis: PrivateRedis) -> None:
    srv = PrivateRedis()
    path = os.path.join(srv.dir, "redis.sock")
    srv.extra_args = ("--unixsocket", path, "--unixsocketperm", "700")
    srv.start()
    try:
        channel = ScriptChannel(f"unix://{path}?db=2", connect_timeout_s=2)
        try:
            assert await channel.execute("EVAL", ECHO, 0, "u", 5) == [b"u", 10]
            await channel.execute("SET", "k", "v")
        finally:
            await channel.close()
        assert redis.Redis(port=srv.port, db=2).get("k") == b"v"
    finally:
        srv.close()


async def test_unreachable_server_is_a_connection_error() -> None:
    probe = PrivateRedis()  # a free port nobody listens on
    channel = ScriptChannel(f"redis://127.0.0.1:{probe.port}/0", connect_timeout_s=1)
    with pytest.raises(ConnectionError):
        await channel.execute("PING")
    shutil.rmtree(probe.dir, ignore_errors=True)
