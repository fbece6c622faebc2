"""Approved jobs above the store (docs/jobs.md): approving a preview, reading, heartbeating and
closing a job, and the rate card version its steps are priced with.

An approval is checked against the current rate card before anything is held: its job spec is
priced again, a quote priced with a version that is no longer current is refused with the new
total (QuoteStale, a re-quote to show the user), and a total that is not the spec's is refused
(QuoteMismatch). A job needs Redis: nothing here is ever decided in degraded mode.

A job is pinned to the version its approval was priced with, and a step given a job spec must
be priced with that version. The engine prices optimistically with the version learned for the
job earlier (a small bounded memory) or else the current one; the store refuses a step priced
with another (RATE_CARD_MISMATCH naming the job's version), and the engine prices it again with
that version once. A sidecar that approved the job, or already priced one of its steps, so
reserves in one round trip; after a reload, or on another sidecar, the first step takes two.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

from ecu_sidecar.errors import JobNotFound, QuoteMismatch, QuoteStale, RateCardMismatch
from ecu_sidecar.jobs import JobApproval, JobView
from ecu_sidecar.model import AccountRef, JobType
from ecu_sidecar.pricing import GepaSpec, InferenceSpec, JobSpec, JudgeSpec, TraceEvalSpec
from ecu_sidecar.validation import CALLER_ID_MAX, check_account, check_approval, check_id, check_org

if TYPE_CHECKING:
    from ecu_sidecar.engine.engine import QuotaEngine

__all__ = ["JOB_OPS", "PINS_MAX", "JobDesk", "job_type_of"]

#: What ``JobDesk.run`` does to a job: read it, heartbeat it, close it (store/lua/job.lua).
JOB_OPS = frozenset({"get", "touch", "close"})
#: Jobs whose pinned rate card version a sidecar remembers (least recently used dropped first).
PINS_MAX = 4_096

_JOB_TYPE_OF_ITEM = {
    InferenceSpec: JobType.INFERENCE,
    JudgeSpec: JobType.JUDGE,
    GepaSpec: JobType.GEPA,
    TraceEvalSpec: JobType.TRACE_EVAL,
}


def job_type_of(job: JobSpec) -> JobType:
    """The job type a job spec names: its first item's kind (engine work when it has none)."""
    first = job[0] if job else None
    return _JOB_TYPE_OF_ITEM.get(type(first), JobType.ENGINE)


class JobDesk:
    """Approve, read, heartbeat and close the jobs of the engine's store, and remember which
    rate card version each job's steps are priced with."""

    def __init__(self, engine: QuotaEngine) -> None:
        self.engine = engine
        self._pins: OrderedDict[tuple[str, str], str] = OrderedDict()
        """(organization, job id) -> the rate card version the job is pinned to."""

    # -- pinned versions ------------------------------------------------------------------------

    def pinned(self, org: str, job_id: str) -> str | None:
        """The version to price ``job_id``'s steps with, when this sidecar learned it (None:
        the current card)."""
        version = self._pins.get((org, job_id)) if job_id else None
        if version is not None:
            self._pins.move_to_end((org, job_id))
        return version

    def _learn(self, org: str, job_id: str, version: str) -> None:
        self._pins[(org, job_id)] = version
        self._pins.move_to_end((org, job_id))
        if len(self._pins) > PINS_MAX:
            self._pins.popitem(last=False)

    def repin(self, org: str, job_id: str, error: RateCardMismatch, priced: bool) -> str:
        """The version to price the steps of ``job_id`` with again, after the store refused
        them as priced with another (``error``); raises ``error`` when pricing again cannot
        help (no step was priced from a job spec here, or the mismatch is not the job's)."""
        version = error.metadata.get("rate_card_version", "")
        if not priced or not job_id or error.metadata.get("job_id") != job_id:
            raise error
        if not version:
            raise RateCardMismatch(
                f"job {job_id} was approved for a plain amount, priced by no rate card: its "
                "steps give amount_uecu, not a job spec",
                rate_card_version="",
                job_id=job_id,
            )
        self._learn(org, job_id, version)
        return version

    # -- operations -----------------------------------------------------------------------------

    async def approve(self, account: AccountRef, approval: JobApproval) -> JobView:
        """Open a job holding the approved amount against the wallet and the account's caps,
        all or nothing; the same approval again answers the job as it stands (a replay).

        With a job spec, the spec is priced with the current rate card first: a quote of
        another version is QuoteStale (unknown to this sidecar: UnknownRateCardVersion), a
        total that is not the spec's QuoteMismatch, and nothing is held. An approval retried
        after a reload is still answered as its replay when the job exists."""
        engine = self.engine
        settings = engine.settings
        check_account(account, settings.allowed_org_set)
        check_approval(approval, settings.min_ttl_ms, settings.job_max_ttl_ms)
        org, job_id = account.organization, approval.job_id
        if approval.spec is not None:
            quote = await engine.price_job(org, approval.spec, "job")
            if approval.job_type is None:
                approval = replace(approval, job_type=job_type_of(approval.spec))
            version = approval.rate_card_version
            if version != quote.rate_card_version:
                if not await self._exists(org, job_id):
                    engine.card(version)  # UnknownRateCardVersion when not loaded here
                    raise QuoteStale(
                        f"the quote was priced with rate card version '{version}', which is no "
                        f"longer current: under '{quote.rate_card_version}' the job costs "
                        f"{quote.total_uecu} uECU; nothing was held (approve the new total)",
                        job_id=job_id,
                        approved_version=version,
                        rate_card_version=quote.rate_card_version,
                        total_uecu=quote.total_uecu,
                    )
            elif quote.total_uecu != approval.amount_uecu:
                raise QuoteMismatch(
                    f"approved_total_uecu {approval.amount_uecu} is not what the job costs "
                    f"under rate card version '{version}': {quote.total_uecu} uECU",
                    job_id=job_id,
                    approved_total_uecu=approval.amount_uecu,
                    total_uecu=quote.total_uecu,
                    rate_card_version=version,
                )
        ttl = approval.ttl_ms or settings.job_ttl_ms
        pct = settings.overage_max_percent
        view = await engine.hydrator.hydrating(
            org,
            lambda: engine.store.approve_job(
                account, approval, ttl_ms=ttl, overage_max_percent=pct
            ),
        )
        if view.rate_card_version:
            self._learn(org, job_id, view.rate_card_version)
        engine.sweeps.seen(org, view.ttl_ms)
        return view

    async def run(self, org: str, job_id: str, op: str) -> JobView:
        """``get`` a job, ``touch`` it (a heartbeat: another ttl) or ``close`` it (its room and
        its steps still held return to the wallet; closing an ended job is a replay)."""
        if op not in JOB_OPS:
            raise ValueError(f"op must be one of {', '.join(sorted(JOB_OPS))}, got {op!r}")
        engine = self.engine
        check_org("organization", org, engine.settings.allowed_org_set)
        check_id("job_id", job_id, CALLER_ID_MAX)
        view = await engine.hydrator.hydrating(org, lambda: engine.store.job(org, job_id, op))
        if view.rate_card_version:
            self._learn(org, job_id, view.rate_card_version)
        engine.sweeps.seen(org, view.ttl_ms if op == "touch" else None)
        return view

    async def _exists(self, org: str, job_id: str) -> bool:
        engine = self.engine
        try:
            await engine.hydrator.hydrating(org, lambda: engine.store.job(org, job_id, "get"))
        except JobNotFound:
            return False
        return True
