"""One multiplexed connection for the script calls to a standalone Redis.

Every Reserve, Commit, Release and Extend is exactly one EVALSHA. Through redis-py's pool each
call borrows a connection (a lock and a condition), writes through an asyncio stream, reads
through another, and returns the connection: most of the CPU a script call costs in this
process. Here every call writes its packed command straight onto one shared connection and
waits on a future; replies come back in order (Redis answers each connection in order) and are
parsed by hiredis as they arrive, many per read under load. This is how redis-rs's multiplexed
connection and Lettuce work.

Why it exists: 1.25-1.48 x less sidecar CPU at c=64 than redis-py's pool (docs/benchmarks.md,
"levers"). Timeouts and retries are not its business: store/transport.py bounds every call and
sends it once more after a broken connection (ConnectionError), on a fresh connection here.

Behaviour kept from the pool it replaces (tests/test_unavailable.py, tests/chaos):
- error replies become redis-py's exception classes (NoScriptError, ReadOnlyError, ...), so the
  store maps them exactly as before;
- when a call times out and its connection has received nothing since that call began (a
  dead or frozen peer), the connection is aborted (``stalled``): the calls still on it fail
  (the transport sends them once more, on a fresh connection), and later calls connect afresh
  instead of queueing behind the dead peer. (Commands already written still run if a frozen
  Redis thaws: closing a socket does not take them back. That is why UNAVAILABLE means
  "unknown outcome" and callers retry with the same id.) A slow but live Redis keeps
  answering other calls, so it is left alone;
- a new connection carries commands only once Redis has answered a PING on it, so a frozen
  Redis never receives (and later runs) commands sent after the first timeout;
- ``retire()`` (after READONLY) sends new calls to a fresh connection and closes the old one
  once its last reply is in, so a failover behind a stable address is followed without
  failing the calls still on the old connection.

TCP (``redis://``), TLS (``rediss://``, with the common ``ssl_`` options of its URL) and
Unix-socket (``unix://``) URLs are multiplexed (see Transport.open); the store keeps redis-py's
pool for the scripts whose write it confirms on replicas (ECU_REDIS_WAIT_REPLICAS): their WAIT
blocks the connection it is sent on, which here would hold every other call behind it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
import time
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, ConnectionError, InvalidResponse, ResponseError

__all__ = ["ScriptChannel", "multiplexable"]

_MORE = object()  # hiredis: no complete reply buffered yet


#: The TLS options of a ``rediss://`` URL the channel applies as redis-py's SSLConnection does;
#: a URL with any other ``ssl_`` option (OCSP, ciphers, ...) stays on redis-py's pool.
_TLS_OPTIONS = frozenset(
    {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
     "ssl_check_hostname", "ssl_password"}
)  # fmt: skip


def multiplexable(url: str) -> bool:
    """Whether a Redis URL is served by the multiplexed channel: TCP, TLS or a Unix socket."""
    if url.startswith(("redis://", "unix://")):
        return True
    if not url.startswith("rediss://"):
        return False
    return all(not k.startswith("ssl_") or k in _TLS_OPTIONS for k in parse_url(url))


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _tls(params: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a ``rediss://`` URL's options (None for plain TCP), with redis-py's
    defaults: the server's certificate required and its host name checked."""
    if "connection_class" not in params or params["connection_class"].__name__ != "SSLConnection":
        return None
    ctx = ssl.create_default_context(
        cafile=params.get("ssl_ca_certs"), capath=params.get("ssl_ca_path")
    )
    reqs = _CERT_REQS.get(params.get("ssl_cert_reqs", "required"), ssl.CERT_REQUIRED)
    ctx.check_hostname = reqs != ssl.CERT_NONE and params.get("ssl_check_hostname", True)
    ctx.verify_mode = reqs
    if params.get("ssl_certfile"):
        ctx.load_cert_chain(
            params["ssl_certfile"], params.get("ssl_keyfile"), params.get("ssl_password")
        )
    return ctx


class _Connection(asyncio.Protocol):
    """One socket: requests written in order, replies matched to their futures in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_MORE,
        )
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.lost = False
        self.retiring = False
        self.last_received = -math.inf

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        self._reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = self._reader.gets()
            except InvalidResponse as exc:  # a protocol error: nothing after it can be trusted
                self._fail(ConnectionError(f"invalid reply from Redis: {exc}"))
                self.abort()
                return
            if reply is _MORE:
                break
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self._fail(ConnectionError("Redis sent a reply nobody asked for"))
                self.abort()
                return
            fut = waiters.popleft()
            if fut.done():  # its caller timed out or was cancelled: drop the reply
                continue
            if isinstance(reply, Exception):  # an error reply, as redis-py's class for it
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        if self.retiring and not waiters and self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(ConnectionError("Connection closed by server."))

    # -- used by ScriptChannel -------------------------------------------------------------

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        assert self._transport is not None
        fut = asyncio.get_running_loop().create_future()
        self._transport.write(packed)
        self._waiters.append(fut)
        return fut

    @property
    def owed(self) -> int:
        """Replies still expected."""
        return len(self._waiters)

    def abort(self) -> None:
        self.lost = True
        if self._transport is not None:
            self._transport.abort()

    def retire(self) -> None:
        self.retiring = True
        if not self._waiters and self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


class ScriptChannel:
    """Commands over one shared connection to a standalone Redis, opened on first use."""

    def __init__(self, url: str, *, connect_timeout_s: float) -> None:
        params = parse_url(url)
        self._path: str | None = params.get("path")
        self._host: str = params.get("host", "localhost")
        self._port: int = int(params.get("port", 6379))
        self._db = int(params.get("db", 0) or 0)
        self._username: str | None = params.get("username")
        self._password: str | None = params.get("password")
        self._tls = _tls(params)
        self._connect_timeout_s = connect_timeout_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply (redis-py exception classes on error
        replies; ConnectionError when the connection breaks or cannot be made)."""
        packed = hiredis.pack_command(args)
        conn = await self._connection()
        return await conn.send(packed)

    def stalled(self, since: float) -> None:
        """Called after a call that began at ``since`` (time.monotonic()) timed out: abort
        the connection if it still owes replies and has received nothing since then."""
        conn = self._conn
        if conn is not None and conn.owed and conn.last_received < since:
            conn.abort()
            self._conn = None

    def retire(self) -> None:
        """Send later calls to a fresh connection; the current one closes once drained."""
        if self._conn is not None:
            self._conn.retire()
            self._conn = None

    async def close(self) -> None:
        """Close the connection (calls still waiting fail with ConnectionError)."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        return await asyncio.shield(self._connect())

    def _connect(self) -> asyncio.Future[_Connection]:
        """The connect in progress, or a new one: concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return self._connecting

    def _connected(self, fut: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not fut.cancelled() and fut.exception() is None:
            self._conn = fut.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(_Connection, self._path)
                else:
                    _, conn = await loop.create_connection(
                        _Connection,
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
                try:
                    if self._password is not None:
                        auth = (
                            (self._username, self._password)
                            if self._username
                            else (self._password,)
                        )
                        await conn.send(hiredis.pack_command(("AUTH", *auth)))
                    if self._db:
                        await conn.send(hiredis.pack_command(("SELECT", self._db)))
                    # No command goes out on a connection the server has not answered on: a
                    # frozen Redis (whose kernel still completes the TCP handshake) would run
                    # it on thawing, long after its caller was told UNAVAILABLE.
                    await conn.send(b"*1\r\n$4\r\nPING\r\n")
                except ResponseError as exc:  # NOAUTH, NOPERM, a database that does not exist
                    conn.abort()
                    raise AuthenticationError(str(exc)) from None
                except BaseException:
                    conn.abort()
                    raise
        except TimeoutError:
            raise ConnectionError("timed out connecting to Redis") from None
        except OSError as exc:
            raise ConnectionError(f"cannot connect to Redis: {exc.strerror or exc}") from None
        return conn
