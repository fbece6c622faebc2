"""Settings: one frozen dataclass, the only reader of the environment.

Values come from, in rising precedence: the defaults below, an optional TOML file named by
``ECU_CONFIG_FILE`` (keys are the variable names without the ``ECU_`` prefix, lower case), and
``ECU_*`` environment variables. Everything is validated once, at start-up, with errors that
name the variable, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ecu_sidecar.settings.addresses import (
    is_loopback,
    mask_url,
    parse_sentinel_url,
    split_hostport,
)
from ecu_sidecar.settings.values import (
    SENTINEL_SCHEME,
    UNIX_SCHEME,
    SettingsError,
    coerce,
    int_range,
    read_file,
)

__all__ = ["Settings", "describe"]

#: Bound of ECU_METRICS_ORGS (ecu_sidecar.metrics.MAX_METRICS_ORGS).
_MAX_METRICS_ORGS = 100

#: Smallest non-zero ECU_OUTBOX_MAX_LEN: a Redis stream node holds up to 100 entries (the
#: default stream-node-max-entries), and approximate trimming drops whole nodes only.
_MIN_OUTBOX_MAX_LEN = 100


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar can be configured with. Field docs name the variable."""

    listen: str = field(default="127.0.0.1:50051", metadata={"kind": "str"})
    """ECU_LISTEN: host:port the gRPC server binds (loopback by default; any other address
    requires ECU_TLS_CERT_FILE and ECU_TLS_KEY_FILE), or ``unix:///abs/path``: a Unix domain
    socket (its directory must exist), e.g. in a volume the worker's container shares, whose
    file permissions (ECU_UNIX_SOCKET_MODE) are the access control."""

    unix_socket_mode: str = field(default="0660", metadata={"kind": "str"})
    """ECU_UNIX_SOCKET_MODE: the permissions (octal) of the Unix socket of ECU_LISTEN: owner
    and group may connect (a pod's fsGroup shares the group), nobody else."""

    tls_cert_file: str = field(default="", metadata={"kind": "str"})
    """ECU_TLS_CERT_FILE: PEM certificate chain of the gRPC server (turns TLS on)."""

    tls_key_file: str = field(default="", metadata={"kind": "str"})
    """ECU_TLS_KEY_FILE: PEM private key of ECU_TLS_CERT_FILE."""

    tls_client_ca_file: str = field(default="", metadata={"kind": "str"})
    """ECU_TLS_CLIENT_CA_FILE: PEM CA bundle; when set, clients must present a certificate it
    signed (mutual TLS)."""

    health_listen: str = field(default="", metadata={"kind": "str"})
    """ECU_HEALTH_LISTEN: host:port of a plaintext server carrying only grpc.health.v1 and a
    reflection describing only it (for kubelet probes that cannot reach loopback); empty
    disables it."""

    degraded_allowance_uecu: int = field(default=0, metadata=int_range(0, 10**12))
    """ECU_DEGRADED_ALLOWANCE_UECU: while Redis is unreachable, grant at most this many µECU of
    holds per organization locally, journaled on disk (the explicit overspend bound per sidecar
    and organization). 0 (the default) fails closed: UNAVAILABLE."""

    degraded_journal: str = field(default="", metadata={"kind": "str"})
    """ECU_DEGRADED_JOURNAL: the journal file of degraded mode (required with an allowance)."""

    allowed_orgs: str = field(default="", metadata={"kind": "str"})
    """ECU_ALLOWED_ORGS: comma-separated organizations this sidecar may act for; any other is
    refused with PERMISSION_DENIED. Empty allows all."""

    redis_url: str = field(default="", metadata={"kind": "url"})
    """ECU_REDIS_URL: redis://, rediss:// or unix:// URL, or a Sentinel URL
    (redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]); empty runs the
    embedded in-process store."""

    redis_cluster: bool = field(default=False, metadata={"kind": "bool"})
    """ECU_REDIS_CLUSTER: treat ECU_REDIS_URL as a Redis Cluster seed node."""

    redis_timeout_ms: int = field(default=250, metadata=int_range(1, 60_000))
    """ECU_REDIS_TIMEOUT_MS: bound on one store call; past it the RPC answers UNAVAILABLE."""

    redis_connect_timeout_ms: int = field(default=250, metadata=int_range(1, 60_000))
    """ECU_REDIS_CONNECT_TIMEOUT_MS: bound on opening a Redis connection."""

    redis_pool_size: int = field(default=64, metadata=int_range(1, 10_000))
    """ECU_REDIS_POOL_SIZE: most Redis connections per node."""

    redis_wait_replicas: int = field(default=0, metadata=int_range(0, 16))
    """ECU_REDIS_WAIT_REPLICAS: before answering OK to a mutation (reserve, commit, release,
    extend, grant, caps, auto-top-up, and the flusher's sweeps), wait until this many replicas
    acknowledged the script's write (Redis WAIT, sent in the script's own round trip); a write
    not confirmed within ECU_REDIS_WAIT_TIMEOUT_MS answers UNAVAILABLE with reason
    REPLICATION_UNCONFIRMED (outcome unknown; a retry with the same id is a replay). 0 (the
    default) does not wait: an acknowledged write can be lost in a failover. Production with
    replicas: 1 or more (at most the replicas each primary has)."""

    redis_wait_timeout_ms: int = field(default=100, metadata=int_range(1, 60_000))
    """ECU_REDIS_WAIT_TIMEOUT_MS: bound on the replica acknowledgement of one write (WAIT's
    timeout); must be below ECU_REDIS_TIMEOUT_MS, so an unconfirmed write is told apart from an
    unreachable Redis."""

    key_prefix: str = field(default="ecu", metadata={"kind": "str"})
    """ECU_KEY_PREFIX: namespace of every Redis key (ecu:{org}:...)."""

    default_ttl_ms: int = field(default=300_000, metadata=int_range(1_000, 7 * 86_400_000))
    """ECU_DEFAULT_TTL_MS: hold lifetime when a request leaves ttl_ms at 0."""

    min_ttl_ms: int = field(default=1_000, metadata=int_range(1, 86_400_000))
    """ECU_MIN_TTL_MS: shortest hold lifetime a request may ask for."""

    max_ttl_ms: int = field(default=86_400_000, metadata=int_range(1_000, 7 * 86_400_000))
    """ECU_MAX_TTL_MS: longest hold lifetime a request (or one extend) may ask for."""

    job_ttl_ms: int = field(default=900_000, metadata=int_range(1, 30 * 86_400_000))
    """ECU_JOB_TTL_MS: an approved job with no step and no heartbeat for this long ends by
    itself (abandoned: its money returns to the wallet) when its approval leaves ttl_ms at 0."""

    job_max_ttl_ms: int = field(default=604_800_000, metadata=int_range(1_000, 30 * 86_400_000))
    """ECU_JOB_MAX_TTL_MS: the longest abandonment ttl an approval may ask for (7 days)."""

    tombstone_ttl_ms: int = field(default=3_600_000, metadata=int_range(1_000, 30 * 86_400_000))
    """ECU_TOMBSTONE_TTL_MS: how long a settled hold still answers replays."""

    overage_max_percent: int = field(default=20, metadata=int_range(0, 1_000))
    """ECU_OVERAGE_MAX_PERCENT: a commit above its hold is billed up to hold × (1 + pct/100)."""

    max_batch_items: int = field(default=2_000, metadata=int_range(1, 2_000))
    """ECU_MAX_BATCH_ITEMS: most steps in one ReserveBatch/CommitBatch. One batch is one
    script, and Redis runs nothing else meanwhile, for any organization on its shard: measured
    here, a CommitBatch of 500 holds Redis ~8 ms, of 2,000 (the most) ~28 ms
    (docs/operations.md): lower it where other organizations' p99 matters more."""

    sweep_interval_ms: int = field(default=1_000, metadata=int_range(10, 3_600_000))
    """ECU_SWEEP_INTERVAL_MS: how often the background sweeper expires overdue holds."""

    sweep_limit: int = field(default=200, metadata=int_range(1, 1_000))
    """ECU_SWEEP_LIMIT: most expired holds (and old tombstones) one script call handles."""

    sweep_max_orgs: int = field(default=10_000, metadata=int_range(1, 1_000_000))
    """ECU_SWEEP_MAX_ORGS: most recently seen organizations the background sweeper tracks."""

    outbox_max_len: int = field(default=10_000, metadata=int_range(0, 1_000_000_000))
    """ECU_OUTBOX_MAX_LEN: with no ledger (ECU_LEDGER_URL empty, so nothing flushes the
    outboxes), the background sweeper trims the outbox of each organization it serves to about
    this many events (XTRIM MAXLEN ~: whole stream nodes, so up to stream-node-max-entries - 1
    more stay); an outbox a flusher reads (it has a consumer group) is never trimmed. 0: no
    bound; otherwise at least 100. Ignored when a ledger is configured."""

    rate_card_file: str = field(default="", metadata={"kind": "str"})
    """ECU_RATE_CARD_FILE: the rate card (TOML) that prices job specs and usage; empty: the
    sidecar takes amounts only (Preview and job-spec reservations answer FAILED_PRECONDITION)."""

    rate_card_archive_dir: str = field(default="", metadata={"kind": "str"})
    """ECU_RATE_CARD_ARCHIVE_DIR: older rate cards (*.toml) loaded at start so commits of holds
    pinned to them still price after a restart."""

    tokenizer_threads: int = field(default=2, metadata=int_range(1, 64))
    """ECU_TOKENIZER_THREADS: a prompt text of 131,072 characters or more is cut where its token
    count stays exact, and its parts are counted in up to this many threads (1: one thread)."""

    rate_card_poll_ms: int = field(default=2_000, metadata=int_range(0, 3_600_000))
    """ECU_RATE_CARD_POLL_MS: how often the rate card file is checked for changes (0 = only on
    SIGHUP)."""

    ledger_url: str = field(default="", metadata={"kind": "dsn"})
    """ECU_LEDGER_URL: postgresql://... or sqlite:///path; empty runs without a ledger."""

    ledger_timeout_ms: int = field(default=2_000, metadata=int_range(100, 60_000))
    """ECU_LEDGER_TIMEOUT_MS: bound on one ledger call the sidecar makes on a request's path (a
    grant's ledger-first write or void, the read that rebuilds a lost organization), and the
    ledger's connect, pool-wait and statement timeouts; past it the RPC answers UNAVAILABLE."""

    ledger_threads: int = field(default=4, metadata=int_range(1, 64))
    """ECU_LEDGER_THREADS: threads of the sidecar's own for its ledger calls (rebuilds, ledger-first
    grants), apart from long-prompt pricing and the in-process flusher, so a burst of one never
    starves the others."""

    ledger_negative_ttl_ms: int = field(default=5_000, metadata=int_range(0, 3_600_000))
    """ECU_LEDGER_NEGATIVE_TTL_MS: how long an organization the ledger does not know is
    remembered as unknown (no ledger transaction per request for it meanwhile); 0 disables."""

    flusher_in_serve: bool | None = field(default=None, metadata={"kind": "bool"})
    """ECU_FLUSHER_IN_SERVE: run the flusher inside `serve` (default: yes on the embedded store
    when a ledger is configured, no with real Redis, where `ecu-sidecar flush` runs apart)."""

    flusher_batch: int = field(default=2_000, metadata=int_range(1, 100_000))
    """ECU_FLUSHER_BATCH: entries the flusher reads per cycle, for one ledger transaction, spread
    over the outbox streams; streams with a backlog share it among themselves."""

    flusher_interval_ms: int = field(default=200, metadata=int_range(1, 60_000))
    """ECU_FLUSHER_INTERVAL_MS: pause between cycles when the outboxes are empty."""

    flusher_redis_timeout_ms: int = field(default=5_000, metadata=int_range(1, 60_000))
    """ECU_FLUSHER_REDIS_TIMEOUT_MS: bound on one of the flusher's outbox calls (a bulk read,
    claim or acknowledgement); past it the cycle fails as Redis unavailable and backs off."""

    flusher_claim_idle_ms: int = field(default=30_000, metadata=int_range(0, 3_600_000))
    """ECU_FLUSHER_CLAIM_IDLE_MS: entries pending this long with a silent flusher are claimed."""

    flusher_discovery_interval_ms: int = field(default=5_000, metadata=int_range(0, 3_600_000))
    """ECU_FLUSHER_DISCOVERY_INTERVAL_MS: how often outbox streams are rediscovered (SCAN)."""

    flusher_observe_interval_ms: int = field(default=10_000, metadata=int_range(10, 3_600_000))
    """ECU_FLUSHER_OBSERVE_INTERVAL_MS: how often the flusher reads the outboxes' length,
    pending entries and lag (the age of the oldest entry not acknowledged) from Redis for its
    gauges, deletes entries acknowledged but left in a stream, and removes dead consumers:
    on its own cadence, whether or not the ledger takes writes."""

    flusher_dead_consumer_ms: int = field(
        default=3_600_000, metadata=int_range(1_000, 30 * 86_400_000)
    )
    """ECU_FLUSHER_DEAD_CONSUMER_MS: a consumer of the outbox group with nothing pending and
    idle this long is removed (a flusher that died leaves one in every outbox). Removing a
    live one is harmless: it has nothing pending, and its next read creates it again."""

    flusher_stall_timeout_ms: int = field(default=600_000, metadata=int_range(1_000, 86_400_000))
    """ECU_FLUSHER_STALL_TIMEOUT_MS: ``/livez`` on ECU_METRICS_LISTEN answers 503 when no
    flusher cycle succeeded for this long (an empty cycle succeeds; one failing on Redis or
    the ledger, or hung, does not), so the chart's livenessProbe restarts a stuck flusher."""

    reconcile_interval_ms: int = field(default=30_000, metadata=int_range(0, 86_400_000))
    """ECU_RECONCILE_INTERVAL_MS: how often ledger and Redis balances are compared, each
    organization's Redis keys checked against each other, and organizations Redis lost (or
    whose keys no longer add up) rebuilt from the ledger."""

    reconcile_batch: int = field(default=2_000, metadata=int_range(1, 1_000_000))
    """ECU_RECONCILE_BATCH: organizations one reconciliation pass compares at most, taken
    round-robin after the last pass's, so every organization is visited within
    ceil(organizations / batch) passes (``ecu_reconcile_cycle_seconds`` says how long that
    took)."""

    snapshot_retention_days: int = field(default=90, metadata=int_range(0, 36_500))
    """ECU_SNAPSHOT_RETENTION_DAYS: balance snapshots (one per organization a day, and one per
    drift) older than this are deleted, a bounded batch each reconciliation pass; 0 keeps
    them all."""

    rebuild_fence_ms: int = field(default=10_000, metadata=int_range(100, 600_000))
    """ECU_REBUILD_FENCE_MS: when the flusher finds that Redis lost part of an organization's
    history (a failover or restart: see docs/reliability.md), the organization refuses
    changes (UNAVAILABLE, reason REBUILDING) for at most this long while its outbox drains
    into the ledger and it is rebuilt from there."""

    flusher_fault: str = field(default="", metadata={"kind": "str"})
    """ECU_FLUSHER_FAULT: test-only fault injection, `before_insert:N` or `after_commit:N`
    SIGKILLs the flusher at that point of its N-th batch. Never set in production."""

    admin_token: str = field(default="", metadata={"kind": "secret"})
    """ECU_ADMIN_TOKEN: bearer token for Grant/SetCap; empty disables the admin RPCs."""

    max_concurrent_rpcs: int = field(default=512, metadata=int_range(0, 100_000))
    """ECU_MAX_CONCURRENT_RPCS: calls the sidecar works on at once; one more is answered
    UNAVAILABLE OVERLOADED (retryable: nothing was done) instead of queueing without bound.
    0: unbounded."""

    shutdown_grace_s: float = field(default=10.0, metadata={"kind": "float", "lo": 0, "hi": 600})
    """ECU_SHUTDOWN_GRACE_S: how long shutdown waits for in-flight RPCs to finish."""

    shutdown_delay_s: float = field(default=20.0, metadata={"kind": "float", "lo": 0, "hi": 600})
    """ECU_SHUTDOWN_DELAY_S: on SIGTERM, after health turns NOT_SERVING, keep serving while a
    client (the worker) still holds a connection to the gRPC port, at most this long, so a
    worker finishing its step during pod termination can still commit, and calls already on
    the wire are answered, not cancelled. The pod's terminationGracePeriodSeconds must exceed
    this plus ECU_SHUTDOWN_GRACE_S."""

    metrics_listen: str = field(default="", metadata={"kind": "str"})
    """ECU_METRICS_LISTEN: host:port for Prometheus /metrics; empty disables it."""

    metrics_orgs: str = field(default="", metadata={"kind": "str"})
    """ECU_METRICS_ORGS: comma-separated organizations (at most 100) whose balance, held and
    available the flusher exports as gauges labelled ``organization``; empty: none (the
    default keeps organizations out of labels)."""

    log_level: str = field(
        default="INFO",
        metadata={"kind": "choice", "choices": ("DEBUG", "INFO", "WARNING", "ERROR")},
    )
    """ECU_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""

    log_format: str = field(
        default="text", metadata={"kind": "choice", "choices": ("text", "json")}
    )
    """ECU_LOG_FORMAT: text or json."""

    event_loop: str = field(
        default="auto", metadata={"kind": "choice", "choices": ("auto", "uvloop", "asyncio")}
    )
    """ECU_EVENT_LOOP: the event loop ``serve`` and ``flush`` run on: uvloop (installed with
    the package on Linux and macOS; ~10 % less CPU per RPC, docs/benchmarks.md), asyncio (the
    standard library's), or auto: uvloop where it is installed, asyncio otherwise."""

    @property
    def tls(self) -> bool:
        """Whether the gRPC server speaks TLS."""
        return bool(self.tls_cert_file)

    @property
    def allowed_org_set(self) -> frozenset[str]:
        """ECU_ALLOWED_ORGS as a set (empty: every organization is allowed)."""
        return (
            frozenset(o.strip() for o in self.allowed_orgs.split(",") if o.strip())
            if (self.allowed_orgs.strip())
            else frozenset()
        )

    @property
    def metrics_org_list(self) -> tuple[str, ...]:
        """ECU_METRICS_ORGS as a tuple, in the given order, without duplicates."""
        orgs = (o.strip() for o in self.metrics_orgs.split(","))
        return tuple(dict.fromkeys(o for o in orgs if o))

    @property
    def run_flusher_in_serve(self) -> bool:
        """Whether `serve` also runs the flusher."""
        if not self.ledger_url:
            return False
        return self.embedded if self.flusher_in_serve is None else self.flusher_in_serve

    @property
    def unix_socket(self) -> str:
        """The Unix socket path ECU_LISTEN names, or "" when it is host:port."""
        if not self.listen.startswith(UNIX_SCHEME):
            return ""
        return "/" + self.listen[len(UNIX_SCHEME) :].lstrip("/")

    @property
    def embedded(self) -> bool:
        """True when no Redis URL is configured: the in-process store is used."""
        return not self.redis_url

    @property
    def store_target(self) -> str:
        """The Redis this process uses, safe to show (``ecu_store_info``, alert labels): the
        URL without credentials or query, `` (cluster)`` appended for a Cluster; ``embedded``
        for the in-process store."""
        if self.embedded:
            return "embedded"
        scheme, _, rest = self.redis_url.partition("://")
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        rest = rest.rpartition("@")[2]
        return f"{scheme}://{rest}" + (" (cluster)" if self.redis_cluster else "")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ECU_* variables (and ECU_CONFIG_FILE) and validate them."""
        env = os.environ if environ is None else environ
        raw: dict[str, tuple[str, Any]] = {}
        path = env.get("ECU_CONFIG_FILE", "")
        if path:
            for key, value in read_file(path).items():
                raw[key] = (f"{path}: {key}", value)
        for f in dataclasses.fields(cls):
            var = "ECU_" + f.name.upper()
            if var in env:
                raw[f.name] = (var, env[var])
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, tuple[str, Any]]) -> Settings:
        """Build from {field: (where it came from, value)}; values may be strings."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, (origin, value) in raw.items():
            if name not in known:
                raise SettingsError(f"{origin}: unknown setting")
            values[name] = coerce(origin, known[name].metadata, value)
        settings = cls(**values)
        settings._check()
        return settings

    def _check_unix_socket(self) -> None:
        if not self.listen.startswith(UNIX_SCHEME + "//"):
            raise SettingsError(
                f"ECU_LISTEN: a Unix socket is unix:///absolute/path, got {self.listen!r}"
            )
        parent = os.path.dirname(self.unix_socket)
        if not os.path.isdir(parent):
            raise SettingsError(f"ECU_LISTEN: the socket's directory {parent} does not exist")
        mode = self.unix_socket_mode
        if not (3 <= len(mode) <= 4 and all(c in "01234567" for c in mode)):
            raise SettingsError(f"ECU_UNIX_SOCKET_MODE: an octal mode like 0660, got {mode!r}")

    def _check(self) -> None:
        for var, ttl, top, most in (
            ("ECU_DEFAULT_TTL_MS", self.default_ttl_ms, "ECU_MAX_TTL_MS", self.max_ttl_ms),
            ("ECU_JOB_TTL_MS", self.job_ttl_ms, "ECU_JOB_MAX_TTL_MS", self.job_max_ttl_ms),
        ):
            if not self.min_ttl_ms <= ttl <= most:
                raise SettingsError(
                    f"{var}: must lie between ECU_MIN_TTL_MS ({self.min_ttl_ms}) and {top} "
                    f"({most}), got {ttl}"
                )
        if self.listen.startswith(UNIX_SCHEME):
            self._check_unix_socket()
        elif not is_loopback(split_hostport("ECU_LISTEN", self.listen)[0]) and not self.tls:
            raise SettingsError(
                f"ECU_LISTEN: {self.listen} is not a loopback address; listening beyond this host "
                "requires TLS (set ECU_TLS_CERT_FILE and ECU_TLS_KEY_FILE)"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("ECU_TLS_CERT_FILE and ECU_TLS_KEY_FILE: set both or neither")
        if self.tls_client_ca_file and not self.tls:
            raise SettingsError("ECU_TLS_CLIENT_CA_FILE: mutual TLS needs ECU_TLS_CERT_FILE too")
        for var, path in (
            ("ECU_TLS_CERT_FILE", self.tls_cert_file),
            ("ECU_TLS_KEY_FILE", self.tls_key_file),
            ("ECU_TLS_CLIENT_CA_FILE", self.tls_client_ca_file),
        ):
            if path and not os.path.isfile(path):
                raise SettingsError(f"{var}: no such file: {path}")
        if self.health_listen:
            split_hostport("ECU_HEALTH_LISTEN", self.health_listen)
        if self.degraded_allowance_uecu and not self.degraded_journal:
            raise SettingsError(
                "ECU_DEGRADED_JOURNAL: required when ECU_DEGRADED_ALLOWANCE_UECU is set "
                "(local grants must survive a crash)"
            )
        for org in self.allowed_org_set:
            if not org or len(org) > 64 or not all(c.isalnum() or c in "._-" for c in org):
                raise SettingsError(
                    f"ECU_ALLOWED_ORGS: {org!r} is not an organization id ([A-Za-z0-9._-], 1-64)"
                )
        if self.metrics_listen:
            split_hostport("ECU_METRICS_LISTEN", self.metrics_listen)
        if len(self.metrics_org_list) > _MAX_METRICS_ORGS:
            raise SettingsError(
                f"ECU_METRICS_ORGS: at most {_MAX_METRICS_ORGS} organizations, "
                f"got {len(self.metrics_org_list)}"
            )
        for org in self.metrics_org_list:
            if len(org) > 64 or not all(c.isalnum() or c in "._-" for c in org):
                raise SettingsError(
                    f"ECU_METRICS_ORGS: {org!r} is not an organization id ([A-Za-z0-9._-], 1-64)"
                )
        if not self.key_prefix or not self.key_prefix.replace("-", "").replace("_", "").isalnum():
            raise SettingsError(
                f"ECU_KEY_PREFIX: must be 1 or more of [A-Za-z0-9_-], got {self.key_prefix!r}"
            )
        if self.ledger_url and not self.ledger_url.startswith(
            ("postgresql://", "postgres://", "sqlite://")
        ):
            raise SettingsError(
                "ECU_LEDGER_URL: must start with postgresql://, postgres:// or sqlite://"
            )
        if self.flusher_fault and self.flusher_fault.partition(":")[0] not in (
            "before_insert",
            "after_commit",
        ):
            raise SettingsError(
                "ECU_FLUSHER_FAULT: must be before_insert[:N] or after_commit[:N], "
                f"got {self.flusher_fault!r}"
            )
        if 0 < self.outbox_max_len < _MIN_OUTBOX_MAX_LEN:
            raise SettingsError(
                f"ECU_OUTBOX_MAX_LEN: 0 (no bound) or at least {_MIN_OUTBOX_MAX_LEN} (trimming "
                f"drops whole stream nodes of up to 100 events), got {self.outbox_max_len}"
            )
        if self.redis_cluster and not self.redis_url:
            raise SettingsError("ECU_REDIS_CLUSTER: set, but ECU_REDIS_URL is empty")
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_timeout_ms:
            raise SettingsError(
                "ECU_REDIS_WAIT_TIMEOUT_MS: must be below ECU_REDIS_TIMEOUT_MS "
                f"({self.redis_timeout_ms}), got {self.redis_wait_timeout_ms}"
            )
        if self.redis_wait_replicas and self.embedded:
            raise SettingsError(
                "ECU_REDIS_WAIT_REPLICAS: the embedded store has no replicas; set ECU_REDIS_URL"
            )
        if self.redis_url.startswith(SENTINEL_SCHEME):
            if self.redis_cluster:
                raise SettingsError(
                    "ECU_REDIS_CLUSTER: a Sentinel URL names a standalone primary, not a Cluster"
                )
            parse_sentinel_url(self.redis_url)


def describe(settings: Settings) -> dict[str, Any]:
    """The settings as a dict for logs and check-config, with secrets and URL passwords masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata["kind"] == "secret":
            value = "(set)" if value else "(not set)"
        elif f.metadata["kind"] in ("url", "dsn") and value:
            value = mask_url(value)
        out["ECU_" + f.name.upper()] = value
    return out
