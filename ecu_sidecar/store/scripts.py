"""Lua scripts: each operation is the shared prelude plus its own body, hashed once.

Scripts run with EVALSHA; a NOSCRIPT reply (Redis restarted, SCRIPT FLUSH, a new cluster node)
falls back to EVAL of the full source, which also caches it on that node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

__all__ = ["SCRIPTS", "Script"]

_LUA = resources.files("ecu_sidecar.store") / "lua"


@dataclass(frozen=True, slots=True)
class Script:
    """One operation's full Lua source and its SHA1."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, *, prelude: bool = True) -> Script:
        """Read ``lua/_lib.lua`` + ``lua/<name>.lua`` (without ``prelude``, the body alone)."""
        body = (_LUA / f"{name}.lua").read_text(encoding="utf-8")
        source = body
        if prelude:
            lib = (_LUA / "_lib.lua").read_text(encoding="utf-8")
            source = f"{lib}\n-- ==== {name}.lua ====\n{body}"
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


SCRIPTS: dict[str, Script] = {
    name: Script.load(name)
    for name in (
        "reserve",
        "commit",
        "release",
        "extend",
        "grant",
        "set_cap",
        "balance",
        "sweep",
        "hydrate",
        "reconcile",
        "set_auto_topup",
        "epoch",
        "job",
    )
}
