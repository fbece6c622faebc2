"""Value types shared by the engine, the store adapter and the gRPC edge.

Every amount is an integer number of micro-ECU (1 ECU = 1,000,000 µECU). Every type is a
frozen value (``dataclasses.replace`` makes a changed copy).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_GRANTED_UECU",
    "MAX_REQUEST_UECU",
    "UECU_PER_ECU",
    "AccountRef",
    "Balance",
    "CommitBatchOutcome",
    "CommitItem",
    "CommitOutcome",
    "ExtendOutcome",
    "GrantKind",
    "GrantOutcome",
    "HoldState",
    "HoldView",
    "JobType",
    "LedgerAccount",
    "LedgerBalance",
    "LedgerHold",
    "Reconciled",
    "ReleaseOutcome",
    "ReserveItem",
    "ReserveOutcome",
    "ScopeUsage",
    "SweepOutcome",
    "Usage",
]

UECU_PER_ECU = 1_000_000
#: The largest amount one request may move (a hold, a batch's total, a commit, a grant):
#: 10^15 µECU = 10^9 ECU. Far below 2^53 so sums in Lua doubles stay exact.
MAX_REQUEST_UECU = 10**15
#: The largest total an account may ever be granted (2^52 µECU ≈ 4.5·10^9 ECU).
MAX_GRANTED_UECU = 2**52


class JobType(enum.StrEnum):
    """The billable step a hold pays for."""

    INFERENCE = "inference"
    JUDGE = "judge"
    GEPA = "gepa"
    TRACE_EVAL = "trace_eval"
    ENGINE = "engine"

    @property
    def wire_name(self) -> str:
        """The protobuf and JSON spelling (JOB_TYPE_INFERENCE), which error messages use."""
        return f"JOB_TYPE_{self.name}"


class HoldState(enum.StrEnum):
    """Life-cycle state of a hold; the values are the one-letter codes the scripts store."""

    ACTIVE = "A"
    COMMITTED = "C"
    RELEASED = "R"
    EXPIRED = "E"


class GrantKind(enum.StrEnum):
    """Why an organization was credited."""

    STARTER = "starter"
    TOP_UP = "top_up"
    AUTO_TOP_UP = "auto_top_up"
    ENTERPRISE = "enterprise"
    ADJUSTMENT = "adjustment"

    @property
    def wire_name(self) -> str:
        """The protobuf and JSON spelling (GRANT_KIND_TOP_UP), which error messages use."""
        return f"GRANT_KIND_{self.name}"


@dataclass(frozen=True, slots=True)
class AccountRef:
    """Who pays: the organization wallet and the optional team/project caps."""

    organization: str
    team: str = ""
    project: str = ""
    user: str = ""
    """Recorded for attribution only; users have no caps."""


@dataclass(frozen=True, slots=True)
class ReserveItem:
    """One step to hold: its caller-chosen id, worst-case amount and attribution."""

    reservation_id: str
    amount_uecu: int
    job_type: JobType
    model: str = ""
    ttl_ms: int = 0
    """Hold lifetime; 0 means ECU_DEFAULT_TTL_MS (written in when the hold is placed, so the
    hold records the TTL it got: a replay naming that TTL is the same request)."""
    rate_card_version: str = ""
    """The rate card that priced the amount from a job spec ('' for a caller's amount)."""
    fingerprint: str = ""
    """Digest of the job spec that was priced: what a replay is compared by."""
    job: Any = None
    """A job spec (ecu_sidecar.pricing.JobSpec) to price instead of amount_uecu."""


@dataclass(frozen=True, slots=True)
class Usage:
    """What a step consumed, recorded with its commit."""

    tokens_in: int = 0
    tokens_out: int = 0
    calls: int = 0


@dataclass(frozen=True, slots=True)
class CommitItem:
    """One hold to settle with its actual cost."""

    reservation_id: str
    actual_uecu: int
    usage: Usage = field(default_factory=Usage)
    rate_card_version: str = ""
    """The rate card that priced actual from usage lines ('' for a caller's amount)."""
    breakdown: str = ""
    """The priced lines as compact JSON, recorded on the outbox event for the ledger."""
    usage_lines: Any = None
    """Usage (ecu_sidecar.pricing.UsageLine list) to price, with rate_card_version, instead
    of actual_uecu."""


@dataclass(frozen=True, slots=True)
class HoldView:
    """A hold as a reserve answer reports it."""

    reservation_id: str
    amount_uecu: int
    deadline_unix_ms: int
    state: HoldState
    rate_card_version: str = ""
    """The rate card version the hold was priced with ('' for a caller's amount)."""


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """The answer to a (batch) reservation."""

    holds: list[HoldView]
    available_uecu: int
    replayed: bool
    quotes: list[Any] = field(default_factory=list)
    """Per item, the pricing Quote of a job-spec item (None for a caller's amount)."""
    degraded: bool = False
    """Granted locally while Redis was unreachable (ecu_sidecar.engine.degraded)."""
    job_room_uecu: int | None = None
    """Steps of an approved job: the job's room left after them."""


@dataclass(frozen=True, slots=True)
class KnownHold:
    """A hold the caller knows of that Redis may lack: what the ledger recorded of a
    reservation (kind ``late``), or a hold degraded mode granted locally (kind ``degraded``).
    The commit script bills it only when Redis has no record of the id (docs/architecture.md,
    "A commit needs a hold")."""

    amount_uecu: int
    t0_ms: int
    """When the hold was made: its commit's event id is commit:<rid>:<t0>, as it always was."""
    kind: str = "late"
    """``late``: billed as a late commit (bounded by what is available now plus the bound);
    ``degraded``: billed up to the hold plus the bound, flagged orphan."""
    team: str = ""
    project: str = ""
    user: str = ""
    job_type: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class LedgerReservation:
    """What the ledger recorded of one reservation id (its latest hold), for a commit that
    finds no record in Redis (lost with Redis, or its tombstone purged)."""

    reservation_id: str
    state: str
    """``active`` (reserved, no terminal event), ``committed``, ``released`` or ``expired``."""
    hold: KnownHold
    actual_uecu: int = 0
    """Committed: the actual the commit reported, and its usage and outcome (for replays)."""
    usage: Usage = field(default_factory=Usage)
    outcome: CommitOutcome | None = None


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """The answer to one commit; ``error`` is set instead when a batch item failed."""

    reservation_id: str
    committed_uecu: int = 0
    released_uecu: int = 0
    overage_uecu: int = 0
    unbilled_overage_uecu: int = 0
    late: bool = False
    replayed: bool = False
    available_uecu: int = 0
    error: Exception | None = None
    quote: Any = None
    """The pricing Quote when actual was priced from usage lines."""
    degraded: bool = False
    """Journaled locally while Redis was unreachable; billed when it returns."""


@dataclass(frozen=True, slots=True)
class CommitBatchOutcome:
    """The answer to a batch of commits: one outcome per item, and the balance after them."""

    outcomes: list[CommitOutcome]
    available_uecu: int


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    """The answer to a release."""

    reservation_id: str
    released_uecu: int
    state: HoldState
    available_uecu: int
    replayed: bool
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class SweepOutcome:
    """What one sweep of an organization did, and when the next one has work."""

    expired: int
    """Holds expired by this sweep."""
    waiting: int
    """Overdue holds and job deadline index entries still waiting (more than one sweep's limit
    were due)."""
    next_due_ms: int | None
    """Milliseconds until the next hold deadline, grant expiry or job deadline index entry (an
    open job's abandonment, an ended job's purge) falls due (None: none)."""


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reconciliation of an organization found."""

    drift_uecu: int | None
    """Redis − ledger balance before the repair (0: in agreement); None when the check was
    skipped (events in flight) or keys were found lost."""
    key_loss: str = ""
    """Why the organization's keys do not add up ('' when they do): held against its holds,
    the deadline index, the grant-expiry index or the grants hash. Repaired by a forced
    rebuild from the ledger, never by a balance repair."""


@dataclass(frozen=True, slots=True)
class ExtendOutcome:
    """The answer to an extend."""

    reservation_id: str
    deadline_unix_ms: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    """The answer to a grant."""

    grant_id: str
    balance_uecu: int
    available_uecu: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class ScopeUsage:
    """A team's or project's usage under its optional cap."""

    id: str
    cap_uecu: int | None
    held_uecu: int
    used_uecu: int

    @property
    def available_uecu(self) -> int:
        """Room left under the cap (0 when uncapped)."""
        if self.cap_uecu is None:
            return 0
        return self.cap_uecu - self.held_uecu - self.used_uecu


@dataclass(frozen=True, slots=True)
class LedgerHold:
    """A hold the ledger records as outstanding (reserved, with no release, expiry or commit of
    that reservation id and creation time): a rebuild restores it as an ACTIVE hold."""

    reservation_id: str
    amount_uecu: int
    t0_ms: int
    """Redis time the hold was created (the suffix of its reserve event id): part of every
    later event id of the hold, so its commit, release or expiry is new to the ledger."""
    deadline_ms: int
    """The latest deadline the ledger recorded (reserve, then extends)."""
    ttl_ms: int
    """The hold's own TTL (reserve deadline − t0), what an extend of ttl 0 applies."""
    sequence: int = 0
    """The last extend sequence applied (0: never extended)."""
    team: str = ""
    project: str = ""
    user: str = ""
    job_type: str = ""
    model: str = ""
    rate_card_version: str = ""
    """The rate card version the hold was priced with ('' for a caller's amount)."""
    job_id: str = ""
    """The approved job it is a step of ('' for a wallet hold)."""


@dataclass(frozen=True, slots=True)
class LedgerBalance:
    """What reconciliation compares of an organization (a cheap read of many at once): its
    ledger balance, equal to ``LedgerAccount.balance_uecu``, and whether it has ledger-first
    grants Redis has not confirmed (then the full LedgerAccount is read to finish them); and
    whether a balance snapshot is due (none taken within the last day); its open jobs."""

    balance_uecu: int
    unconfirmed_grants: bool
    snapshot_due: bool = False
    open_jobs: int = 0
    """Approved jobs the ledger records as open: Redis must hold as many (a job record lost
    with nothing held by it shows only so)."""


@dataclass(frozen=True, slots=True)
class LedgerAccount:
    """What the ledger knows of one organization: enough to rebuild its Redis state."""

    organization: str
    granted_uecu: int
    """Granted and confirmed by Redis (see unconfirmed_grants)."""
    expired_grants_uecu: int
    committed_uecu: int
    generation: int
    """Number of grants so far (numbers the low-balance notification crossings)."""
    scopes: list[tuple[str, str, int | None, int]]
    """('team' | 'project', id, cap or None, used)."""
    expiring_grants: list[tuple[str, int, int]]
    """(grant id, expiry ms, unspent rest) of unexpired expiring grants."""
    auto_topup_threshold_uecu: int | None = None
    auto_topup_amount_uecu: int = 0
    recent_grants: list[tuple[str, int, str, int]] = field(default_factory=list)
    """(grant id, amount, kind, expires at ms) of the latest grants (at most 1,000), so that a
    retried grant is recognized after the rebuild."""
    unconfirmed_grants: list[tuple[str, int, str, int]] = field(default_factory=list)
    """Grants written ledger-first whose Redis side has not been seen yet (no outbox event):
    (grant id, amount, kind, expires at ms). They are NOT in granted_uecu or the balance."""
    active_holds: list[LedgerHold] = field(default_factory=list)
    """Holds outstanding in the ledger, oldest first: the rebuild restores them (the worker was
    told it holds that money), so held, the hold counters and the caps' held add up."""
    notified: list[str] = field(default_factory=list)
    """Notification kinds (low_balance_20, low_balance_5, auto_topup_requested) the ledger
    already recorded for the current generation: the rebuild sets their flags, so that they
    are not sent again (a second event under the same id would be quarantined)."""
    jobs: list[Any] = field(default_factory=list)
    """Jobs to restore (ecu_sidecar.jobs.JobView): the open ones, with their room as the ledger
    derives it, and those ended within the tombstone retention (a replayed close)."""
    job_accuracy: list[Any] = field(default_factory=list)
    """The accuracy of its latest closed jobs per job type (ecu_sidecar.jobs.JobAccuracy), for
    Preview's expected cost."""
    notice_reference_uecu: int | None = None
    """The reference level those notifications recorded (the available balance after the
    latest grant), when the ledger has one: the rebuild keeps it so that the 5 % threshold
    falls where it fell before the loss."""

    @property
    def balance_uecu(self) -> int:
        """granted − expired grants − committed."""
        return self.granted_uecu - self.expired_grants_uecu - self.committed_uecu


@dataclass(frozen=True, slots=True)
class Balance:
    """An organization's wallet and hold counters (see docs/architecture.md, conservation)."""

    organization: str
    granted_uecu: int
    balance_uecu: int
    held_uecu: int
    committed_uecu: int
    reserved_uecu: int
    committed_from_holds_uecu: int
    released_uecu: int
    expired_uecu: int
    overage_uecu: int
    unbilled_overage_uecu: int
    late_committed_uecu: int
    outstanding_holds: int
    expired_holds: int
    teams: list[ScopeUsage]
    projects: list[ScopeUsage]
    expired_grants_uecu: int = 0
    """Unspent rests of expired grants, gone from the balance."""
    orphan_committed_uecu: int = 0
    """Commits of holds Redis lost (after a rebuild from the ledger), billed at the actual."""
    carried_committed_uecu: int = 0
    """Committed total carried over when the account was rebuilt from the ledger."""
    late_unbilled_uecu: int = 0
    """What late commits used beyond what was available (plus their bound): recorded, not
    billed, because their hold's money had been lent again after it expired."""
    repaired_uecu: int = 0
    """Sum of reconciliation corrections (ledger minus Redis) applied to the balance; drift only
    a fault outside the scripts (lost writes, manual edits) can cause."""
    auto_topup_threshold_uecu: int | None = None
    auto_topup_amount_uecu: int = 0
    job_accuracy: dict[str, Any] = field(default_factory=dict)
    """Job type -> the accuracy of the organization's closed jobs of that type
    (ecu_sidecar.jobs.JobAccuracy), for Preview's expected cost."""

    @property
    def available_uecu(self) -> int:
        """What new reservations may still take: balance − held."""
        return self.balance_uecu - self.held_uecu

    def conservation_faults(self) -> list[str]:
        """The conservation identities (docs/architecture.md) this balance breaks; [] when it
        keeps them all. The one definition the product's checks and the tests share."""
        faults = []
        wallet = self.granted_uecu - self.expired_grants_uecu - self.committed_uecu
        if self.balance_uecu != wallet + self.repaired_uecu:
            faults.append(
                f"balance {self.balance_uecu} != granted {self.granted_uecu} - expired grants "
                f"{self.expired_grants_uecu} - committed {self.committed_uecu} + repaired "
                f"{self.repaired_uecu}"
            )
        billed = (
            self.carried_committed_uecu
            + self.committed_from_holds_uecu
            + self.overage_uecu
            + self.late_committed_uecu
            + self.orphan_committed_uecu
        )
        if self.committed_uecu != billed:
            faults.append(
                f"committed {self.committed_uecu} != carried + from holds + overage + late + "
                f"orphan = {billed}"
            )
        settled = (
            self.committed_from_holds_uecu + self.released_uecu + self.expired_uecu + self.held_uecu
        )
        if self.reserved_uecu != settled:
            faults.append(
                f"reserved {self.reserved_uecu} != committed from holds + released + expired + "
                f"held = {settled}"
            )
        return faults
