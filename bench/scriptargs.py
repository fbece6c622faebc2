"""The exact script calls the product sends, for the floors that run the scripts without the
sidecar (floor B, the flusher's backlog, the Redis cost floor).

Rather than copy the scripts' ARGV layout (which the product may change), each call is
captured once on the wire: the product's own ``RedisStore`` (``from_settings``, then its
public ``reserve``, ``commit`` and ``release`` with placeholder ids) talks to Redis through a
recording TCP relay on 127.0.0.1, and its first ``EVALSHA`` of each call is kept as a
template; per call only the organization and the reservation id are filled in.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ScriptCall", "capture"]

_ORG = "orgPLACEHOLDER"
_RID = "ridPLACEHOLDER"


@dataclass(frozen=True)
class ScriptCall:
    """One operation's script (SHA and source) and its argument template, as sent."""

    name: str
    sha: str
    source: str
    args_template: tuple[str, ...]
    """``numkeys, *keys, *argv`` with the placeholders in place."""

    def args(self, org: str, rid: str) -> list[str]:
        """``numkeys, *keys, *argv`` for EVALSHA/EVAL of this organization and reservation."""
        return [a.replace(_ORG, org).replace(_RID, rid) for a in self.args_template]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha": self.sha, "args_template": list(self.args_template)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScriptCall:
        from ecu_sidecar.store.scripts import SCRIPTS

        source = SCRIPTS[data["name"]].source
        return cls(data["name"], data["sha"], source, tuple(data["args_template"]))


def resp_commands(buf: bytearray) -> list[list[bytes]]:
    """Take every complete RESP command (an array of bulk strings) off the front of ``buf``."""
    out = []
    while True:
        try:
            pos = buf.index(b"\r\n")
            n = int(buf[1:pos])
            pos += 2
            parts = []
            for _ in range(n):
                end = buf.index(b"\r\n", pos)
                size = int(buf[pos + 1 : end])
                start = end + 2
                if len(buf) < start + size + 2:
                    return out
                parts.append(bytes(buf[start : start + size]))
                pos = start + size + 2
        except ValueError:  # no complete header yet
            return out
        del buf[:pos]
        out.append(parts)


async def _relay(
    target: str, seen: list[list[bytes]], tasks: set[asyncio.Task[Any]]
) -> tuple[asyncio.Server, int]:
    """A TCP relay to ``target`` (host:port) that records every command a client sends."""
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: bool) -> None:
        buf = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if tap:
                    buf += data
                    seen.extend(resp_commands(buf))
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def capture(redis_url: str, prefix: str) -> dict[str, ScriptCall]:
    """Templates of reserve (1,000 µECU, inference on gpt-4o, the default TTL), commit (700
    µECU, 900/350 tokens, 1 call) and release, as the product's store sends them to a
    standalone Redis at ``redis_url`` under key prefix ``prefix``."""
    from ecu_sidecar.model import AccountRef, CommitItem, JobType, ReserveItem, Usage
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore
    from ecu_sidecar.store.scripts import SCRIPTS

    parts = urlsplit(redis_url)
    seen: list[list[bytes]] = []
    tasks: set[asyncio.Task[Any]] = set()
    relay, port = await _relay(f"{parts.hostname}:{parts.port or 6379}", seen, tasks)
    relayed = urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))
    settings = Settings.from_mapping(
        {"redis_url": ("bench", relayed), "key_prefix": ("bench", prefix)}
    )
    store = RedisStore.from_settings(settings)
    ttl = settings.default_ttl_ms
    calls = {
        "reserve": lambda: store.reserve(
            AccountRef(_ORG), [ReserveItem(_RID, 1_000, JobType.INFERENCE, "gpt-4o", ttl)]
        ),
        "commit": lambda: store.commit(
            _ORG, [CommitItem(_RID, 700, Usage(900, 350, 1))], settings.overage_max_percent
        ),
        "release": lambda: store.release(_ORG, _RID),
    }
    by_sha = {s.sha: s for s in SCRIPTS.values()}
    out = {}
    try:
        for name, call in calls.items():
            seen.clear()
            with contextlib.suppress(Exception):  # the placeholder account does not exist
                await call()
            sent = [c for c in seen if c[0].upper() == b"EVALSHA"]  # the product's first try
            if not sent:
                raise RuntimeError(f"capture: the store sent no EVALSHA for {name}")
            first = sent[0]
            script = by_sha[first[1].decode()]
            out[name] = ScriptCall(
                script.name, script.sha, script.source, tuple(a.decode() for a in first[2:])
            )
    finally:
        await store.close()
        relay.close()
        # The store closed its connections, so every relay ends; bounded all the same.
        _, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return out
