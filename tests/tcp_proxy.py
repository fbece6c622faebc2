"""A small TCP proxy of the tests' own, on 127.0.0.1, to inject network faults between the
sidecar and Redis.

``TcpProxy(upstream_port)`` listens on an ephemeral port of 127.0.0.1 and forwards every
connection to ``127.0.0.1:upstream_port``. It runs its own event loop in a daemon thread, so
it keeps moving bytes whether the sidecar under test runs in the test's event loop, in another
thread or in a subprocess. Faults are switched on and off from the test's thread:

- ``mode = "pass"``: forward both ways (the default);
- ``mode = "refuse"``: a new connection is accepted and closed at once (Redis "down");
- ``mode = "blackhole"``: a new connection is accepted and then ignored: nothing is forwarded,
  nothing answers (a host that vanished without a RST);
- ``delay_s``: every chunk, both ways, is delivered this much later (order kept; latency added,
  throughput not serialized);
- ``swallow_replies = True``: requests still reach Redis (which runs them), replies are dropped
  (the "lost reply" after which only a replay with the same id can tell what happened);
- ``cut()``: close every established connection now (a reset mid-conversation);
- ``retarget(port)``: new connections go to another upstream (a failover behind a VIP);
  established ones stay where they are.

Counters (``accepted``, ``refused``, ``swallowed_chunks``, ``cuts``) let tests show the fault
really happened. Everything is bounded: ``close()`` stops the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["TcpProxy"]

HOST = "127.0.0.1"
_CHUNK = 65_536
T = TypeVar("T")


class TcpProxy:
    """A fault-injecting TCP forwarder between 127.0.0.1:``port`` and an upstream port."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.delay_s = 0.0
        self.swallow_replies = False
        self.accepted = 0
        self.refused = 0
        self.swallowed_chunks = 0
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port: int = self._call(self._start())

    # -- control (from the test's thread) ---------------------------------------------------

    def _call(self, coro: Awaitable[T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def heal(self) -> None:
        """Back to plain forwarding (established connections are left alone)."""
        self.mode = "pass"
        self.delay_s = 0.0
        self.swallow_replies = False

    def cut(self) -> int:
        """Close every established connection; returns how many were cut."""
        return self._call(self._cut())

    def retarget(self, upstream_port: int) -> None:
        """Send new connections to another upstream port."""
        self.upstream_port = upstream_port

    @property
    def open_connections(self) -> int:
        """Connections currently being forwarded."""
        return len(self._conns)

    def close(self) -> None:
        """Stop listening, cut everything, stop the thread (bounded)."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop's side ----------------------------------------------------------------------

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        sock: socket.socket = self._server.sockets[0]
        return sock.getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cut(self) -> int:
        conns = list(self._conns)
        for client, upstream in conns:
            _abort(client)
            if upstream is not None:
                _abort(upstream)
        self._conns.clear()
        self.cuts += len(conns)
        return len(conns)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            self.refused += 1
            _abort(writer)
            return
        self.accepted += 1
        if self.mode == "blackhole":
            entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
            self._conns.add(entry)
            with contextlib.suppress(Exception):
                while await reader.read(_CHUNK):
                    pass  # swallowed: nothing is forwarded, nothing answers
            self._conns.discard(entry)
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.upstream_port), timeout=2.0
            )
        except (OSError, TimeoutError):
            _abort(writer)
            return
        entry = (writer, up_writer)
        self._conns.add(entry)
        self._spawn(self._pump(reader, up_writer, entry, reply=False))
        self._spawn(self._pump(up_reader, writer, entry, reply=True))

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None],
        *,
        reply: bool,
    ) -> None:
        """Copy src to dst, chunk by chunk, each chunk held back by the delay then in force."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while not sender.done():
                data = await src.read(_CHUNK)
                if not data:
                    break
                if reply and self.swallow_replies:
                    self.swallowed_chunks += 1
                    continue
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            self._conns.discard(entry)
            _abort(dst)
            for w in entry:
                if w is not None:
                    _abort(w)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close now, with a RST when possible (SO_LINGER 0), as a cut cable or a crash would."""
    with contextlib.suppress(Exception):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
