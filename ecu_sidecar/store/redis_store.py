"""The store adapter: the only module that talks to Redis.

One method per operation, each exactly one script call (one round trip). The same scripts run
on real Redis (standalone or Cluster) and on the embedded in-process store (fakeredis + Lua),
so the embedded default behaves as production does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from ecu_sidecar.errors import BY_REASON, EcuError, ReplicationUnconfirmed, StoreUnavailable
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    HoldState,
    HoldView,
    KnownHold,
    LedgerAccount,
    Reconciled,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    SweepOutcome,
)
from ecu_sidecar.settings import SENTINEL_SCHEME, Settings, parse_sentinel_url
from ecu_sidecar.store.keys import fence_key, org_keys
from ecu_sidecar.store.multiplex import ScriptChannel, multiplexable
from ecu_sidecar.store.scripts import SCRIPTS, Script
from ecu_sidecar.store.streams import GROUP, StreamState, stream_state

if TYPE_CHECKING:
    from ecu_sidecar.metrics import StoreMetrics

__all__ = ["CONFIRMED_SCRIPTS", "RedisStore", "refusal"]

log = logging.getLogger(__name__)

#: Replies that mean "this node cannot serve now": answered as UNAVAILABLE, never as a bug.
#: redis-py turns most of them into exception classes (and strips the code from the text);
#: the rest are recognized by the reply's first word.
_UNAVAILABLE_ERRORS = (ReadOnlyError, OutOfMemoryError, ClusterDownError, TryAgainError, AskError)
_UNAVAILABLE_PREFIXES = (
    "READONLY",
    "OOM",
    "LOADING",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "NOREPLICAS",
    "MOVED",
    "ASK",
)

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

#: Bound on one embedded-store call (see RedisStore.__init__).
EMBEDDED_TIMEOUT_S = 10.0

_BALANCE_FIELDS = {
    "granted": "granted_uecu",
    "balance": "balance_uecu",
    "held": "held_uecu",
    "committed": "committed_uecu",
    "reserved": "reserved_uecu",
    "committed_from_holds": "committed_from_holds_uecu",
    "released": "released_uecu",
    "expired": "expired_uecu",
    "overage": "overage_uecu",
    "unbilled_overage": "unbilled_overage_uecu",
    "late_committed": "late_committed_uecu",
    "expired_holds": "expired_holds",
    "expired_grants": "expired_grants_uecu",
    "orphan_committed": "orphan_committed_uecu",
    "late_unbilled": "late_unbilled_uecu",
    "carried_committed": "carried_committed_uecu",
    "repaired": "repaired_uecu",
    "atu_a": "auto_topup_amount_uecu",
}


#: Notification kinds in the order the hydrate script takes their "already sent" flags.
_NOTICE_FLAGS = ("low_balance_20", "low_balance_5", "auto_topup_requested")

#: A hold's state as the scripts reply it (one-letter bytes), to the enum.
_HOLD_STATES = {state.value.encode(): state for state in HoldState}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Runs the quota scripts against one Redis deployment."""

    def __init__(
        self,
        client: Any,
        settings: Settings,
        *,
        kind: str,
        channel: ScriptChannel | None = None,
    ) -> None:
        self._client = client
        self._channel = channel
        """Where script calls go when set (standalone Redis over TCP or a Unix socket);
        redis-py's client otherwise, and for every other command."""
        self._settings = settings
        # The embedded store has no network to lose: its only latency is queueing behind other
        # scripts on this process's CPU, so a burst must wait rather than fail as "unreachable".
        self._timeout_s = (
            EMBEDDED_TIMEOUT_S if kind == "embedded" else settings.redis_timeout_ms / 1000
        )
        self.kind = kind
        """'embedded', 'standalone' or 'cluster' (for logs and health)."""
        # redis-py's cluster client has no blocking pool: past max_connections on a node it
        # fails at once. Queue calls here instead, inside the same timeout.
        self._gate = (
            asyncio.Semaphore(settings.redis_pool_size)
            if kind == "cluster" or settings.redis_url.startswith(SENTINEL_SCHEME)
            else None
        )
        self.clock_offset_ms = 0
        """Added to Redis TIME inside every script. Production leaves it at 0; tests move it
        forward to let holds expire without sleeping."""
        self.metrics: StoreMetrics | None = None
        """Where script latency and errors are counted (set by the server or the flusher)."""
        self._wait_replicas = 0 if kind == "embedded" else settings.redis_wait_replicas
        self._waitaof: bool | None = None
        """Whether WAITAOF 1 0 joins WAIT (learned once, on the first confirmed call: the
        server has WAITAOF, Redis >= 7.2, and its AOF is on); None until then."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStore:
        """Connect as configured: embedded when ECU_REDIS_URL is empty."""
        if settings.embedded:
            import fakeredis

            client = fakeredis.FakeAsyncRedis(
                server=fakeredis.FakeServer(),
                max_connections=settings.redis_pool_size,
                connection_pool_class=aioredis.BlockingConnectionPool,
            )
            return cls(client, settings, kind="embedded")
        # No socket_timeout: RedisStore._call bounds every call with ECU_REDIS_TIMEOUT_MS
        # already, and with one set redis-py wraps each send in asyncio.wait_for (a new Task
        # per command) and each read in another timeout: a fifth of a script call's CPU.
        common: dict[str, Any] = {
            "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
            "retry": Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            "health_check_interval": 30,
        }
        if not settings.redis_cluster:
            # A pooled connection broken by a Redis restart is retried once on a fresh
            # connection (safe: every script is idempotent on its caller id).
            common["retry_on_error"] = [ConnectionError]
        if settings.redis_cluster:
            common["socket_timeout"] = settings.redis_timeout_ms / 1000
            # reinitialize_steps=0: a MOVED reply only patches that slot's route. With the
            # default (a full topology refresh every 5th MOVED), redis-py closes every node's
            # connections, including those other in-flight commands are using; and a client
            # not yet initialized sends its first commands to one node regardless of key, so
            # a concurrent first burst gets many MOVEDs and fails with ConnectionError
            # (tests/test_cluster.py::test_cold_client_concurrent_burst).
            client = RedisCluster.from_url(
                settings.redis_url,
                max_connections=settings.redis_pool_size,
                reinitialize_steps=0,
                **common,
            )
            return cls(client, settings, kind="cluster")
        if settings.redis_url.startswith(SENTINEL_SCHEME):
            return cls(_sentinel_client(settings, common), settings, kind="standalone")
        # A blocking pool: under a burst, calls queue for a connection (bounded by the call
        # timeout) instead of failing at once when every connection is busy.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_pool_size,
            timeout=settings.redis_timeout_ms / 1000,
            **common,
        )
        client = aioredis.Redis(connection_pool=pool)
        channel = None
        if multiplexable(settings.redis_url):
            channel = ScriptChannel(
                settings.redis_url, connect_timeout_s=settings.redis_connect_timeout_ms / 1000
            )
        return cls(client, settings, kind="standalone", channel=channel)

    def acct_key(self, org: str) -> str:
        """The organization's account hash."""
        return org_keys(self._settings.key_prefix, org)[0]

    def outbox_key(self, org: str) -> str:
        """The organization's outbox stream."""
        return org_keys(self._settings.key_prefix, org)[4]

    async def missing_accounts(self, orgs: Sequence[str]) -> list[str]:
        """The organizations among ``orgs`` that have no account in Redis."""
        if not orgs:
            return []

        async def check() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for org in orgs:
                pipe.hexists(self.acct_key(org), "balance")
            return await pipe.execute()

        found = await self._call(check)
        return [org for org, present in zip(orgs, found, strict=True) if not present]

    async def hold_totals(self, orgs: Sequence[str]) -> tuple[int, int]:
        """(active holds, µECU held) summed over ``orgs``: one pipelined round trip of ZCARD
        and HGET per organization (for the flusher's gauges)."""
        if not orgs:
            return 0, 0

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for org in orgs:
                keys = org_keys(self._settings.key_prefix, org)
                pipe.zcard(keys[2])
                pipe.hget(keys[0], "held")
            return await pipe.execute()

        replies = await self._call(read)
        holds = sum(int(n or 0) for n in replies[0::2])
        held = sum(int(_s(v)) for v in replies[1::2] if v is not None)
        return holds, held

    async def bound_outboxes(self, orgs: Sequence[str], max_len: int) -> tuple[int, int]:
        """Trim the outbox of each of ``orgs`` to about ``max_len`` events (0: trim nothing);
        returns (events left in those outboxes, events trimmed). For a sidecar without a
        ledger, whose outboxes nothing flushes (ECU_OUTBOX_MAX_LEN).

        XTRIM MAXLEN ~ drops whole stream nodes, the oldest first: at most
        stream-node-max-entries - 1 (99 by default) events beyond ``max_len`` stay, and one
        call drops at most 100 nodes' worth (Redis's default LIMIT), so the work per call is
        bounded. An outbox with a consumer group is never trimmed: a flusher reads it (a
        sidecar run without ECU_LEDGER_URL beside flushers that have one), and every one of
        its events must reach the ledger. One pipelined round trip (XLEN) when every outbox is
        within the bound; two more (XINFO GROUPS, XTRIM) for those that are not."""
        if not orgs:
            return 0, 0
        keys = [self.outbox_key(org) for org in orgs]

        async def lengths() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.xlen(key)
            return await pipe.execute()

        sizes = [int(n or 0) for n in await self._call(lengths)]
        left = sum(sizes)
        over = [key for key, n in zip(keys, sizes, strict=True) if max_len and n > max_len]
        if not over:
            return left, 0

        async def groups() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in over:
                pipe.xinfo_groups(key)
            # A stream deleted meanwhile answers an error: it is simply not trimmed.
            return await pipe.execute(raise_on_error=False)

        replies = await self._call(groups)
        unread = [key for key, r in zip(over, replies, strict=True) if r == []]
        if not unread:
            return left, 0

        async def trim() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in unread:
                pipe.xtrim(key, maxlen=max_len, approximate=True)
            return await pipe.execute()

        trimmed = sum(int(n or 0) for n in await self._call(trim))
        return left - trimmed, trimmed

    async def close(self) -> None:
        """Close the script channel and the connection pool."""
        if self._channel is not None:
            await self._channel.close()
        await self._client.aclose()

    async def connect(self) -> None:
        """Learn the cluster layout up front (a no-op elsewhere), so the first burst of calls
        is routed right instead of bouncing on MOVED. Raises StoreUnavailable."""
        if self.kind == "cluster":
            await self._call(lambda: self._client.initialize())

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers within the timeout."""
        await self._call(lambda: self._client.ping())

    async def now_ms(self) -> int:
        """The scripts' clock: Redis TIME in ms plus ``clock_offset_ms`` (what every script
        decides with, e.g. whether a grant has already expired). Raises StoreUnavailable."""
        reply = await self._call(lambda: self._client.time())
        if isinstance(reply, dict):  # a Cluster client may answer per node: any node's clock
            reply = next(iter(reply.values()))
        seconds, micros = reply
        return int(seconds) * 1000 + int(micros) // 1000 + self.clock_offset_ms

    # -- operations ---------------------------------------------------------------------------

    async def reserve(
        self, account: AccountRef, items: Sequence[ReserveItem], *, default_ttl_ms: int = 0
    ) -> ReserveOutcome:
        """Hold every item against the account, all or nothing; an item's TTL of 0 means
        ``default_ttl_ms``."""
        args: list[Any] = [account.team, account.project, account.user, len(items)]
        for it in items:
            args += [
                it.reservation_id, it.amount_uecu, it.job_type.value, it.model,
                it.ttl_ms or default_ttl_ms, it.rate_card_version, it.fingerprint,
            ]  # fmt: skip
        r = await self._run("reserve", account.organization, args)
        states = _HOLD_STATES
        holds = [
            HoldView(r[i].decode(), r[i + 1], r[i + 2], states[r[i + 3]], r[i + 4].decode())
            for i in range(3, len(r), 5)
        ]
        return ReserveOutcome(holds, int(r[1]), bool(r[2]))

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
        args: list[Any] = [overage_max_percent, len(known) if known else 0, len(items)]
        for it in items:
            u = it.usage
            args += [
                it.reservation_id, it.actual_uecu, u.tokens_in, u.tokens_out, u.calls,
                it.rate_card_version, it.breakdown,
            ]  # fmt: skip
        for rid, k in (known or {}).items():
            args += [
                rid, "D" if k.kind == "degraded" else "L", k.amount_uecu, k.t0_ms, k.team,
                k.project, k.user, k.job_type, k.model,
            ]  # fmt: skip
        r = await self._run("commit", org, args)
        out = []
        for i in range(2, len(r), 10):
            rid, status = r[i].decode(), r[i + 1]
            if status != b"OK":
                error = BY_REASON[status.decode()](r[i + 2].decode(), reservation_id=rid)
                out.append(CommitOutcome(rid, available_uecu=int(r[1]), error=error))
                continue
            out.append(
                CommitOutcome(
                    rid,
                    committed_uecu=int(r[i + 3]),
                    released_uecu=int(r[i + 4]),
                    overage_uecu=int(r[i + 5]),
                    unbilled_overage_uecu=int(r[i + 6]),
                    late=bool(r[i + 7]),
                    replayed=bool(r[i + 8]),
                    available_uecu=int(r[i + 9]),
                )
            )
        return CommitBatchOutcome(out, int(r[1]))

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
        r = await self._run("balance", org, [])
        fields = {_s(r[i]): _s(r[i + 1]) for i in range(2, len(r), 2)}
        values = {attr: int(fields.get(name, 0)) for name, attr in _BALANCE_FIELDS.items()}
        scopes: dict[str, dict[str, dict[str, int]]] = {"t": {}, "p": {}}
        for name, value in fields.items():
            kind, sep, rest = name.partition(":")
            if sep and kind in scopes:
                scope_id, _, attr = rest.rpartition(":")
                scopes[kind].setdefault(scope_id, {})[attr] = int(value)
        teams, projects = (
            [
                ScopeUsage(sid, c.get("cap"), c.get("held", 0), c.get("used", 0))
                for sid, c in sorted(scopes[k].items())
            ]
            for k in ("t", "p")
        )
        threshold = fields.get("atu_t")
        return Balance(
            organization=org,
            outstanding_holds=int(r[1]),
            teams=teams,
            projects=projects,
            auto_topup_threshold_uecu=int(threshold) if threshold else None,
            **values,
        )

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) the organization's auto-top-up."""
        threshold = "" if threshold_uecu is None else str(threshold_uecu)
        await self._run("set_auto_topup", org, [threshold, amount_uecu])

    async def outbox_state(self, org: str) -> StreamState:
        """Where the organization's outbox stands (what a rebuild must read before the ledger)."""
        return await self._call(lambda: stream_state(self._client, self.outbox_key(org)))

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
        flags = set(account.notified)
        args: list[Any] = [
            flushed_id,
            GROUP,
            "1" if force else "0",
            account.granted_uecu,
            account.expired_grants_uecu,
            account.committed_uecu,
            account.generation,
            "" if account.auto_topup_threshold_uecu is None else account.auto_topup_threshold_uecu,
            account.auto_topup_amount_uecu,
            "" if account.notice_reference_uecu is None else account.notice_reference_uecu,
            *("1" if kind in flags else "" for kind in _NOTICE_FLAGS),
            len(account.scopes),
        ]
        for scope, scope_id, cap, used in account.scopes:
            args += [scope[0], scope_id, "" if cap is None else cap, used]
        args.append(len(account.expiring_grants))
        for grant_id, expires_ms, rest in account.expiring_grants:
            args += [grant_id, expires_ms, rest]
        args.append(len(account.recent_grants))
        for grant_id, amount, kind, expires_ms in account.recent_grants:
            args += [grant_id, amount, kind, expires_ms]
        args.append(len(account.active_holds))
        for h in account.active_holds:
            args += [
                h.reservation_id, h.amount_uecu, h.t0_ms, h.deadline_ms, h.ttl_ms, h.sequence,
                h.team, h.project, h.user, h.job_type, h.model, h.rate_card_version,
            ]  # fmt: skip
        # Read before the script runs: a failover in between records an older epoch, which
        # the flusher's next check takes for a change (one more rebuild), never the reverse.
        args.append((await self.epochs([account.organization]))[account.organization])
        r = await self._run("hydrate", account.organization, args)
        if _s(r[1]) == "WAIT":
            raise StoreUnavailable(
                f"organization {account.organization} is being rebuilt from the ledger: the "
                "rebuild waits for the flusher to move its outbox into the ledger; retry",
                organization=account.organization,
            )
        return bool(r[1])

    async def reconcile(
        self, org: str, flushed_id: str, ledger_balance_uecu: int, group: str
    ) -> Reconciled:
        """Check the organization's keys against each other and repair Redis's balance to the
        ledger's, when every event up to ``flushed_id`` is in the ledger and nothing newer
        exists. Keys found lost are reported, not repaired here: a forced ``hydrate`` rebuilds
        them."""
        r = await self._run("reconcile", org, [flushed_id, ledger_balance_uecu, group])
        status = _s(r[1])
        if status == "LOSS":
            return Reconciled(None, key_loss=_s(r[3]))
        return Reconciled(None if status == "SKIP" else int(r[2]))

    async def epochs(self, orgs: Iterable[str]) -> dict[str, str]:
        """The epoch of the node that holds each organization now: '<run id>:<replication
        id>' from INFO (see epoch.lua), read once per node; '' where the server has none (the
        embedded store). Accounts record it when they are created (grant) or rebuilt
        (hydrate), so that a history the node loses later, the record included, shows."""
        orgs = list(orgs)
        if self.kind == "embedded":  # one process's memory: no failover, no restart to survive
            return dict.fromkeys(orgs, "")
        out: dict[str, str] = {}
        info = [("INFO", "server"), ("INFO", "replication")]
        for members in (await self._by_node(orgs)).values():
            key = self.acct_key(members[0])
            replies = await self._call(lambda key=key: self._pipeline(key, info))
            if any(isinstance(r, Exception) for r in replies):
                raise next(r for r in replies if isinstance(r, Exception))
            run_id = str(_info(replies[0]).get("run_id", ""))
            replid = str(_info(replies[1]).get("master_replid", ""))
            epoch = f"{run_id}:{replid}" if run_id and replid else ""
            out.update(dict.fromkeys(members, epoch))
        return out

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

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self, name: str, org: str, args: list[Any]) -> list[Any]:
        script = SCRIPTS[name]
        keys = org_keys(self._settings.key_prefix, org)
        argv = [
            org,
            self.clock_offset_ms,
            self._settings.tombstone_ttl_ms,
            self._settings.sweep_limit,
            *args,
        ]
        confirm = bool(self._wait_replicas) and name in CONFIRMED_SCRIPTS
        started = time.perf_counter()
        try:
            if confirm:
                reply = await self._call(lambda: self._eval_confirmed(script, org, keys, argv))
            else:
                reply = await self._call(lambda: self._eval(script, keys, argv))
        except Exception as exc:
            if self.metrics is not None:
                self.metrics.script_errors.labels(name, _error_kind(exc)).inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.script_done(name, time.perf_counter() - started)
        if _s(reply[0]) == "ERR":
            raise _script_error(reply)
        return reply

    async def _eval(self, script: Script, keys: Sequence[str], argv: list[Any]) -> Any:
        # The multiplexed channel where there is one; redis-py's client (which routes EVALSHA
        # by its keys on a Cluster) otherwise. Both raise redis-py's NoScriptError.
        execute = self._client.execute_command if self._channel is None else self._channel.execute
        try:
            return await execute("EVALSHA", script.sha, len(keys), *keys, *argv)
        except NoScriptError:
            log.debug("script %s not cached on this node; loading it", script.name)
            return await execute("EVAL", script.source, len(keys), *keys, *argv)

    async def _eval_confirmed(
        self, script: Script, org: str, keys: Sequence[str], argv: list[Any]
    ) -> Any:
        """The script, then a write of the organization's fence key, then WAIT (and WAITAOF
        where it applies), pipelined: one round trip. Raises ReplicationUnconfirmed when fewer
        replicas than ECU_REDIS_WAIT_REPLICAS acknowledged in time.

        WAIT covers the writes its connection made before it. The fence makes that everything
        the primary holds at that moment: a script that wrote nothing (a replay, a refusal)
        still answers from state an earlier, perhaps unconfirmed call wrote, maybe on another
        connection; it too is confirmed before it is answered."""
        confirm = await self._confirm_commands(org)
        n = len(keys)
        evalsha = ("EVALSHA", script.sha, n, *keys, *argv)
        replies = await self._pipeline(keys[0], [evalsha, *confirm])
        if isinstance(replies[0], NoScriptError):
            log.debug("script %s not cached on this node; loading it", script.name)
            replies = await self._pipeline(
                keys[0], [("EVAL", script.source, n, *keys, *argv), *confirm]
            )
        if isinstance(replies[0], Exception):
            raise replies[0]
        self._check_confirmed(replies[1:])
        return replies[0]

    async def confirm_durable(self, orgs: Iterable[str]) -> None:
        """Wait until what the primaries of these organizations hold now has reached
        ECU_REDIS_WAIT_REPLICAS replicas (and the AOF, as for a confirmed script): the flusher
        calls it before it writes entries it read into the ledger, so that the ledger never
        holds an event a failover can take back out of Redis. A no-op with the wait off.
        Raises ReplicationUnconfirmed (or StoreUnavailable) as a confirmed script does."""
        if not self._wait_replicas:
            return
        # One fence write and WAIT per node: an organization's fence lives on its primary.
        for members in (await self._by_node(orgs)).values():
            await self._call(lambda org=members[0]: self._confirm(org))

    async def _by_node(self, orgs: Iterable[str]) -> dict[str, list[str]]:
        """The organizations grouped by the primary that holds them (one group but on a
        Cluster), for commands that go once per node."""
        orgs = list(orgs)
        if self.kind != "cluster":
            return {"": orgs} if orgs else {}
        await self._call(lambda: self._client.initialize())  # a no-op once initialized
        groups: dict[str, list[str]] = {}
        for org in orgs:
            node = self._client.get_node_from_key(self.acct_key(org)).name
            groups.setdefault(node, []).append(org)
        return groups

    async def _confirm(self, org: str) -> None:
        commands = await self._confirm_commands(org)
        self._check_confirmed(await self._pipeline(self.acct_key(org), commands))

    async def _confirm_commands(self, org: str) -> list[tuple[Any, ...]]:
        """The fence write and the waits that confirm a write of ``org`` (see _eval_confirmed)."""
        if self._waitaof is None:
            self._waitaof = await self._has_waitaof(self.acct_key(org))
        timeout_ms = self._settings.redis_wait_timeout_ms
        confirm: list[tuple[Any, ...]] = [
            ("SET", fence_key(self._settings.key_prefix, org), "1", "PX", _FENCE_TTL_MS),
            ("WAIT", self._wait_replicas, timeout_ms),
        ]
        if self._waitaof:
            confirm.append(("WAITAOF", 1, 0, timeout_ms))
        return confirm

    def _check_confirmed(self, replies: list[Any]) -> None:
        """Raise unless the replies of _confirm_commands say the write is confirmed."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        timeout_ms = self._settings.redis_wait_timeout_ms
        acked = int(replies[1])
        if acked < self._wait_replicas:
            raise ReplicationUnconfirmed(
                f"the write's durability is unconfirmed: {acked} of "
                f"{self._wait_replicas} replicas acknowledged it within {timeout_ms} ms "
                "(ECU_REDIS_WAIT_REPLICAS); the outcome is unknown, and a retry with the same "
                "id is answered as a replay if the write survived",
                acknowledged=acked,
                required=self._wait_replicas,
            )
        if self._waitaof and not int(replies[2][0]):
            raise ReplicationUnconfirmed(
                f"the write's durability is unconfirmed: the primary did not fsync its AOF "
                f"within {timeout_ms} ms; the outcome is unknown, and a retry with the same "
                "id is answered as a replay if the write survived",
                acknowledged=acked,
                required=self._wait_replicas,
            )

    async def _pipeline(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip to the node that owns ``key``; error replies in place.

        Never on the multiplexed script channel: WAIT blocks the connection it is sent on, and
        on the one connection every call shares it would hold all of them (reads included)
        behind it for up to ECU_REDIS_WAIT_TIMEOUT_MS each; with a replica away the sidecar
        would then serve one write per wait timeout. A pooled connection per confirmed call
        (ECU_REDIS_POOL_SIZE of them, calls queue within the timeout) blocks only its own."""
        if self.kind == "cluster":
            return await self._cluster_pipeline(key, commands)
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    async def _cluster_pipeline(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        # redis-py's cluster pipeline routes a keyless WAIT to a node of its own choosing:
        # the commands go as one pipeline on a connection of the key's primary instead, so
        # that WAIT counts the replicas of the node that ran the script.
        client = self._client
        await client.initialize()  # a no-op unless a failure asked for a fresh layout
        for _ in range(2):
            node = client.get_node_from_key(key)
            cmds = [PipelineCommand(i, *c) for i, c in enumerate(commands)]
            try:
                await node.execute_pipeline(cmds)
            except (ConnectionError, RedisTimeoutError):
                # As redis-py's own command path does: this node's connections are stale and
                # the layout is to be learned again (the primary may have failed over).
                node.update_active_connections_for_reconnect()
                await node.disconnect_free_connections()
                client.nodes_manager.move_node_to_end_of_cached_nodes(node.name)
                client._initialize = True  # read by initialize() above
                raise
            first = cmds[0].result
            if isinstance(first, MovedError):
                # The slot moved (resharding, or a failover seen by the node we reached): the
                # script did not run there. Learn the new owner and send it once more.
                await client.nodes_manager.move_slot(first)
                continue
            return [c.result for c in cmds]
        raise StoreUnavailable("Redis cannot serve: MOVED")

    async def _has_waitaof(self, key: str) -> bool:
        """Whether the primary has WAITAOF (Redis >= 7.2) and its AOF on: then an answer also
        waits until the primary fsynced the write (WAITAOF 1 0), so that a restart of the
        primary without a failover keeps it. WAITAOF's replica count is not used: replicas
        without AOF never acknowledge it, and WAIT's in-memory acknowledgement is what
        survives a failover. Learned once; on any doubt, WAIT alone."""
        try:
            if self.kind == "cluster":
                node = self._client.get_node_from_key(key)
                info = await node.execute_command("INFO", "server")
                persistence = await node.execute_command("INFO", "persistence")
            else:
                info = await self._client.execute_command("INFO", "server")
                persistence = await self._client.execute_command("INFO", "persistence")
        except ResponseError as exc:  # INFO renamed or refused by an ACL
            log.warning("cannot read the Redis version (%s): confirming writes with WAIT", exc)
            return False
        version = str(_info(info).get("redis_version", "0"))
        aof = str(_info(persistence).get("aof_enabled", "0")) == "1"
        waitaof = waitaof_applies(version, aof)
        log.info(
            "confirming writes on %d replica(s) with WAIT%s (Redis %s, AOF %s)",
            self._wait_replicas,
            " and WAITAOF 1 0" if waitaof else "",
            version,
            "on" if aof else "off",
        )
        return waitaof

    async def _call(self, fn: Any) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._gate is None:
                    return await fn()
                async with self._gate:
                    return await fn()
        except TimeoutError:
            if self._channel is not None:
                self._channel.stalled(started)
            raise StoreUnavailable(
                f"Redis did not answer within {self._settings.redis_timeout_ms} ms"
            ) from None
        except (
            ConnectionError,
            RedisTimeoutError,
            BusyLoadingError,
            RedisClusterException,
            OSError,
        ) as exc:
            raise StoreUnavailable(f"Redis is unreachable: {type(exc).__name__}") from None
        except ResponseError as exc:
            if isinstance(exc, ReadOnlyError):
                await self.demoted()
            word = refusal(exc)
            if word is not None:
                raise StoreUnavailable(f"Redis cannot serve: {word}") from None
            raise

    async def demoted(self) -> None:
        """Called when Redis answered READONLY: on a standalone Redis, the node we reach was
        demoted to a replica (a failover behind a stable address). Drop every idle pooled
        connection so the next calls connect afresh and find the new primary, instead of
        failing on READONLY forever."""
        if self.kind != "standalone":
            return
        log.warning("Redis answered READONLY: reconnecting")
        # Only idle connections: those in use by other calls are dropped when they are
        # released after meeting READONLY themselves (tearing them down mid-handshake would
        # surface as an internal error in those calls).
        await self._client.connection_pool.disconnect(inuse_connections=False)
        if self._channel is not None:
            self._channel.retire()


def refusal(exc: ResponseError) -> str | None:
    """The name of a reply that means "this node cannot serve now" (READONLY, NOREPLICAS,
    OOM, LOADING, CLUSTERDOWN ...), answered as UNAVAILABLE; None for any other error."""
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return type(exc).__name__
    if str(exc).startswith(_UNAVAILABLE_PREFIXES):
        return str(exc).split()[0]
    return None


def _error_kind(exc: Exception) -> str:
    """The ``error`` label of ecu_redis_script_errors_total, from the messages of _call."""
    if isinstance(exc, ReplicationUnconfirmed):
        return "unconfirmed"
    if not isinstance(exc, StoreUnavailable):
        return "error"
    if exc.message.startswith("Redis did not answer"):
        return "timeout"
    if exc.message.startswith("Redis cannot serve"):
        return "refused"
    return "unreachable"


def waitaof_applies(version: str, aof_enabled: bool) -> bool:
    """Whether ``WAITAOF 1 0`` joins WAIT: the server has it (Redis >= 7.2) and runs AOF."""
    parts = [*version.split("."), "0"][:2]
    major, minor = (int(p) if p.isdigit() else 0 for p in parts)
    return (major, minor) >= (7, 2) and aof_enabled


def _info(reply: Any) -> dict[str, Any]:
    """An INFO reply as a dict (redis-py parses it; the raw text otherwise)."""
    if isinstance(reply, dict):
        return reply
    out = {}
    for line in _s(reply).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def _sentinel_client(settings: Settings, common: dict[str, Any]) -> Any:
    """A client of the primary a Sentinel URL names, through redis-py's Sentinel support: the
    primary's address is asked of the Sentinels on each new connection, and a connection that
    meets READONLY (a demoted primary) is dropped and retried once on the new primary."""
    url = parse_sentinel_url(settings.redis_url)
    timeout = settings.redis_connect_timeout_ms / 1000
    sentinel = Sentinel(
        list(url.sentinels),
        sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout},
        socket_connect_timeout=timeout,
    )
    return sentinel.master_for(
        url.service,
        redis_class=aioredis.Redis,
        db=url.db,
        username=url.username,
        password=url.password,
        max_connections=settings.redis_pool_size,
        retry=common["retry"],
        retry_on_error=[ConnectionError],
        health_check_interval=common["health_check_interval"],
    )


def _script_error(reply: list[Any]) -> EcuError:
    reason, message = _s(reply[1]), _s(reply[2])
    meta = {_s(reply[i]): _s(reply[i + 1]) for i in range(3, len(reply) - 1, 2)}
    return BY_REASON[reason](message, **meta)
