"""The Redis side of the flusher: find outbox streams, read them with a consumer group,
claim what dead consumers left pending, acknowledge and delete what the ledger committed.

Streams are found by SCAN (``<prefix>:{*}:outbox``, type stream) on every primary, so a
Redis Cluster needs no registry key (which would sit in another slot than the scripts that
write the streams). Discovery runs periodically; a new organization's stream is picked up at
the next discovery.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from redis.exceptions import ResponseError

from ecu_sidecar.store.codec import text as _s
from ecu_sidecar.store.scripts import Script
from ecu_sidecar.store.streams import GROUP, StreamState, stream_state
from ecu_sidecar.store.transport import Transport

__all__ = ["GROUP", "Backlog", "OutboxEntry", "OutboxReader", "StreamState"]

#: Run on its own (not after the quota scripts' _lib.lua): it touches the outbox alone.
_FORGET_CONSUMERS = Script.load("forget_consumers", prelude=False)

P = ParamSpec("P")
R = TypeVar("R")


def _bounded(
    *, retry: bool = True
) -> Callable[
    [Callable[Concatenate[OutboxReader, P], Awaitable[R]]],
    Callable[Concatenate[OutboxReader, P], Awaitable[R]],
]:
    """The method as one call of the store's transport: bounded by ECU_FLUSHER_REDIS_TIMEOUT_MS,
    errors as StoreUnavailable, retried once on a broken connection when ``retry`` (see
    store/transport.py: not a read whose lost reply delivered entries to this consumer)."""

    def wrap(
        fn: Callable[Concatenate[OutboxReader, P], Awaitable[R]],
    ) -> Callable[Concatenate[OutboxReader, P], Awaitable[R]]:
        @functools.wraps(fn)
        async def bounded(self: OutboxReader, *args: P.args, **kwargs: P.kwargs) -> R:
            return await self._transport.bounded(
                lambda: fn(self, *args, **kwargs), timeout_s=self.timeout_s, retry=retry
            )

        return bounded

    return wrap


@dataclass(slots=True)
class OutboxEntry:
    """One event read from an organization's outbox (never changed once read; not frozen, for
    the flusher's speed: see ledger.events.Event)."""

    org: str
    entry_id: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Backlog:
    """What some outboxes hold that the ledger may not have yet."""

    length: int
    """Entries in the streams (once leftovers are removed: those not acknowledged)."""
    pending: int
    """Entries delivered to a flusher and not yet acknowledged."""
    oldest_ms: int | None
    """Creation time (Unix ms, from its id) of the oldest entry not acknowledged; None when
    there is none."""
    removed: int
    """Entries acknowledged but left in a stream, deleted by this look (``tidy``)."""


class OutboxReader:
    """Consumer-group access to every organization's outbox, for one flusher process."""

    def __init__(self, transport: Transport, prefix: str, consumer: str, *, timeout_s: float):
        self._transport = transport
        self._prefix = prefix
        self.consumer = consumer
        self._client = transport.client
        self.timeout_s = timeout_s
        """The bound on each call (ECU_FLUSHER_REDIS_TIMEOUT_MS)."""
        self._match = f"{prefix}:{{*}}:outbox"
        self._known: set[str] = set()

    def key(self, org: str) -> str:
        """The organization's outbox stream."""
        return f"{self._prefix}:{{{org}}}:outbox"

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
        keys = await self._transport.walk(
            lambda: self._client.scan_iter(match=self._match, count=1000, _type="stream"),
            timeout_s=self.timeout_s,
        )
        return [self.org_of(_s(key)) for key in keys]

    @_bounded()
    async def _ensure_group(self, org: str) -> None:
        try:
            await self._client.xgroup_create(self.key(org), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_bounded(retry=False)  # a lost reply's entries are re-read as our own pending
    async def read(
        self, orgs: list[str], count: int | Mapping[str, int], *, own_pending: bool = False
    ) -> list[OutboxEntry]:
        """New entries (never delivered) of these organizations, up to ``count`` per stream
        (or ``count[org]``); with ``own_pending``, the entries already delivered to this
        consumer and not yet acknowledged instead (after a read whose reply was lost)."""
        if not orgs:
            return []
        start = "0" if own_pending else ">"
        pipe = self._client.pipeline(transaction=False)
        for org in orgs:
            n = count if isinstance(count, int) else count[org]
            pipe.xreadgroup(GROUP, self.consumer, {self.key(org): start}, count=n)
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

    @_bounded(retry=False)  # a lost reply's entries are claimed again once idle
    async def claim(
        self,
        orgs: list[str],
        min_idle_ms: int,
        count: int | Mapping[str, int],
        start: Mapping[str, str] | None = None,
    ) -> tuple[list[OutboxEntry], dict[str, str]]:
        """Entries another consumer read but did not acknowledge for ``min_idle_ms``, up to
        ``count`` per stream (or ``count[org]``), scanning each stream's pending entries from
        ``start[org]`` (default: the first). Returns them, and where the scan of each stream
        stopped short of its end (a cursor to start from next time): the streams absent from
        it were scanned to the end."""
        if not orgs:
            return [], {}
        start = start or {}
        pipe = self._client.pipeline(transaction=False)
        for org in orgs:
            n = count if isinstance(count, int) else count[org]
            key = self.key(org)
            pipe.xautoclaim(key, GROUP, self.consumer, min_idle_ms, start.get(org, "0-0"), count=n)
        replies = await pipe.execute(raise_on_error=False)
        out: list[OutboxEntry] = []
        more: dict[str, str] = {}
        for org, reply in zip(orgs, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" not in str(reply):
                    raise reply
                await self._ensure_group(org)  # the stream was recreated (Redis lost it)
                continue
            cursor = _s(reply[0])
            if cursor != "0-0":
                more[org] = cursor
            out.extend(self._entries(org, reply[1]))
        return out, more

    @_bounded()
    async def ack(self, entries: list[OutboxEntry]) -> None:
        """Acknowledge and delete entries the ledger has committed."""
        by_org: dict[str, list[str]] = {}
        for e in entries:
            by_org.setdefault(e.org, []).append(e.entry_id)
        pipe = self._client.pipeline(transaction=False)
        for org, ids in by_org.items():
            key = self.key(org)
            pipe.xack(key, GROUP, *ids)
            pipe.xdel(key, *ids)
        await pipe.execute()

    @_bounded()
    async def state(self, org: str) -> StreamState:
        """The stream's last id and the ledger group's progress on it."""
        return await stream_state(self._client, self.key(org))

    @_bounded()
    async def backlog(self, orgs: list[str], *, tidy: bool = False) -> Backlog:
        """What the outboxes of ``orgs`` hold that is not acknowledged, and the age of its
        oldest entry (pending with a flusher, or never delivered): not the stream's first
        entry, which may be one acknowledged and left behind (a flusher, or Redis, died
        between XACK and XDEL). With ``tidy``, those leftovers are deleted.

        One pipelined round trip (XINFO GROUPS, XPENDING, XINFO STREAM per stream), and one
        more for the streams that have leftovers. Deleting them is safe beside live flushers:
        the group's last-delivered id is read before its pending entries (in this order, on
        one connection), so an entry below both that id and the oldest pending entry had been
        delivered and was no longer pending: acknowledged, never to be delivered again. One
        left above an entry still pending goes once that one is acknowledged."""
        if not orgs:
            return Backlog(0, 0, None, 0)
        pipe = self._client.pipeline(transaction=False)
        for org in orgs:
            key = self.key(org)
            pipe.xinfo_groups(key)
            pipe.xpending(key, GROUP)
            pipe.xinfo_stream(key)
        replies = await pipe.execute(raise_on_error=False)
        length = pending = 0
        oldest: tuple[int, int] | None = None
        trims: dict[str, str] = {}
        seek: dict[str, str] = {}  # streams whose first undelivered entry is still to be found
        for i, org in enumerate(orgs):
            groups, summary, info = replies[3 * i : 3 * i + 3]
            if _missing(groups) or _missing(info):
                continue  # no such stream (any more)
            delivered: tuple[int, int] | None = None
            for g in groups:
                if _s(g["name"]) == GROUP:
                    delivered = _id(g["last-delivered-id"])
            first = _id(info["first-entry"][0]) if info.get("first-entry") else None
            last = _id(info["last-entry"][0]) if info.get("last-entry") else None
            length += int(info["length"])
            low: tuple[int, int] | None = None  # the oldest pending entry
            if delivered is not None and not _missing(summary) and summary["pending"]:
                pending += int(summary["pending"])
                low = _id(summary["min"])
            if first is None or last is None:
                candidates = [low]
            elif delivered is None or first > delivered:
                candidates = [low, first]  # the first entry was never delivered
            elif low is not None and low <= delivered:
                candidates = [low]  # anything undelivered is younger
            else:
                candidates = [low]
                if last > delivered:  # acknowledged entries first, then undelivered ones
                    seek[org] = "(" + _text_id(delivered)
            if delivered is not None and first is not None and first <= delivered:
                bound = min(low, _next(delivered)) if low is not None else _next(delivered)
                if first < bound:
                    trims[org] = _text_id(bound)
            for c in candidates:
                if c is not None and (oldest is None or c < oldest):
                    oldest = c
        if seek:
            pipe = self._client.pipeline(transaction=False)
            for org, after in seek.items():
                pipe.xrange(self.key(org), min=after, count=1)
            for found in await pipe.execute(raise_on_error=False):
                if isinstance(found, list) and found:
                    c = _id(found[0][0])
                    if oldest is None or c < oldest:
                        oldest = c
        removed = 0
        if tidy and trims:
            pipe = self._client.pipeline(transaction=False)
            for org, bound in trims.items():
                pipe.xtrim(self.key(org), minid=bound, approximate=False)
            removed = sum(int(n or 0) for n in await pipe.execute())
        return Backlog(length - removed, pending, None if oldest is None else oldest[0], removed)

    @_bounded()
    async def forget_consumers(self, orgs: list[str], idle_ms: int) -> int:
        """Remove the group's consumers that have nothing pending and have been idle for
        ``idle_ms`` (flushers that died, each leaving a consumer in every stream); returns
        how many. Each stream's removal is one script, which checks again what it removes: a
        consumer that read meanwhile keeps its entries. A live flusher removed while it had
        nothing is only created again by its next read."""
        if not orgs:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for org in orgs:
            pipe.xinfo_consumers(self.key(org), GROUP)
        replies = await pipe.execute(raise_on_error=False)
        removed = 0
        for org, consumers in zip(orgs, replies, strict=True):
            if _missing(consumers):
                continue
            if any(
                int(c["pending"]) == 0
                and int(c["idle"]) >= idle_ms
                and _s(c["name"]) != self.consumer
                for c in consumers
            ):
                keys = [self.key(org)]
                forget = self._transport.script(
                    _FORGET_CONSUMERS, keys, [GROUP, idle_ms, self.consumer]
                )
                removed += int(await forget)
        return removed

    @staticmethod
    def _entries(org: str, entries: list[Any]) -> list[OutboxEntry]:
        """Entries as redis-py's callbacks make them: (id, {field: value})."""
        out = []
        for eid, fields in entries:
            if not fields:  # deleted while pending: no fields (an XADD always writes one)
                continue
            try:
                decoded = {k.decode(): v.decode() for k, v in fields.items()}
            except (AttributeError, UnicodeDecodeError):
                # Text from a decoding client, or bytes that are not UTF-8: kept losslessly
                # (as surrogates), so that the ledger quarantines the entry instead of this
                # cycle failing on it forever.
                decoded = {_text(k): _text(v) for k, v in fields.items()}
            out.append(OutboxEntry(org, eid.decode() if isinstance(eid, bytes) else eid, decoded))
        return out


def _missing(reply: Any) -> bool:
    """A pipelined reply that says the stream, or its group, does not exist (raises other
    errors, which the caller's bound turns into StoreUnavailable when Redis cannot serve)."""
    if isinstance(reply, ResponseError):
        text = str(reply)
        if "no such key" in text or "NOGROUP" in text:
            return True
        raise reply
    return reply is None


def _id(value: Any) -> tuple[int, int]:
    """A stream entry id as (ms, sequence), in the order Redis sorts them."""
    ms, _, seq = _s(value).partition("-")
    return int(ms), int(seq or 0)


def _text_id(value: tuple[int, int]) -> str:
    return f"{value[0]}-{value[1]}"


def _next(value: tuple[int, int]) -> tuple[int, int]:
    """The smallest entry id above ``value``."""
    return value[0], value[1] + 1


def _streams(reply: Any) -> Iterator[list[Any]]:
    """The entry lists of an XREADGROUP reply as redis-py's callback makes it: a list of
    [stream, entries] (RESP2), a map of stream -> [entries] (RESP3), or nothing."""
    if not reply:
        return iter(())
    if isinstance(reply, dict):
        return (entries for (entries,) in reply.values())
    return (entries for _key, entries in reply)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)
