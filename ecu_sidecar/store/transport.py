"""How the store reaches Redis: one bound, one retry rule and one error mapping for every call,
whatever the URL.

Every call goes through ``Transport.bounded``:
- **one bound**: ECU_REDIS_TIMEOUT_MS (the flusher's bulk stream calls pass their own,
  ECU_FLUSHER_REDIS_TIMEOUT_MS; the embedded store, which has no network, a fixed 10 s of
  queueing); past it, StoreUnavailable, an unknown outcome;
- **one retry rule**: a broken connection (ConnectionError: Redis restarted, a peer reset, a
  demoted Sentinel primary) is retried once on a fresh connection, inside the same bound, for
  calls that are safe to resend: every script (a resend of a script that did run is answered
  as a replay of its caller's id), pipelines of them, reads and acknowledgements. A call whose
  resend would take something twice says so (``retry=False``: XREADGROUP, whose lost reply
  leaves entries delivered to this consumer, re-read as its own pending instead); an iteration
  of many round trips (SCAN, ``walk``) starts again from its beginning. A timeout is
  never retried here: the command may still run, so the caller retries with the same id.
  redis-py's own retries are off (``_NO_RETRY``) so that this is the only one;
- **one error mapping**: unreachable, silent or refusing (READONLY, OOM, LOADING, ...) Redis
  -> StoreUnavailable; a script's NOSCRIPT -> EVAL of its source (``script``).

Connections: a standalone Redis (``redis://``, ``rediss://``, ``unix://``) takes script calls
on one multiplexed connection (store/multiplex.py: 1.25-1.48 x less sidecar CPU at c=64 than
redis-py's pool, docs/benchmarks.md "levers") and everything else on redis-py's blocking pool;
Sentinel URLs use the pool alone, Redis Cluster redis-py's cluster client, the embedded default
fakeredis. Which one serves a call changes nothing above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.settings import SENTINEL_SCHEME, Settings, SettingsError, parse_sentinel_url
from ecu_sidecar.store.multiplex import ScriptChannel, multiplexable
from ecu_sidecar.store.scripts import Script

__all__ = ["EMBEDDED_TIMEOUT_S", "Transport", "refusal"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Bound on one embedded-store call: it has no network to lose, its only latency is queueing
#: behind other scripts on this process's CPU, so a burst must wait rather than fail.
EMBEDDED_TIMEOUT_S = 10.0

#: redis-py retries nothing: Transport.bounded holds the one retry rule.
_NO_RETRY = Retry(NoBackoff(), 0)

#: Replies that mean "this node cannot serve now": answered as UNAVAILABLE, never as a bug.
#: redis-py turns most of them into exception classes (and strips the code from the text);
#: the rest are recognized by the reply's first word.
_UNAVAILABLE_ERRORS = (ReadOnlyError, OutOfMemoryError, ClusterDownError, TryAgainError, AskError)
_UNAVAILABLE_PREFIXES = (
    "READONLY",
    "OOM",
    "LOADING",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "NOREPLICAS",
    "MOVED",
    "ASK",
)


def refusal(exc: ResponseError) -> str | None:
    """The name of a reply that means "this node cannot serve now" (READONLY, NOREPLICAS,
    OOM, LOADING, CLUSTERDOWN ...), answered as UNAVAILABLE; None for any other error."""
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return type(exc).__name__
    if str(exc).startswith(_UNAVAILABLE_PREFIXES):
        return str(exc).split()[0]
    return None


class Transport:
    """One Redis deployment's connections, and the rules every call to it follows."""

    def __init__(
        self,
        client: Any,
        *,
        kind: str,
        timeout_s: float,
        channel: ScriptChannel | None = None,
        gate: int = 0,
    ) -> None:
        self.client = client
        """redis-py's client (pool, cluster or fakeredis): for commands other than script
        calls, run inside ``bounded``."""
        self.kind = kind
        """'embedded', 'standalone' or 'cluster'."""
        self.timeout_s = timeout_s
        """The bound on each call."""
        self._channel = channel
        # redis-py's cluster client (and Sentinel's pool) has no blocking pool: past
        # max_connections it fails at once. Calls queue here instead, inside the same bound.
        self._gate = asyncio.Semaphore(gate) if gate else None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Settings) -> Transport:
        """The transport ECU_REDIS_URL names (embedded when it is empty)."""
        if settings.embedded:
            return cls.embedded(settings)
        if settings.redis_cluster:
            return cls.cluster(settings)
        if settings.redis_url.startswith(SENTINEL_SCHEME):
            return cls.sentinel(settings)
        if multiplexable(settings.redis_url):
            return cls.multiplexed(settings)
        return cls.pooled(settings)

    @classmethod
    def embedded(cls, settings: Settings, server: Any = None) -> Transport:
        """The in-process store (fakeredis); ``server``: its FakeServer (a fresh one if None;
        a test passes its own to look at the same data). The `embedded` extra installs it;
        without it (the container image), ECU_REDIS_URL is required."""
        try:
            import fakeredis
        except ImportError:
            raise SettingsError(
                "ECU_REDIS_URL is not set and the embedded store is not installed: set "
                "ECU_REDIS_URL, or install the embedded extra (pip install 'ecu-sidecar[embedded]')"
            ) from None

        client = fakeredis.FakeAsyncRedis(
            server=server or fakeredis.FakeServer(),
            max_connections=settings.redis_pool_size,
            connection_pool_class=aioredis.BlockingConnectionPool,
        )
        return cls(client, kind="embedded", timeout_s=EMBEDDED_TIMEOUT_S)

    @classmethod
    def pooled(cls, settings: Settings) -> Transport:
        """A standalone Redis through redis-py's blocking pool alone (what ``rediss://`` uses):
        under a burst, calls queue for a connection within the bound."""
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=settings.redis_timeout_ms / 1000,
            **_common(settings),
        )
        return cls(
            aioredis.Redis(connection_pool=pool),
            kind="standalone",
            timeout_s=settings.redis_timeout_ms / 1000,
        )

    @classmethod
    def multiplexed(cls, settings: Settings) -> Transport:
        """A standalone Redis: script calls on one multiplexed connection, the rest pooled."""
        pooled = cls.pooled(settings)
        pooled._channel = ScriptChannel(
            settings.redis_url, connect_timeout_s=settings.redis_connect_timeout_ms / 1000
        )
        return pooled

    @classmethod
    def cluster(cls, settings: Settings) -> Transport:
        """A Redis Cluster through redis-py's cluster client."""
        # reinitialize_steps=0: a MOVED reply only patches that slot's route. With the default
        # (a full topology refresh every 5th MOVED), redis-py closes every node's connections,
        # including those other in-flight commands are using; and a client not yet initialized
        # sends its first commands to one node regardless of key, so a concurrent first burst
        # gets many MOVEDs and fails with ConnectionError
        # (tests/test_cluster.py::test_cold_client_concurrent_burst).
        client = RedisCluster.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            reinitialize_steps=0,
            socket_timeout=settings.redis_timeout_ms / 1000,
            **_common(settings),
        )
        return cls(
            client,
            kind="cluster",
            timeout_s=settings.redis_timeout_ms / 1000,
            gate=settings.redis_pool_size,
        )

    @classmethod
    def sentinel(cls, settings: Settings) -> Transport:
        """The primary a Sentinel URL names, through redis-py's Sentinel support: its address
        is asked of the Sentinels on each new connection, and a connection that meets READONLY
        (a demoted primary) fails with ConnectionError, which the retry rule sends once more
        on a fresh connection to the new primary."""
        url = parse_sentinel_url(settings.redis_url)
        connect_s = settings.redis_connect_timeout_ms / 1000
        sentinel = Sentinel(
            list(url.sentinels),
            sentinel_kwargs={"socket_connect_timeout": connect_s, "socket_timeout": connect_s},
            socket_connect_timeout=connect_s,
        )
        common = _common(settings)
        client = sentinel.master_for(
            url.service,
            redis_class=aioredis.Redis,
            db=url.db,
            username=url.username,
            password=url.password,
            max_connections=settings.redis_pool_size,
            retry=common["retry"],
            health_check_interval=common["health_check_interval"],
        )
        return cls(
            client,
            kind="standalone",
            timeout_s=settings.redis_timeout_ms / 1000,
            gate=settings.redis_pool_size,
        )

    @property
    def multiplexed_scripts(self) -> bool:
        """Whether script calls take the multiplexed connection."""
        return self._channel is not None

    # -- calls ------------------------------------------------------------------------------

    async def bounded(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> T:
        """Run ``fn`` under the bound (``timeout_s``, default the transport's), once more on
        a broken connection when ``retry``; every failure of Redis as StoreUnavailable."""
        bound = self.timeout_s if timeout_s is None else timeout_s
        async with self._mapped(bound), asyncio.timeout(bound):
            if self._gate is None:
                return await _once_more(fn, retry)
            async with self._gate:
                return await _once_more(fn, retry)

    async def walk(self, iterate: Callable[[], AsyncIterator[T]], *, timeout_s: float) -> list[T]:
        """Every item of ``iterate()``, an iteration of many round trips (SCAN): each step
        bounded by ``timeout_s`` (the whole grows with the keyspace); after a broken connection
        the iteration once more from its start, by the same rule (a read takes nothing twice)."""

        async def steps() -> list[T]:
            items: list[T] = []
            async with contextlib.aclosing(iterate()) as it:  # type: ignore[type-var]
                while True:
                    async with asyncio.timeout(timeout_s):
                        try:
                            items.append(await anext(it))
                        except StopAsyncIteration:
                            return items

        async with self._mapped(timeout_s):
            return await _once_more(steps, True)

    @contextlib.asynccontextmanager
    async def _mapped(self, bound: float) -> AsyncIterator[None]:
        """Every failure of Redis inside the block as StoreUnavailable (the one mapping)."""
        started = time.monotonic()
        try:
            yield
        except TimeoutError:
            if self._channel is not None:
                self._channel.stalled(started)
            raise StoreUnavailable(f"Redis did not answer within {bound * 1000:.0f} ms") from None
        except (
            ConnectionError,
            RedisTimeoutError,
            BusyLoadingError,
            RedisClusterException,
            OSError,
        ) as exc:
            raise StoreUnavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        except ResponseError as exc:
            if isinstance(exc, ReadOnlyError):
                await self.demoted()
            word = refusal(exc)
            if word is not None:
                raise StoreUnavailable(f"Redis cannot serve: {word}") from None
            raise

    async def script(self, script: Script, keys: Sequence[str], argv: Sequence[Any]) -> Any:
        """EVALSHA the script (EVAL of its source on NOSCRIPT), bounded and retried as above."""

        channel = self._channel
        execute = self.client.execute_command if channel is None else channel.execute

        async def run() -> Any:
            try:
                return await execute("EVALSHA", script.sha, len(keys), *keys, *argv)
            except NoScriptError:
                log.debug("script %s not cached on this node; loading it", script.name)
                return await execute("EVAL", script.source, len(keys), *keys, *argv)

        return await self.bounded(run)

    async def pipeline(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip to the node that owns ``key``; error replies in place.
        Not bounded by itself: run it inside ``bounded``.

        Never on the multiplexed connection: a WAIT in it blocks the connection it is sent on,
        and on the one connection every script call shares it would hold all of them behind
        it for up to ECU_REDIS_WAIT_TIMEOUT_MS each. A pooled connection blocks only itself."""
        if self.kind == "cluster":
            return await self._cluster_pipeline(key, commands)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    async def _cluster_pipeline(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        # redis-py's cluster pipeline routes a keyless WAIT to a node of its own choosing:
        # the commands go as one pipeline on a connection of the key's primary instead, so
        # that WAIT counts the replicas of the node that ran the script.
        client = self.client
        await client.initialize()  # a no-op unless a failure asked for a fresh layout
        for _ in range(2):
            node = client.get_node_from_key(key)
            cmds = [PipelineCommand(i, *c) for i, c in enumerate(commands)]
            try:
                await node.execute_pipeline(cmds)
            except (ConnectionError, RedisTimeoutError):
                # As redis-py's own command path does: this node's connections are stale and
                # the layout is to be learned again (the primary may have failed over).
                node.update_active_connections_for_reconnect()
                await node.disconnect_free_connections()
                client.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
                client._initialize = True  # read by initialize() above
                raise
            first = cmds[0].result
            if isinstance(first, MovedError):
                # The slot moved (resharding, or a failover seen by the node we reached): the
                # script did not run there. Learn the new owner and send it once more.
                await client.nodes_manager.move_slot(first)
                continue
            return [c.result for c in cmds]
        raise StoreUnavailable("Redis cannot serve: MOVED")

    async def node_groups(self, keys: dict[str, str]) -> dict[str, list[str]]:
        """Names (the keys of ``keys``) grouped by the primary that holds their key (one group
        but on a Cluster), for commands that go once per node."""
        names = list(keys)
        if self.kind != "cluster":
            return {"": names} if names else {}
        await self.bounded(lambda: self.client.initialize())  # a no-op once initialized
        groups: dict[str, list[str]] = {}
        for name in names:
            node = self.client.get_node_from_key(keys[name]).name
            groups.setdefault(node, []).append(name)
        return groups

    async def info(self, key: str, section: str) -> Any:
        """INFO ``section`` of the primary that owns ``key`` (unbounded: run inside ``bounded``)."""
        if self.kind == "cluster":
            return await self.client.get_node_from_key(key).execute_command("INFO", section)
        return await self.client.execute_command("INFO", section)

    async def demoted(self) -> None:
        """Called when Redis answered READONLY: on a standalone Redis, the node we reach was
        demoted to a replica (a failover behind a stable address). Drop every idle pooled
        connection so the next calls connect afresh and find the new primary, instead of
        failing on READONLY forever."""
        if self.kind != "standalone":
            return
        log.warning("Redis answered READONLY: reconnecting")
        # Only idle connections: those in use by other calls are dropped when they are
        # released after meeting READONLY themselves (tearing them down mid-handshake would
        # surface as an internal error in those calls).
        await self.client.connection_pool.disconnect(inuse_connections=False)
        if self._channel is not None:
            self._channel.retire()

    async def close(self) -> None:
        """Close the multiplexed connection and the pool."""
        if self._channel is not None:
            await self._channel.close()
        await self.client.aclose()


async def _once_more(fn: Callable[[], Awaitable[T]], retry: bool) -> T:
    """The retry rule (see the module's docstring)."""
    if not retry:
        return await fn()
    try:
        return await fn()
    except ConnectionError:
        log.debug("Redis connection broken under a call: sending it once more")
    return await fn()


def _common(settings: Settings) -> dict[str, Any]:
    # No socket_timeout (but on a Cluster): Transport.bounded bounds every call already, and
    # with one set redis-py wraps each send in asyncio.wait_for (a new Task per command) and
    # each read in another timeout: a fifth of a script call's CPU.
    return {
        "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
        "retry": _NO_RETRY,
        "health_check_interval": 30,
    }
