"""Value types of approved jobs (docs/jobs.md): the user approves a preview once, and every step
of the run draws from that approval instead of the wallet.

Every amount is integer micro-ECU. The store keeps the job (store/lua/job.lua); the ledger
records its life cycle and every step's job id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ecu_sidecar.model import JobType

__all__ = ["ACCURACY_WINDOW", "JobAccuracy", "JobApproval", "JobPolicy", "JobState", "JobView"]


#: Closed jobs per job type Preview's expected cost rests on: the latest 100 to 200 in Redis
#: (halved at 200, store/lua/_lib.lua learn_accuracy), the latest 100 after a rebuild.
ACCURACY_WINDOW = 100


class JobPolicy(enum.StrEnum):
    """What a step that needs more than the job's remaining room gets."""

    REFUSE = "refuse"
    """Refused (INSUFFICIENT_ECU, scope job): the job never bills more than its approval."""
    WALLET = "wallet"
    """The rest is drawn from the wallet like a hold, up to the overage bound of the approval
    (ECU_OVERAGE_MAX_PERCENT) in all; a commit's overage beyond the room is billed likewise."""

    @property
    def wire_name(self) -> str:
        return f"JOB_POLICY_{self.name}"


class JobState(enum.StrEnum):
    """A job's life cycle; the values are the one-letter codes the scripts store."""

    OPEN = "O"
    CLOSED = "C"
    """Closed by its owner: its room and its steps still held went back to the wallet."""
    ABANDONED = "X"
    """No step and no heartbeat for its ttl: ended by the sweep, its steps expired."""

    @property
    def word(self) -> str:
        """The state as a caller reads it (``open``, ``closed``, ``abandoned``): in the details
        of a refusal and in the ledger's jobs rows, never the scripts' letter."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class JobApproval:
    """What the user approved: a preview's total, pinned to the rate card version that priced
    it (or a plain amount the caller priced, with no version)."""

    job_id: str
    amount_uecu: int
    job_type: JobType
    policy: JobPolicy = JobPolicy.REFUSE
    ttl_ms: int = 0
    """Abandonment ttl: with no step and no heartbeat for this long the job ends by itself;
    0 takes ECU_JOB_TTL_MS."""
    rate_card_version: str = ""
    """The version that priced the preview ('' for a plain amount)."""
    fingerprint: str = ""
    """Digest of the previewed job spec: a replayed approval is compared by it."""
    spec: Any = None
    """The previewed job spec (ecu_sidecar.pricing.JobSpec), priced again to check the quote."""


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the store (or the ledger, for a rebuild) reports it."""

    job_id: str
    state: JobState
    approved_uecu: int
    extra_uecu: int
    """Drawn from the wallet beyond the approval (policy wallet)."""
    extra_max_uecu: int
    room_uecu: int
    """Approved money no step holds: what new steps can still draw (0 once ended)."""
    steps_held_uecu: int
    committed_uecu: int
    """What its steps billed."""
    steps: int
    steps_committed: int
    steps_ended: int
    """Steps released or expired unbilled."""
    policy: JobPolicy
    team: str
    project: str
    user: str
    job_type: str
    rate_card_version: str
    ttl_ms: int
    deadline_unix_ms: int
    opened_at_ms: int
    ended_at_ms: int
    returned_uecu: int
    """What ending it returned to the wallet (room + its steps still held then)."""
    available_uecu: int = 0
    """The organization's available balance with this answer."""
    replayed: bool = False

    @property
    def drawn_uecu(self) -> int:
        """What its steps took so far: billed plus still held."""
        return self.committed_uecu + self.steps_held_uecu

    @property
    def accuracy(self) -> float | None:
        """committed ÷ approved (None before any approval money): how pessimistic the preview
        was. A ratio for metrics only, never money."""
        return self.committed_uecu / self.approved_uecu if self.approved_uecu else None


@dataclass(frozen=True, slots=True)
class JobAccuracy:
    """How pessimistic the previews of an organization's closed jobs of one type were: what
    those jobs committed against what they approved (the latest ACCURACY_WINDOW or so)."""

    job_type: str
    jobs: int
    committed_uecu: int
    approved_uecu: int

    def expected_uecu(self, worst_case_uecu: int) -> int:
        """The worst case scaled by committed ÷ approved, rounded up: integer µECU."""
        if not self.approved_uecu:
            return worst_case_uecu
        return -(-worst_case_uecu * self.committed_uecu // self.approved_uecu)
