"""The store adapter: the only module that talks to Redis.

One method per operation, each exactly one script call (one round trip). The same scripts run
on real Redis (standalone or Cluster) and on the embedded in-process store (fakeredis + Lua),
so the embedded default behaves as production does. How calls reach Redis (one bound, one
retry rule): store/transport.py; replica confirmation and epochs: store/replicas.py; the
scripts' arguments and replies: store/codec.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ecu_sidecar.errors import ReplicationUnconfirmed, StoreUnavailable
from ecu_sidecar.jobs import JobApproval, JobView
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    HoldState,
    KnownHold,
    LedgerAccount,
    Reconciled,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    SweepOutcome,
)
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import codec
from ecu_sidecar.store.codec import text as _s
from ecu_sidecar.store.keys import org_keys
from ecu_sidecar.store.outbox import OutboxReader
from ecu_sidecar.store.replicas import Replicas
from ecu_sidecar.store.scripts import SCRIPTS
from ecu_sidecar.store.streams import GROUP, StreamState, stream_state
from ecu_sidecar.store.transport import Transport

if TYPE_CHECKING:
    from ecu_sidecar.metrics import StoreMetrics

__all__ = ["RedisStore"]


class RedisStore:
    """Runs the quota scripts against one Redis deployment (satisfies store.port.Store)."""

    def __init__(self, transport: Transport, settings: Settings) -> None:
        self._transport = transport
        self._settings = settings
        self._replicas = Replicas(transport, settings)
        self.kind = transport.kind
        """'embedded', 'standalone' or 'cluster' (for logs and health)."""
        self.clock_offset_ms = 0
        """Added to Redis TIME inside every script. Production leaves it at 0; tests move it
        forward to let holds expire without sleeping."""
        self.sweep_limit = settings.sweep_limit
        """Most due items of each kind one script's sweep handles (ECU_SWEEP_LIMIT). Tests set
        0 to hold a script's sweep back, as if other due items had used the limit up: the
        script then settles only what it touches itself."""
        self.metrics: StoreMetrics | None = None
        """Where script latency and errors are counted (set by the server or the flusher)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """Connect as configured: embedded when ECU_REDIS_URL is empty."""
        return cls(Transport.open(settings), settings)

    @property
    def key_prefix(self) -> str:
        """ECU_KEY_PREFIX: every key of this store starts with it."""
        return self._settings.key_prefix

    def acct_key(self, org: str) -> str:
        """The organization's account hash."""
        return org_keys(self._settings.key_prefix, org)[0]

    def outbox_key(self, org: str) -> str:
        """The organization's outbox stream."""
        return org_keys(self._settings.key_prefix, org)[4]

    def outbox(self, consumer: str) -> OutboxReader:
        """The outboxes as the flusher ``consumer`` reads them (store.port.Outbox), each call
        bounded by ECU_FLUSHER_REDIS_TIMEOUT_MS (a bulk read needs longer than a script)."""
        return OutboxReader(
            self._transport,
            self._settings.key_prefix,
            consumer,
            timeout_s=self._settings.flusher_redis_timeout_ms / 1000,
        )

    async def missing_accounts(self, orgs: Sequence[str]) -> list[str]:
        """The organizations among ``orgs`` that have no account in Redis."""
        if not orgs:
            return []
        found = await self._pipelined([("HEXISTS", self.acct_key(org), "balance") for org in orgs])
        return [org for org, present in zip(orgs, found, strict=True) if not present]

    async def hold_totals(self, orgs: Sequence[str]) -> tuple[int, int]:
        """(active holds, µECU held) summed over ``orgs``: one pipelined round trip of ZCARD
        and HGET per organization (for the flusher's gauges)."""
        if not orgs:
            return 0, 0
        commands: list[tuple[Any, ...]] = []
        for org in orgs:
            keys = org_keys(self._settings.key_prefix, org)
            commands += [("ZCARD", keys[2]), ("HGET", keys[0], "held")]
        replies = await self._pipelined(commands)
        holds = sum(int(n or 0) for n in replies[0::2])
        held = sum(int(_s(v)) for v in replies[1::2] if v is not None)
        return holds, held

    async def bound_outboxes(self, orgs: Sequence[str], max_len: int) -> tuple[int, int]:
        """Trim the outbox of each of ``orgs`` to about ``max_len`` events (0: trim nothing);
        returns (events left in those outboxes, events trimmed). For a sidecar without a
        ledger: nothing else removes events then. An outbox with a consumer group (a flusher
        reads it) is never trimmed."""
        if not orgs:
            return 0, 0
        keys = [self.outbox_key(org) for org in orgs]
        sizes = [int(n or 0) for n in await self._pipelined([("XLEN", key) for key in keys])]
        left = sum(sizes)
        over = [key for key, n in zip(keys, sizes, strict=True) if max_len and n > max_len]
        if not over:
            return left, 0
        # A stream deleted meanwhile answers an error: it is simply not trimmed.
        replies = await self._pipelined(
            [("XINFO", "GROUPS", key) for key in over], raise_on_error=False
        )
        unread = [key for key, r in zip(over, replies, strict=True) if r == []]
        if not unread:
            return left, 0
        trims = [("XTRIM", key, "MAXLEN", "~", max_len) for key in unread]
        trimmed = sum(int(n or 0) for n in await self._pipelined(trims))
        return left - trimmed, trimmed

    async def _pipelined(
        self, commands: list[tuple[Any, ...]], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Keyed commands in one pipelined round trip (redis-py's cluster pipeline routes each
        by its key), bounded and retried as every call."""

        async def run() -> list[Any]:
            pipe = self._transport.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=raise_on_error)

        return await self._transport.bounded(run)

    async def close(self) -> None:
        """Close the script channel and the connection pool."""
        await self._transport.close()

    async def connect(self) -> None:
        """Learn the cluster layout up front (a no-op elsewhere), so the first burst of calls
        is routed right instead of bouncing on MOVED. Raises StoreUnavailable."""
        if self.kind == "cluster":
            await self._transport.bounded(lambda: self._transport.client.initialize())

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers within the timeout."""
        await self._transport.bounded(lambda: self._transport.client.ping())

    async def now_ms(self) -> int:
        """The scripts' clock: Redis TIME in ms plus ``clock_offset_ms`` (what every script
        decides with, e.g. whether a grant has already expired). Raises StoreUnavailable."""
        reply = await self._transport.bounded(lambda: self._transport.client.time())
        if isinstance(reply, dict):  # a Cluster client may answer per node: any node's clock
            reply = next(iter(reply.values()))
        seconds, micros = reply
        return int(seconds) * 1000 + int(micros) // 1000 + self.clock_offset_ms

    # -- operations ---------------------------------------------------------------------------

    async def reserve(
        self,
        account: AccountRef,
        items: Sequence[ReserveItem],
        *,
        default_ttl_ms: int = 0,
        job_id: str = "",
    ) -> ReserveOutcome:
        """Hold every item against the account, all or nothing (against the room of the approved
        job ``job_id`` when given); an item's TTL of 0 means ``default_ttl_ms``."""
        args = codec.reserve_args(account, items, default_ttl_ms, job_id)
        return codec.reserve_reply(await self._run("reserve", account.organization, args))

    async def approve_job(
        self, account: AccountRef, approval: JobApproval, *, ttl_ms: int, overage_max_percent: int
    ) -> JobView:
        """Open a job: hold its approved amount against the wallet and caps, all or nothing;
        a replay of the same approval answers the job as it stands."""
        jid = approval.job_id
        args = codec.job_args("open", jid, account, approval, ttl_ms, overage_max_percent)
        return codec.job_reply(jid, await self._run("job", account.organization, args))

    async def job(self, org: str, job_id: str, op: str = "get") -> JobView:
        """``get`` a job, ``touch`` it (a heartbeat) or ``close`` it (its room and its steps
        still held return to the wallet; closing an ended job is a replay)."""
        r = await self._run("job", org, codec.job_args(op, job_id))
        return codec.job_reply(job_id, r)

    async def commit(
        self,
        org: str,
        items: Sequence[CommitItem],
        overage_max_percent: int,
        *,
        known: Mapping[str, KnownHold] | None = None,
    ) -> CommitBatchOutcome:
        """Settle each hold with its actual cost; items succeed or fail independently.
        ``known``: holds the caller knows of (the ledger's record, a degraded local hold), by
        reservation id, used only where Redis has no record of the id."""
        args = codec.commit_args(items, overage_max_percent, known)
        return codec.commit_reply(await self._run("commit", org, args))

    async def release(self, org: str, reservation_id: str) -> ReleaseOutcome:
        """Void a hold."""
        r = await self._run("release", org, [reservation_id])
        return ReleaseOutcome(reservation_id, int(r[2]), HoldState(_s(r[3])), int(r[1]), bool(r[4]))

    async def extend(
        self, org: str, reservation_id: str, ttl_ms: int, sequence: int
    ) -> ExtendOutcome:
        """Push a live hold's deadline to now + ttl (0 = its own ttl)."""
        r = await self._run("extend", org, [reservation_id, ttl_ms, sequence])
        return ExtendOutcome(reservation_id, int(r[1]), bool(r[2]))

    async def grant(
        self, org: str, grant_id: str, amount_uecu: int, kind: GrantKind, expires_at_ms: int
    ) -> GrantOutcome:
        """Credit an organization, creating its account on the first grant (which records the
        epoch of the node that holds it: see ``epochs``)."""
        epoch = (await self.epochs([org]))[org]
        r = await self._run(
            "grant",
            org,
            [grant_id, amount_uecu, kind.value, expires_at_ms, MAX_GRANTED_UECU, epoch],
        )
        return GrantOutcome(grant_id, int(r[1]), int(r[2]), bool(r[3]))

    async def set_cap(
        self, org: str, scope: str, scope_id: str, cap_uecu: int | None
    ) -> ScopeUsage:
        """Set (or with None clear) the cap of a team ('team') or project ('project')."""
        prefix = {"team": "t", "project": "p"}[scope]
        cap = "" if cap_uecu is None else str(cap_uecu)
        r = await self._run("set_cap", org, [prefix, scope_id, cap])
        cap_s = _s(r[1])
        return ScopeUsage(scope_id, int(cap_s) if cap_s else None, int(r[2]), int(r[3]))

    async def balance(self, org: str) -> Balance:
        """Sweep overdue holds, then read the organization's counters."""
        return codec.balance_reply(org, await self._run("balance", org, []))

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) the organization's auto-top-up."""
        threshold = "" if threshold_uecu is None else str(threshold_uecu)
        await self._run("set_auto_topup", org, [threshold, amount_uecu])

    async def outbox_state(self, org: str) -> StreamState:
        """Where the organization's outbox stands (what a rebuild must read before the ledger)."""
        client = self._transport.client
        return await self._transport.bounded(lambda: stream_state(client, self.outbox_key(org)))

    async def hydrate(
        self, account: LedgerAccount, *, flushed_id: str, force: bool = False
    ) -> bool:
        """Rebuild an organization from the ledger when Redis lacks its account (or, with
        ``force``, in any case: reconcile found its keys lost); False when it already existed.

        ``flushed_id``: the outbox's last id (``outbox_state``) read BEFORE the ledger was, when
        it was fully flushed then ('' when it was not: only an existing account answers).
        The rebuilt account records the epoch of the node that holds it (``epochs``).
        Raises StoreUnavailable when the outbox has moved since or holds events not yet in the
        ledger: the rebuild waits for the flusher (a retry settles it).
        """
        # Read before the script runs: a failover in between records an older epoch, which
        # the flusher's next check takes for a change (one more rebuild), never the reverse.
        epoch = (await self.epochs([account.organization]))[account.organization]
        args = codec.hydrate_args(account, flushed_id, GROUP, force, epoch)
        r = await self._run("hydrate", account.organization, args)
        if _s(r[1]) == "WAIT":
            raise StoreUnavailable(
                f"organization {account.organization} is being rebuilt from the ledger: the "
                "rebuild waits for the flusher to move its outbox into the ledger; retry",
                organization=account.organization,
            )
        return bool(r[1])

    async def reconcile(
        self,
        org: str,
        flushed_id: str,
        ledger_balance_uecu: int,
        group: str,
        ledger_open_jobs: int | None = None,
    ) -> Reconciled:
        """Check the organization's keys against each other (and, given ``ledger_open_jobs``,
        its open jobs against the ledger's count) and repair Redis's balance to the ledger's,
        when every event up to ``flushed_id`` is in the ledger and nothing newer exists. Keys
        found lost are reported, not repaired here: a forced ``hydrate`` rebuilds them."""
        jobs = "" if ledger_open_jobs is None else ledger_open_jobs
        r = await self._run("reconcile", org, [flushed_id, ledger_balance_uecu, group, jobs])
        status = _s(r[1])
        if status == "LOSS":
            return Reconciled(None, key_loss=_s(r[3]))
        return Reconciled(None if status == "SKIP" else int(r[2]))

    async def epochs(self, orgs: Iterable[str]) -> dict[str, str]:
        """The epoch of the node that holds each organization now: '<run id>:<replication
        id>' from INFO (see epoch.lua), read once per node; '' where the server has none (the
        embedded store). Accounts record it when they are created (grant) or rebuilt
        (hydrate), so that a history the node loses later, the record included, shows."""
        return await self._replicas.epochs(orgs)

    async def check_epoch(self, org: str, epoch: str, fence_ms: int) -> str | None:
        """Whether the organization's keys are still of the history last recorded (epoch.lua).
        Returns None when they are (or the account is new to the check, or absent), else the
        recorded epoch: then the rebuild fence is up for ``fence_ms`` and the caller drains
        the outbox and rebuilds (``hydrate`` with force and the new epoch)."""
        r = await self._run("epoch", org, [epoch, fence_ms])
        return _s(r[2]) if _s(r[1]) == "CHANGED" else None

    async def sweep(self, org: str) -> SweepOutcome:
        """Expire overdue holds and grants of one organization."""
        r = await self._run("sweep", org, [])
        next_due = int(r[3])
        return SweepOutcome(int(r[1]), int(r[2]), None if next_due < 0 else next_due)

    async def confirm_durable(self, orgs: Iterable[str]) -> None:
        """Wait until what the primaries of these organizations hold now has reached
        ECU_REDIS_WAIT_REPLICAS replicas (and the AOF, as for a confirmed script): the flusher
        calls it before it writes entries it read into the ledger, so that the ledger never
        holds an event a failover can take back out of Redis. A no-op with the wait off.
        Raises ReplicationUnconfirmed (or StoreUnavailable) as a confirmed script does."""
        await self._replicas.confirm_durable(orgs)

    async def demoted(self) -> None:
        """Called when Redis answered READONLY (see Transport.demoted)."""
        await self._transport.demoted()

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self, name: str, org: str, args: list[Any]) -> list[Any]:
        script = SCRIPTS[name]
        keys = org_keys(self._settings.key_prefix, org)
        argv = [
            org,
            self.clock_offset_ms,
            self._settings.tombstone_ttl_ms,
            self.sweep_limit,
            *args,
        ]
        started = time.perf_counter()
        try:
            if self._replicas.confirms(name):
                reply = await self._replicas.script(script, org, keys, argv)
            else:
                reply = await self._transport.script(script, keys, argv)
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.script_errors.labels(name, _error_kind(exc)).inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.script_done(name, time.perf_counter() - started)
        if _s(reply[0]) == "ERR":
            raise codec.script_error(reply)
        return reply


def _error_kind(exc: Exception) -> str:
    """The ``error`` label of ecu_redis_script_errors_total, from Transport.bounded's messages."""
    if isinstance(exc, ReplicationUnconfirmed):
        return "unconfirmed"
    if not isinstance(exc, StoreUnavailable):
        return "error"
    if exc.message.startswith("Redis did not answer"):
        return "timeout"
    if exc.message.startswith("Redis cannot serve"):
        return "refused"
    return "unreachable"
