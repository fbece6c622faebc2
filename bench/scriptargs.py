"""The exact EVALSHA arguments the product sends, for the floors that run the scripts without
the sidecar (floor B, floor A∘B, the flusher's backlog).

Rather than copy the scripts' ARGV layout (which the product may change), each template is
captured once by calling the product's own ``RedisStore`` method with placeholder ids and
intercepting its ``_eval``; per call only the organization's keys and the ids are filled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ScriptCall", "capture"]

_ORG = "org\x00placeholder"
_RID = "rid\x00placeholder"


class _Captured(Exception):
    pass


@dataclass(frozen=True)
class ScriptCall:
    """One operation's script, its SHA and source, and its argument template."""

    name: str
    sha: str
    source: str
    prefix: str
    argv: tuple[Any, ...]
    org_at: tuple[int, ...]
    rid_at: tuple[int, ...]

    def args(self, org: str, rid: str) -> list[Any]:
        """``numkeys, *keys, *argv`` for EVALSHA/EVAL of this organization and reservation."""
        from ecu_sidecar.store.keys import org_keys

        argv = list(self.argv)
        for i in self.org_at:
            argv[i] = org
        for i in self.rid_at:
            argv[i] = rid
        keys = org_keys(self.prefix, org)
        return [len(keys), *keys, *argv]


async def capture(prefix: str, *, amount: int = 1_000, actual: int = 700) -> dict[str, ScriptCall]:
    """Templates of reserve (``amount`` µECU, inference on gpt-4o, the default TTL), commit
    (``actual`` µECU, 900/350 tokens, 1 call) and release, as the product's store sends them."""
    from ecu_sidecar.model import AccountRef, CommitItem, JobType, ReserveItem, Usage
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore

    settings = Settings.from_mapping({"key_prefix": ("bench", prefix)})
    seen: list[tuple[Any, Sequence[str], list[Any]]] = []

    class _Capture:  # a transport that keeps the script call instead of sending it
        kind = "standalone"

        async def script(self, script: Any, keys: Sequence[str], argv: Sequence[Any]) -> Any:
            seen.append((script, keys, list(argv)))
            raise _Captured

    store = RedisStore(_Capture(), settings)  # type: ignore[arg-type]
    calls = {
        "reserve": lambda: store.reserve(
            AccountRef(_ORG),
            [ReserveItem(_RID, amount, JobType.INFERENCE, "gpt-4o", settings.default_ttl_ms)],
        ),
        "commit": lambda: store.commit(
            _ORG, [CommitItem(_RID, actual, Usage(900, 350, 1))], settings.overage_max_percent
        ),
        "release": lambda: store.release(_ORG, _RID),
    }
    out = {}
    for name, call in calls.items():
        seen.clear()
        try:
            await call()
        except _Captured:
            pass
        ((script, _keys, argv),) = seen
        out[name] = ScriptCall(
            name=script.name,
            sha=script.sha,
            source=script.source,
            prefix=prefix,
            argv=tuple(argv),
            org_at=tuple(i for i, a in enumerate(argv) if a == _ORG),
            rid_at=tuple(i for i, a in enumerate(argv) if a == _RID),
        )
    return out
