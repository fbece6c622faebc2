"""Acknowledged means durable: a confirmed script waits, in its own round trip, until
ECU_REDIS_WAIT_REPLICAS replicas (and the AOF, where it applies) hold its write; and the epoch
of the node that holds an organization, so that a history the node loses later shows."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from ecu_sidecar.errors import ReplicationUnconfirmed
from ecu_sidecar.settings import Settings
from ecu_sidecar.store.keys import fence_key, org_keys
from ecu_sidecar.store.scripts import Script
from ecu_sidecar.store.transport import Transport

__all__ = ["CONFIRMED_SCRIPTS", "Replicas", "waitaof_applies"]

log = logging.getLogger(__name__)

#: Scripts whose write is confirmed on ECU_REDIS_WAIT_REPLICAS replicas before it is answered:
#: every caller-visible mutation (money moves in reserve, commit, release, grant; extend's
#: deadline decides when a hold may expire; caps and auto-top-up decide later admissions), and
#: the sweep, whose expiries the ledger records. Not confirmed: ``balance`` (a read; the
#: overdue holds it sweeps are swept again after a failover), and the flusher's ``hydrate``
#: and ``reconcile`` (rebuilds from the ledger, redone by the next cycle if a failover loses
#: them), nor the flusher's XACK/XDEL (a lost acknowledgement redelivers events the ledger
#: already holds, which insert as duplicates: no money moves twice).
CONFIRMED_SCRIPTS = frozenset(
    {"reserve", "commit", "release", "extend", "grant", "set_cap", "set_auto_topup", "sweep"}
)

#: Lifetime of an organization's fence key (rewritten by every confirmed script call).
_FENCE_TTL_MS = 600_000


class Replicas:
    """Confirmation of writes on replicas, and node epochs, for one store."""

    def __init__(self, transport: Transport, settings: Settings) -> None:
        self._transport = transport
        self._prefix = settings.key_prefix
        self._timeout_ms = settings.redis_wait_timeout_ms
        self.wait = 0 if transport.kind == "embedded" else settings.redis_wait_replicas
        """Replicas every confirmed write waits for (0: none)."""
        self._waitaof: bool | None = None
        """Whether WAITAOF 1 0 joins WAIT (learned once, on the first confirmed call: the
        server has WAITAOF, Redis >= 7.2, and its AOF is on); None until then."""

    def confirms(self, name: str) -> bool:
        """Whether the script ``name`` is answered only once its write is confirmed."""
        return bool(self.wait) and name in CONFIRMED_SCRIPTS

    async def script(self, script: Script, org: str, keys: Sequence[str], argv: list[Any]) -> Any:
        """The script, then a write of the organization's fence key, then WAIT (and WAITAOF
        where it applies), pipelined: one round trip, bounded and retried as every call.
        Raises ReplicationUnconfirmed when fewer replicas than ECU_REDIS_WAIT_REPLICAS
        acknowledged in time.

        WAIT covers the writes its connection made before it. The fence makes that everything
        the primary holds at that moment: a script that wrote nothing (a replay, a refusal)
        still answers from state an earlier, perhaps unconfirmed call wrote, maybe on another
        connection; it too is confirmed before it is answered."""

        async def run() -> Any:
            confirm = await self._confirm_commands(org)
            n = len(keys)
            evalsha = ("EVALSHA", script.sha, n, *keys, *argv)
            replies = await self._transport.pipeline(keys[0], [evalsha, *confirm])
            if isinstance(replies[0], NoScriptError):
                log.debug("script %s not cached on this node; loading it", script.name)
                replies = await self._transport.pipeline(
                    keys[0], [("EVAL", script.source, n, *keys, *argv), *confirm]
                )
            if isinstance(replies[0], Exception):
                raise replies[0]
            self._check_confirmed(replies[1:])
            return replies[0]

        return await self._transport.bounded(run)

    async def confirm_durable(self, orgs: Iterable[str]) -> None:
        """Wait until what the primaries of these organizations hold now has reached the
        replicas (see RedisStore.confirm_durable). A no-op with the wait off."""
        if not self.wait:
            return
        # One fence write and WAIT per node: an organization's fence lives on its primary.
        for members in (await self.by_node(orgs)).values():
            await self._transport.bounded(lambda org=members[0]: self._confirm(org))

    async def by_node(self, orgs: Iterable[str]) -> dict[str, list[str]]:
        """The organizations grouped by the primary that holds them."""
        return await self._transport.node_groups({org: self._acct(org) for org in orgs})

    async def epochs(self, orgs: Iterable[str]) -> dict[str, str]:
        """The epoch ('<run id>:<replication id>') of the node holding each organization,
        read once per node; '' where the server has none (the embedded store)."""
        orgs = list(orgs)
        if self._transport.kind == "embedded":  # one process's memory: nothing to survive
            return dict.fromkeys(orgs, "")
        out: dict[str, str] = {}
        info = [("INFO", "server"), ("INFO", "replication")]
        for members in (await self.by_node(orgs)).values():
            key = self._acct(members[0])
            replies = await self._transport.bounded(
                lambda key=key: self._transport.pipeline(key, info)
            )
            if any(isinstance(r, Exception) for r in replies):
                raise next(r for r in replies if isinstance(r, Exception))
            run_id = str(info_dict(replies[0]).get("run_id", ""))
            replid = str(info_dict(replies[1]).get("master_replid", ""))
            epoch = f"{run_id}:{replid}" if run_id and replid else ""
            out.update(dict.fromkeys(members, epoch))
        return out

    def _acct(self, org: str) -> str:
        return org_keys(self._prefix, org)[0]

    async def _confirm(self, org: str) -> None:
        commands = await self._confirm_commands(org)
        self._check_confirmed(await self._transport.pipeline(self._acct(org), commands))

    async def _confirm_commands(self, org: str) -> list[tuple[Any, ...]]:
        """The fence write and the waits that confirm a write of ``org``."""
        if self._waitaof is None:
            self._waitaof = await self._has_waitaof(self._acct(org))
        confirm: list[tuple[Any, ...]] = [
            ("SET", fence_key(self._prefix, org), "1", "PX", _FENCE_TTL_MS),
            ("WAIT", self.wait, self._timeout_ms),
        ]
        if self._waitaof:
            confirm.append(("WAITAOF", 1, 0, self._timeout_ms))
        return confirm

    def _check_confirmed(self, replies: list[Any]) -> None:
        """Raise unless the replies of _confirm_commands say the write is confirmed."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        acked = int(replies[1])
        if acked < self.wait:
            raise ReplicationUnconfirmed(
                f"the write's durability is unconfirmed: {acked} of "
                f"{self.wait} replicas acknowledged it within {self._timeout_ms} ms "
                "(ECU_REDIS_WAIT_REPLICAS); the outcome is unknown, and a retry with the same "
                "id is answered as a replay if the write survived",
                acknowledged=acked,
                required=self.wait,
            )
        if self._waitaof and not int(replies[2][0]):
            raise ReplicationUnconfirmed(
                f"the write's durability is unconfirmed: the primary did not fsync its AOF "
                f"within {self._timeout_ms} ms; the outcome is unknown, and a retry with the "
                "same id is answered as a replay if the write survived",
                acknowledged=acked,
                required=self.wait,
            )

    async def _has_waitaof(self, key: str) -> bool:
        """Whether the primary has WAITAOF (Redis >= 7.2) and its AOF on: then an answer also
        waits until the primary fsynced the write (WAITAOF 1 0), so that a restart of the
        primary without a failover keeps it. WAITAOF's replica count is not used: replicas
        without AOF never acknowledge it, and WAIT's in-memory acknowledgement is what
        survives a failover. Learned once; on any doubt, WAIT alone."""
        try:
            info = await self._transport.info(key, "server")
            persistence = await self._transport.info(key, "persistence")
        except ResponseError as exc:  # INFO renamed or refused by an ACL
            log.warning("cannot read the Redis version (%s): confirming writes with WAIT", exc)
            return False
        version = str(info_dict(info).get("redis_version", "0"))
        aof = str(info_dict(persistence).get("aof_enabled", "0")) == "1"
        waitaof = waitaof_applies(version, aof)
        log.info(
            "confirming writes on %d replica(s) with WAIT%s (Redis %s, AOF %s)",
            self.wait,
            " and WAITAOF 1 0" if waitaof else "",
            version,
            "on" if aof else "off",
        )
        return waitaof


def waitaof_applies(version: str, aof_enabled: bool) -> bool:
    """Whether ``WAITAOF 1 0`` joins WAIT: the server has it (Redis >= 7.2) and runs AOF."""
    parts = [*version.split("."), "0"][:2]
    major, minor = (int(p) if p.isdigit() else 0 for p in parts)
    return (major, minor) >= (7, 2) and aof_enabled


def info_dict(reply: Any) -> dict[str, Any]:
    """An INFO reply as a dict (redis-py parses it; the raw text otherwise)."""
    if isinstance(reply, dict):
        return reply
    out = {}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out
