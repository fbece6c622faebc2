"""Where an organization's outbox stands: what the flusher and a rebuild from the ledger read to
know whether every event is in the ledger (the rebuild and reconcile scripts check the same)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

__all__ = ["GROUP", "StreamState", "stream_state"]

#: The consumer group every flusher joins: each entry goes to one flusher at a time.
GROUP = "ledger"


@dataclass(frozen=True, slots=True)
class StreamState:
    """Where an outbox stands: its last id, and what the ledger group has not finished."""

    last_id: str
    length: int
    pending: int
    delivered_id: str
    lag: int
    """Entries not yet delivered to any flusher."""

    @property
    def fully_flushed(self) -> bool:
        """Every entry up to last_id was delivered and acknowledged (is in the ledger)."""
        return self.pending == 0 and (self.last_id == "0-0" or self.delivered_id == self.last_id)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def stream_state(client: Any, key: str) -> StreamState:
    """The stream's last id and the ledger group's progress on it (a missing stream: '0-0')."""
    try:
        info = await client.xinfo_stream(key)
    except ResponseError:
        return StreamState("0-0", 0, 0, "0-0", 0)
    last = _s(info["last-generated-id"])
    pending, delivered, lag = 0, "0-0", int(info["length"])
    for group in await client.xinfo_groups(key):
        if _s(group["name"]) == GROUP:
            pending = int(group["pending"])
            delivered = _s(group["last-delivered-id"])
            lag = int(group.get("lag") or 0)
    return StreamState(last, int(info["length"]), pending, delivered, lag)
