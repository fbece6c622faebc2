"""Prototype patches of the sidecar, applied in the benchmark's sidecar process only
(``python -m bench.servers sidecar --patch NAME``) to measure a proposed product change before
anyone makes it. Nothing here is imported by the product; each patch names the product change
it stands for (docs/benchmarks.md has the measured before/after).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PATCHES", "RECOMMENDED", "RSS_ONLY", "apply"]


def _coalesce() -> None:
    """Coalesce concurrent script calls into one pipeline per event-loop turn.

    Product change (ecu_sidecar/store/redis_store.py, standalone Redis only): instead of
    ``await client.evalsha(...)`` per call, append (sha, keys, argv, future) to a pending list;
    the first call of a loop turn schedules one flush that sends every pending EVALSHA in one
    non-transactional pipeline on one connection and resolves each future with its own reply
    (a NOSCRIPT reply falls back to EVAL for that call alone). Every call is still one script,
    atomic on its own, and one command on the wire; what is saved is the per-call connection
    checkout, write and read system calls on both sides. A lone call waits one loop turn.
    """
    from redis.exceptions import NoScriptError

    from ecu_sidecar.store import redis_store
    from ecu_sidecar.store.scripts import Script

    class Coalescer:
        def __init__(self, client: Any) -> None:
            self.client = client
            self.pending: list[tuple[str, Sequence[Any], asyncio.Future[Any]]] = []
            self.tasks: set[asyncio.Task[None]] = set()

        def call(self, sha: str, args: Sequence[Any]) -> asyncio.Future[Any]:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()
            if not self.pending:
                loop.call_soon(self._flush)
            self.pending.append((sha, args, fut))
            return fut

        def _flush(self) -> None:
            batch, self.pending = self.pending, []
            task = asyncio.ensure_future(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        async def _send(self, batch: list[tuple[str, Sequence[Any], asyncio.Future[Any]]]) -> None:
            try:
                if len(batch) == 1:
                    sha, args, fut = batch[0]
                    try:
                        replies: list[Any] = [await self.client.evalsha(sha, *args)]
                    except NoScriptError as exc:
                        replies = [exc]
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for sha, args, _ in batch:
                        pipe.evalsha(sha, *args)
                    replies = await pipe.execute(raise_on_error=False)
            except BaseException as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for (_, _, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    coalescers: dict[int, Coalescer] = {}

    async def _eval(self: Any, script: Script, keys: Sequence[str], argv: list[Any]) -> Any:
        if self.kind != "standalone":
            return await original(self, script, keys, argv)
        co = coalescers.get(id(self))
        if co is None:
            co = coalescers[id(self)] = Coalescer(self._client)
        try:
            return await co.call(script.sha, (len(keys), *keys, *argv))
        except NoScriptError:
            return await self._client.eval(script.source, len(keys), *keys, *argv)

    original = redis_store.RedisStore._eval
    redis_store.RedisStore._eval = _eval  # type: ignore[method-assign]


def _lean_ranks() -> None:
    """Free the Python copy of each encoding's BPE ranks once tiktoken has built its core.

    Product change (ecu_sidecar/pricing/tokens.py, ``_build``): after
    ``encoding = tiktoken.Encoding(name, pat_str=..., mergeable_ranks=ranks, ...)`` add
    ``ranks.clear()`` and return the encoding. tiktoken copies the ranks into its Rust core at
    construction and keeps the dict only for pickling (``Encoding.__getstate__``), which the
    sidecar never does; the dicts of o200k_base and cl100k_base hold ~40 MB of RSS.
    """
    from ecu_sidecar.pricing import tokens

    original = tokens._build

    def _build(name: str) -> Any:
        encoding = original(name)
        encoding._mergeable_ranks.clear()
        return encoding

    tokens._build = _build


def _no_socket_timeout() -> None:
    """Drop redis-py's per-socket timeout on the sidecar's script calls.

    Product change (ecu_sidecar/store/redis_store.py, ``from_settings``, standalone): do not
    pass ``socket_timeout`` to the pool (keep ``socket_connect_timeout``). Every script call
    already runs inside ``asyncio.timeout(ECU_REDIS_TIMEOUT_MS)`` in ``RedisStore._call``, which
    is the bound that matters; with ``socket_timeout`` set, redis-py (asyncio) also wraps every
    send in ``asyncio.wait_for`` (a new Task per command on Python 3.11) and every read in
    ``asyncio.timeout``. Calls that do not go through ``_call`` (the flusher's OutboxReader)
    would need the same outer bound before the flusher's store drops it too.
    """
    from ecu_sidecar.store import redis_store

    original = redis_store.RedisStore.from_settings.__func__  # type: ignore[attr-defined]

    def from_settings(cls: Any, settings: Any) -> Any:
        store = original(cls, settings)
        if store.kind == "standalone":
            store._client.connection_pool.connection_kwargs["socket_timeout"] = None
        return store

    redis_store.RedisStore.from_settings = classmethod(from_settings)  # type: ignore[assignment]


PATCHES: dict[str, Callable[[], None]] = {
    "coalesce": _coalesce,
    "no-socket-timeout": _no_socket_timeout,
    "lean-ranks": _lean_ranks,
}
#: Patches that change memory only: measured by the RSS of an idle sidecar, not under load.
RSS_ONLY = frozenset({"lean-ranks"})
#: The set the levers section also measures together, with uvloop: what docs/benchmarks.md
#: recommends (coalescing measured worse; see there).
RECOMMENDED = ("no-socket-timeout", "lean-ranks")


def apply(name: str) -> None:
    """Apply one named patch (before the server is built)."""
    try:
        patch = PATCHES[name]
    except KeyError:
        raise SystemExit(f"unknown patch {name!r}; known: {', '.join(sorted(PATCHES))}") from None
    patch()
