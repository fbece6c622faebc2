"""Each RPC's response converted to the model's types, and the outcomes only the client has
(``PreviewOutcome``, ``RateCardInfo``).

A converter is what a ``Call`` (``requests``) applies to the response message: one per RPC,
named after what it returns. A unit or job type newer than this client is kept as the sidecar
named it; a refused item of a batch carries its ``QuotaError``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.client.errors import error_for
from ecu_sidecar.convert import balance_from_pb, job_view_from_pb, scope_from_pb
from ecu_sidecar.jobs import JobView
from ecu_sidecar.model import (
    Balance,
    CommitOutcome,
    ExtendOutcome,
    GrantOutcome,
    HoldState,
    HoldView,
    JobType,
    ReleaseOutcome,
    ReserveOutcome,
    ScopeUsage,
)
from ecu_sidecar.pricing import Fees, Line, ModelRates, Quote, Unit

__all__ = [
    "JOB_TYPES",
    "ExpectedCost",
    "PreviewOutcome",
    "RateCardInfo",
    "balance",
    "commit_batch_outcomes",
    "commit_outcome",
    "extend_outcome",
    "grant_outcome",
    "job_step_outcome",
    "job_steps_outcome",
    "job_view",
    "nothing",
    "preview_outcome",
    "rate_card_info",
    "release_outcome",
    "reserve_batch_outcome",
    "reserve_outcome",
    "scope_usage",
]


@dataclass(frozen=True, slots=True)
class ExpectedCost:
    """What a previewed job is expected to cost: the worst case scaled by what the
    organization's latest closed jobs of its type committed against what they approved. An
    estimate to show beside the worst case, never held or billed."""

    total_uecu: int
    jobs: int
    """The closed jobs it rests on."""
    committed_uecu: int
    approved_uecu: int
    job_type: JobType | None


@dataclass(frozen=True, slots=True)
class PreviewOutcome:
    """A job's worst case as the sidecar priced it, and whether the balance covers it."""

    quote: Quote
    """The worst-case total, its itemized lines and the rate card version."""
    covered: bool
    """Whether the organization's available balance covers the total."""
    available_uecu: int
    """The organization's available balance (0 when it has no account)."""
    available_after_uecu: int
    """available - total: negative when not covered."""
    expected: ExpectedCost | None = None
    """None until a job of its type has closed in the organization: the worst case is all
    there is then."""


@dataclass(frozen=True, slots=True)
class RateCardInfo:
    """The rate card a sidecar prices with (GetRateCard)."""

    version: str
    fees: Fees
    """The card's fees; ``byok_engine_call_uecu`` is what a BYOK call pays (never None here)."""
    models: list[ModelRates]
    """Every model with its rates, sorted by name."""
    organizations_with_terms: list[str]
    """Organizations with negotiated terms (ids only)."""
    versions: list[str]
    """Every version the sidecar can still price commits with."""


# -- the enums on the wire ---------------------------------------------------------------------

#: JobType → its wire number (requests send it; quote lines name it).
JOB_TYPES = {
    JobType.INFERENCE: pb.JOB_TYPE_INFERENCE,
    JobType.JUDGE: pb.JOB_TYPE_JUDGE,
    JobType.GEPA: pb.JOB_TYPE_GEPA,
    JobType.TRACE_EVAL: pb.JOB_TYPE_TRACE_EVAL,
    JobType.ENGINE: pb.JOB_TYPE_ENGINE,
}
_JOB_TYPES_BACK = {number: member for member, number in JOB_TYPES.items()}
_HOLD_STATES = {
    pb.HOLD_STATE_ACTIVE: HoldState.ACTIVE,
    pb.HOLD_STATE_COMMITTED: HoldState.COMMITTED,
    pb.HOLD_STATE_RELEASED: HoldState.RELEASED,
    pb.HOLD_STATE_EXPIRED: HoldState.EXPIRED,
}
_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


# -- values out: responses as the model's types ------------------------------------------------


def _unit(text: str) -> Unit | str:
    try:
        return Unit(text)
    except ValueError:  # a unit newer than this client: kept as the sidecar named it
        return text


def _quote(q: pb.Quote) -> Quote:
    return Quote(
        total_uecu=q.total_uecu,
        rate_card_version=q.rate_card_version,
        lines=tuple(
            Line(
                description=x.description,
                quantity=x.quantity,
                unit=_unit(x.unit),  # type: ignore[arg-type]
                rate_uecu=x.rate_uecu,
                per=x.per,
                subtotal_uecu=x.subtotal_uecu,
                model=x.model,
                job_type=_JOB_TYPES_BACK.get(x.job_type, x.job_type),  # type: ignore[arg-type]
                item=x.item,
                byok=x.byok,
                negotiated=x.negotiated,
                gross_uecu=x.gross_uecu,
                discount_uecu=x.discount_uecu,
            )
            for x in q.lines
        ),
    )


def _quote_or_none(q: pb.Quote) -> Quote | None:
    """The quote of a job-priced hold or usage-priced commit; None for plain amounts."""
    return _quote(q) if q.rate_card_version else None


def _hold_view(h: pb.Hold, quote: Quote | None) -> HoldView:
    return HoldView(
        h.reservation_id,
        h.amount_uecu,
        h.deadline_unix_ms,
        _HOLD_STATES[h.state],
        rate_card_version=quote.rate_card_version if quote else "",
    )


# -- one converter per RPC's response ---------------------------------------------------------


def reserve_outcome(resp: pb.ReserveResponse) -> ReserveOutcome:
    """Reserve's answer: the hold, its quote when a job was priced, the available balance."""
    quote = _quote_or_none(resp.quote)
    return ReserveOutcome(
        [_hold_view(resp.hold, quote)], resp.available_uecu, resp.replayed, quotes=[quote]
    )


def reserve_batch_outcome(resp: pb.ReserveBatchResponse) -> ReserveOutcome:
    """ReserveBatch's answer: every hold with its quote (None for plain amounts)."""
    quotes = [_quote_or_none(q) for q in resp.quotes] or [None] * len(resp.holds)
    return ReserveOutcome(
        [_hold_view(h, q) for h, q in zip(resp.holds, quotes, strict=True)],
        resp.available_uecu,
        resp.replayed,
        quotes=quotes,
    )


def job_step_outcome(resp: pb.ReserveResponse) -> ReserveOutcome:
    """Reserve's answer for a step of an approved job: with the job's remaining room."""
    return replace(reserve_outcome(resp), job_room_uecu=resp.job_remaining_uecu)


def job_steps_outcome(resp: pb.ReserveBatchResponse) -> ReserveOutcome:
    """ReserveBatch's answer for steps of an approved job: with the job's remaining room."""
    return replace(reserve_batch_outcome(resp), job_room_uecu=resp.job_remaining_uecu)


def commit_outcome(c: pb.CommitResponse) -> CommitOutcome:
    """Commit's answer: what was billed, released and over, with the usage's quote."""
    return CommitOutcome(
        reservation_id=c.reservation_id,
        committed_uecu=c.committed_uecu,
        released_uecu=c.released_uecu,
        overage_uecu=c.overage_uecu,
        unbilled_overage_uecu=c.unbilled_overage_uecu,
        late=c.late,
        replayed=c.replayed,
        available_uecu=c.available_uecu,
        quote=_quote_or_none(c.quote),
    )


def commit_batch_outcomes(resp: pb.CommitBatchResponse) -> list[CommitOutcome]:
    """One outcome per item; a refused item carries its QuotaError in ``error``."""
    out = []
    for r in resp.results:
        if r.code == 0:
            out.append(commit_outcome(r.commit))
        else:
            code = _CODE_BY_NUMBER.get(r.code, grpc.StatusCode.UNKNOWN)
            error = error_for(code, r.message, r.reason)
            out.append(CommitOutcome(r.commit.reservation_id, error=error))
    return out


def job_view(r: pb.JobResponse) -> JobView:
    """A job RPC's answer: the job as it stands, the available balance, whether replayed."""
    return job_view_from_pb(r.job, r.available_uecu, r.replayed)


def release_outcome(r: pb.ReleaseResponse) -> ReleaseOutcome:
    """Release's answer: what returned to available and the hold's state."""
    return ReleaseOutcome(
        r.reservation_id, r.released_uecu, _HOLD_STATES[r.state], r.available_uecu, r.replayed
    )


def extend_outcome(r: pb.ExtendResponse) -> ExtendOutcome:
    """Extend's answer: the hold's new deadline."""
    return ExtendOutcome(r.reservation_id, r.deadline_unix_ms, r.replayed)


def balance(resp: pb.GetBalanceResponse) -> Balance:
    """GetBalance's answer: the organization's wallet, hold counters and caps."""
    return balance_from_pb(resp.balance)


def grant_outcome(r: pb.GrantResponse) -> GrantOutcome:
    """Grant's answer: the balance and available after the grant."""
    return GrantOutcome(r.grant_id, r.balance_uecu, r.available_uecu, r.replayed)


def scope_usage(r: pb.SetCapResponse) -> ScopeUsage:
    """SetCap's answer: the scope's cap, held and used."""
    return scope_from_pb(r.usage)


def nothing(r: pb.SetAutoTopUpResponse) -> None:
    """SetAutoTopUp's answer: nothing to return."""
    return None


def preview_outcome(r: pb.PreviewResponse) -> PreviewOutcome:
    """Preview's answer: the job's worst-case quote and whether the balance covers it."""
    expected = None
    if r.HasField("expected"):
        e = r.expected
        job = _JOB_TYPES_BACK.get(e.job_type)
        expected = ExpectedCost(e.total_uecu, e.jobs, e.committed_uecu, e.approved_uecu, job)
    return PreviewOutcome(
        _quote(r.quote), r.covered, r.available_uecu, r.available_after_uecu, expected
    )


def rate_card_info(r: pb.GetRateCardResponse) -> RateCardInfo:
    """GetRateCard's answer: the card's version, fees, models and versions."""
    return RateCardInfo(
        version=r.version,
        fees=Fees(
            r.engine_call_uecu,
            r.judge_call_uecu,
            r.gepa_iteration_uecu,
            r.trace_uecu,
            r.byok_engine_call_uecu,
        ),
        models=[
            ModelRates(
                name=m.model,
                input_uecu_per_mtok=m.input_uecu_per_mtok,
                output_uecu_per_mtok=m.output_uecu_per_mtok,
                encoding=m.encoding,
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                estimate_factor_percent=m.estimate_factor_percent,
                chat_only=m.chat_only,
            )
            for m in r.models
        ],
        organizations_with_terms=list(r.organizations_with_terms),
        versions=list(r.versions),
    )
