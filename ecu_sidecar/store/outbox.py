"""The Redis side of the flusher: find outbox streams, read them with a consumer group,
claim what dead consumers left pending, acknowledge and delete what the ledger committed.

Streams are found by SCAN (``<prefix>:{*}:outbox``, type stream) on every primary, so a
Redis Cluster needs no registry key (which would sit in another slot than the scripts that
write the streams). Discovery runs periodically; a new organization's stream is picked up at
the next discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from redis.exceptions import ConnectionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.store.redis_store import RedisStore, _s, refusal
from ecu_sidecar.store.streams import GROUP, StreamState, stream_state

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def _store_errors(timeout_s: float) -> Iterator[None]:
    """Redis unreachable, silent or refusing -> StoreUnavailable, as for the scripts (the
    flusher backs off)."""
    try:
        yield
    except TimeoutError:  # before OSError, of which it is a subclass
        raise StoreUnavailable(
            f"Redis did not answer the flusher within {timeout_s * 1000:.0f} ms"
        ) from None
    except (ConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {type(exc).__name__}") from None
    except ResponseError as exc:
        # READONLY (a primary demoted under the flusher), NOREPLICAS, OOM, LOADING ...: Redis
        # cannot serve now, as the scripts meet it; not a ledger failure.
        word = refusal(exc)
        if word is None:
            raise
        raise StoreUnavailable(f"Redis cannot serve the flusher: {word}") from None


def _unavailable(
    fn: Callable[Concatenate[OutboxReader, P], Awaitable[R]],
) -> Callable[Concatenate[OutboxReader, P], Awaitable[R]]:
    """Each call bounded by ECU_FLUSHER_REDIS_TIMEOUT_MS (the reader's own bound: the store's
    client sets no socket timeout, and a bulk read needs longer than a script), and Redis
    unreachable or silent -> StoreUnavailable."""

    @functools.wraps(fn)
    async def wrapped(self: OutboxReader, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with _store_errors(self.timeout_s):
                async with asyncio.timeout(self.timeout_s):
                    return await fn(self, *args, **kwargs)
        except StoreUnavailable as exc:
            if exc.message.endswith(": ReadOnlyError"):
                await self.store.demoted()
            raise

    return wrapped


__all__ = ["GROUP", "OutboxEntry", "OutboxReader", "StreamState"]


@dataclass(slots=True)
class OutboxEntry:
    """One event read from an organization's outbox (never changed once read; not frozen, for
    the flusher's speed: see ledger.events.Event)."""

    org: str
    entry_id: str
    fields: dict[str, str]


class OutboxReader:
    """Consumer-group access to every organization's outbox, for one flusher process."""

    def __init__(self, store: RedisStore, consumer: str) -> None:
        self.store = store
        self.consumer = consumer
        self._client = store._client
        self._reads = store._client
        """Who runs XREADGROUP: on a standalone Redis, a client of its own on the store's pool
        that hands back the replies as hiredis parsed them. redis-py's callback turns every
        entry into a tuple and a dict (parse_stream_list, pairs_to_dict): about 1 µs an entry,
        more than reading it."""
        if store.kind == "standalone":
            self._reads = type(store._client)(connection_pool=store._client.connection_pool)
            self._reads.set_response_callback("XREADGROUP", _as_sent)
        self.timeout_s = store._settings.flusher_redis_timeout_ms / 1000
        """The bound on each call (ECU_FLUSHER_REDIS_TIMEOUT_MS)."""
        prefix = store._settings.key_prefix
        self._match = f"{prefix}:{{*}}:outbox"
        self._known: set[str] = set()

    @staticmethod
    def org_of(key: str) -> str:
        """The organization in a key ``<prefix>:{org}:outbox``."""
        return key[key.index("{") + 1 : key.rindex("}")]

    async def discover(self) -> list[str]:
        """Organizations that have an outbox stream (SCAN over every primary)."""
        orgs = await self._scan()
        for org in orgs:
            if org not in self._known:
                await self._ensure_group(org)
                self._known.add(org)
        return sorted(orgs)

    async def _scan(self) -> list[str]:
        # Bounded on progress rather than as a whole: the walk grows with the keyspace, and
        # every SCAN reply that arrives moves the deadline.
        loop = asyncio.get_running_loop()
        orgs = []
        with _store_errors(self.timeout_s):
            async with (
                asyncio.timeout(self.timeout_s) as bound,
                contextlib.aclosing(
                    self._client.scan_iter(match=self._match, count=1000, _type="stream")
                ) as keys,
            ):
                moved = loop.time()
                async for key in keys:
                    orgs.append(self.org_of(_s(key)))
                    if loop.time() - moved > self.timeout_s / 4:
                        moved = loop.time()
                        bound.reschedule(moved + self.timeout_s)
        return orgs

    @_unavailable
    async def _ensure_group(self, org: str) -> None:
        try:
            await self._client.xgroup_create(
                self.store.outbox_key(org), GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_unavailable
    async def read(
        self, orgs: list[str], count: int | Mapping[str, int], *, own_pending: bool = False
    ) -> list[OutboxEntry]:
        """New entries (never delivered) of these organizations, up to ``count`` per stream
        (or ``count[org]``); with ``own_pending``, the entries already delivered to this
        consumer and not yet acknowledged instead (after a read whose reply was lost)."""
        if not orgs:
            return []
        start = "0" if own_pending else ">"
        pipe = self._reads.pipeline(transaction=False)
        for org in orgs:
            n = count if isinstance(count, int) else count[org]
            pipe.xreadgroup(GROUP, self.consumer, {self.store.outbox_key(org): start}, count=n)
        replies = await pipe.execute(raise_on_error=False)
        out: list[OutboxEntry] = []
        for org, reply in zip(orgs, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" in str(reply):  # the stream was recreated (Redis lost it)
                    await self._ensure_group(org)
                    continue
                raise reply
            for entries in _streams(reply):
                out.extend(self._entries(org, entries))
        return out

    @_unavailable
    async def claim(self, orgs: list[str], min_idle_ms: int, count: int) -> list[OutboxEntry]:
        """Entries another consumer read but did not acknowledge for ``min_idle_ms``."""
        if not orgs:
            return []
        pipe = self._client.pipeline(transaction=False)
        for org in orgs:
            pipe.xautoclaim(
                self.store.outbox_key(org), GROUP, self.consumer, min_idle_ms, "0-0", count=count
            )
        replies = await pipe.execute(raise_on_error=False)
        out: list[OutboxEntry] = []
        for org, reply in zip(orgs, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" not in str(reply):
                    raise reply
                await self._ensure_group(org)  # the stream was recreated (Redis lost it)
                continue
            out.extend(self._entries(org, reply[1]))
        return out

    @_unavailable
    async def ack(self, entries: list[OutboxEntry]) -> None:
        """Acknowledge and delete entries the ledger has committed."""
        by_org: dict[str, list[str]] = {}
        for e in entries:
            by_org.setdefault(e.org, []).append(e.entry_id)
        pipe = self._client.pipeline(transaction=False)
        for org, ids in by_org.items():
            key = self.store.outbox_key(org)
            pipe.xack(key, GROUP, *ids)
            pipe.xdel(key, *ids)
        await pipe.execute()

    @_unavailable
    async def state(self, org: str) -> StreamState:
        """The stream's last id and the ledger group's progress on it."""
        return await stream_state(self._client, self.store.outbox_key(org))

    @_unavailable
    async def oldest_pending_ms(self, org: str) -> int | None:
        """Timestamp (ms) of the oldest entry not yet acknowledged, or None."""
        key = self.store.outbox_key(org)
        first: list[Any] = await self._client.xrange(key, count=1)
        if not first:
            return None
        return int(_s(first[0][0]).split("-")[0])

    @staticmethod
    def _entries(org: str, entries: list[Any]) -> list[OutboxEntry]:
        """Entries as [id, fields]: fields a flat list (as Redis sends them) or a dict (through
        redis-py's callback)."""
        out = []
        for eid, fields in entries:
            if fields is None:  # an entry deleted while pending comes back empty
                continue
            try:
                decoded = {k.decode(): v.decode() for k, v in _pairs(fields)}
            except (AttributeError, UnicodeDecodeError):
                # Text from a decoding client, or bytes that are not UTF-8: kept losslessly
                # (as surrogates), so that the ledger quarantines the entry instead of this
                # cycle failing on it forever.
                decoded = {_text(k): _text(v) for k, v in _pairs(fields)}
            out.append(OutboxEntry(org, eid.decode() if isinstance(eid, bytes) else eid, decoded))
        return out


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def _streams(reply: Any) -> Iterator[list[Any]]:
    """The entry lists of an XREADGROUP reply: a map of stream -> entries (RESP3), a list of
    [stream, entries] (RESP2, and redis-py's callback), or nothing."""
    if not reply:
        return iter(())
    if isinstance(reply, dict):
        return iter(reply.values())
    return (entries for _key, entries in reply)


def _pairs(fields: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(fields, list):
        flat = iter(fields)
        return zip(flat, flat, strict=False)
    return iter(fields.items())


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)
