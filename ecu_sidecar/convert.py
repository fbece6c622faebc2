"""Protobuf ↔ domain and pricing types: one converter per type, each built plainly.

Requests in (accounts, reserve and commit items, job specs, usage lines, enums), answers out
(holds, commit outcomes, quotes, balances). Unset oneofs become ``None`` so the pricer reports
"give exactly one of prompt_text, messages, prompt_tokens" with the right field path; zero
counts that the API documents as "0 = 1" (samples, calls) are mapped here. An enum number the
domain has no value for passes through as its wire name (unmapped_enum), for the engine or the
pricer to refuse in field order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.jobs import JobAccuracy, JobApproval, JobPolicy, JobState, JobView
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitItem,
    CommitOutcome,
    GrantKind,
    HoldState,
    HoldView,
    JobType,
    ReserveItem,
    ScopeUsage,
    Usage,
)
from ecu_sidecar.pricing import (
    ChatMessage,
    GepaSpec,
    InferenceSpec,
    JobSpec,
    JudgeSpec,
    Quote,
    TraceEvalSpec,
    UsageLine,
)

__all__ = [
    "account_from_pb",
    "balance_from_pb",
    "balance_to_pb",
    "cap_scope_from_pb",
    "commit_item_from_pb",
    "commit_to_pb",
    "expected_to_pb",
    "fingerprint",
    "grant_kind_from_pb",
    "hold_state_to_pb",
    "hold_to_pb",
    "job_approval_from_pb",
    "job_from_pb",
    "job_view_from_pb",
    "job_view_to_pb",
    "quote_to_pb",
    "reserve_item_from_pb",
    "scope_from_pb",
    "scope_to_pb",
    "unmapped_enum",
    "usage_from_pb",
]

_JOB_TYPE_PB = {
    JobType.INFERENCE: pb.JOB_TYPE_INFERENCE,
    JobType.JUDGE: pb.JOB_TYPE_JUDGE,
    JobType.GEPA: pb.JOB_TYPE_GEPA,
    JobType.TRACE_EVAL: pb.JOB_TYPE_TRACE_EVAL,
    JobType.ENGINE: pb.JOB_TYPE_ENGINE,
}
_JOB_TYPES = {number: job_type for job_type, number in _JOB_TYPE_PB.items()}
_GRANT_KINDS = {
    pb.GRANT_KIND_STARTER: GrantKind.STARTER,
    pb.GRANT_KIND_TOP_UP: GrantKind.TOP_UP,
    pb.GRANT_KIND_AUTO_TOP_UP: GrantKind.AUTO_TOP_UP,
    pb.GRANT_KIND_ENTERPRISE: GrantKind.ENTERPRISE,
    pb.GRANT_KIND_ADJUSTMENT: GrantKind.ADJUSTMENT,
}
_HOLD_STATES = {
    HoldState.ACTIVE: pb.HOLD_STATE_ACTIVE,
    HoldState.COMMITTED: pb.HOLD_STATE_COMMITTED,
    HoldState.RELEASED: pb.HOLD_STATE_RELEASED,
    HoldState.EXPIRED: pb.HOLD_STATE_EXPIRED,
}
_CAP_SCOPES = {pb.CAP_SCOPE_TEAM: "team", pb.CAP_SCOPE_PROJECT: "project"}
_JOB_POLICY_PB = {JobPolicy.REFUSE: pb.JOB_POLICY_REFUSE, JobPolicy.WALLET: pb.JOB_POLICY_WALLET}
#: Unset (0) is the default policy, refuse.
_JOB_POLICIES = {pb.JOB_POLICY_UNSPECIFIED: JobPolicy.REFUSE} | {
    number: policy for policy, number in _JOB_POLICY_PB.items()
}
_JOB_STATE_PB = {
    JobState.OPEN: pb.JOB_STATE_OPEN,
    JobState.CLOSED: pb.JOB_STATE_CLOSED,
    JobState.ABANDONED: pb.JOB_STATE_ABANDONED,
}
_JOB_STATES = {number: state for state, number in _JOB_STATE_PB.items()}
_USAGE_KINDS = {
    pb.USAGE_KIND_INFERENCE: "inference",
    pb.USAGE_KIND_JUDGE: "judge",
    pb.USAGE_KIND_GEPA_ITERATION: "gepa_iteration",
    pb.USAGE_KIND_TRACE: "trace",
}


def unmapped_enum(enum_type: Any, number: int) -> str:
    """An enum number the domain has no value for, spelled as on the wire: its proto name
    (GRANT_KIND_UNSPECIFIED, the default of an unset field) or, for a number this proto does not
    define, the number itself. It passes through to the engine or the pricer, which refuses it
    in field order and names it this way."""
    try:
        return str(enum_type.Name(number))
    except ValueError:
        return str(number)


def fingerprint(job: pb.JobSpec) -> str:
    """A digest of a job spec, stable across processes (deterministic serialization)."""
    return hashlib.sha256(job.SerializeToString(deterministic=True)).hexdigest()[:32]


def grant_kind_from_pb(number: int) -> GrantKind | str:
    """The GrantKind of a protobuf enum number (unmapped: its wire name)."""
    return _GRANT_KINDS.get(number) or unmapped_enum(pb.GrantKind, number)


def cap_scope_from_pb(number: int) -> str:
    """``team`` or ``project`` for a protobuf CapScope (unmapped: its wire name)."""
    return _CAP_SCOPES.get(number) or unmapped_enum(pb.CapScope, number)


def hold_state_to_pb(state: HoldState) -> int:
    """The protobuf HoldState number of a hold's state."""
    return _HOLD_STATES[state]


# -- requests in ----------------------------------------------------------------------------------


def account_from_pb(msg: pb.Account) -> AccountRef:
    """Who pays, from a request's ``account``."""
    return AccountRef(msg.organization, msg.team, msg.project, msg.user)


def reserve_item_from_pb(msg: Any) -> ReserveItem:
    """A step to hold, from a ReserveRequest or a ReserveItem (the same field names). A job
    spec travels as the pricer's (its amount comes from pricing), with its fingerprint."""
    job_type = _JOB_TYPES.get(msg.job_type) or unmapped_enum(pb.JobType, msg.job_type)
    if not msg.HasField("job"):
        return ReserveItem(msg.reservation_id, msg.amount_uecu, job_type, msg.model, msg.ttl_ms)
    if msg.job_type == pb.JOB_TYPE_UNSPECIFIED:
        job_type = None  # derived from the job by the engine
    return ReserveItem(
        msg.reservation_id,
        msg.amount_uecu,
        job_type,
        msg.model,
        msg.ttl_ms,
        fingerprint=fingerprint(msg.job),
        job=job_from_pb(msg.job),
    )


def job_approval_from_pb(msg: pb.ApproveJobRequest) -> JobApproval:
    """What the user approved, from an ApproveJobRequest: a previewed job spec (priced again by
    the engine; its job type derived unless given) or a plain amount."""
    job_type: Any = _JOB_TYPES.get(msg.job_type) or unmapped_enum(pb.JobType, msg.job_type)
    policy: Any = _JOB_POLICIES.get(msg.policy) or unmapped_enum(pb.JobPolicy, msg.policy)
    spec, digest = None, ""
    if msg.HasField("job"):
        spec, digest = job_from_pb(msg.job), fingerprint(msg.job)
        if msg.job_type == pb.JOB_TYPE_UNSPECIFIED:
            job_type = None  # derived from the job by the engine
    return JobApproval(
        job_id=msg.job_id,
        amount_uecu=msg.approved_total_uecu,
        job_type=job_type,
        policy=policy,
        ttl_ms=msg.ttl_ms,
        rate_card_version=msg.rate_card_version,
        fingerprint=digest,
        spec=spec,
    )


def commit_item_from_pb(msg: Any) -> CommitItem:
    """A hold to settle, from a CommitRequest or a CommitItem (the same field names).

    On the wire an empty list is no list: a commit naming a rate card version is priced from
    its usage lines, none (a job that made no call) included."""
    lines = msg.usage_lines
    u = msg.usage
    return CommitItem(
        msg.reservation_id,
        msg.actual_uecu,
        Usage(u.tokens_in, u.tokens_out, u.calls),
        msg.rate_card_version,
        usage_lines=usage_from_pb(lines) if lines or msg.rate_card_version else None,
    )


def _messages(msg: pb.ChatMessages) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content, m.name) for m in msg.messages]


def _inference(msg: pb.InferenceSpec) -> InferenceSpec:
    which = msg.WhichOneof("prompt")
    return InferenceSpec(
        msg.model,
        prompt_text=msg.prompt_text if which == "prompt_text" else None,
        messages=_messages(msg.messages) if which == "messages" else None,
        prompt_tokens=msg.prompt_tokens if which == "prompt_tokens" else None,
        max_output_tokens=msg.max_output_tokens,
        samples=msg.samples or 1,
        byok=msg.byok,
    )


def _judge(msg: pb.JudgeSpec) -> JudgeSpec:
    which = msg.WhichOneof("prompt")
    return JudgeSpec(
        msg.judge_model,
        calls=msg.calls or 1,
        prompt_text=msg.prompt_text if which == "prompt_text" else None,
        messages=_messages(msg.messages) if which == "messages" else None,
        prompt_tokens_per_call=msg.prompt_tokens_per_call
        if which == "prompt_tokens_per_call"
        else None,
        max_output_tokens_per_call=msg.max_output_tokens_per_call,
        byok=msg.byok,
        answer_max_tokens=msg.answer_max_tokens,
        answer_of_item=msg.answer_of_item if msg.HasField("answer_of_item") else None,
    )


def _step(msg: Any) -> Any:
    which = msg.WhichOneof("kind")
    if which == "inference":
        return _inference(msg.inference)
    if which == "judge":
        return _judge(msg.judge)
    if which == "gepa":
        return GepaSpec(
            msg.gepa.iterations,
            [_step(s) for s in msg.gepa.per_iteration],
            msg.gepa.prompt_growth_tokens_per_iteration,
        )
    if which == "trace_eval":
        return TraceEvalSpec(msg.trace_eval.traces, [_judge(j) for j in msg.trace_eval.judges])
    return None  # an empty item: the pricer names it


def job_from_pb(msg: pb.JobSpec) -> JobSpec:
    """The pricer's job spec for a protobuf JobSpec."""
    return [_step(item) for item in msg.items]


def usage_from_pb(lines: Any) -> list[UsageLine]:
    """The pricer's usage lines for repeated protobuf UsageLine (unknown kinds pass through
    as their wire name, for the pricer to refuse with the field path)."""
    return [
        UsageLine(
            _USAGE_KINDS.get(u.kind) or unmapped_enum(pb.UsageKind, u.kind),
            model=u.model,
            tokens_in=u.tokens_in,
            tokens_out=u.tokens_out,
            calls=u.calls,
            byok=u.byok,
        )
        for u in lines
    ]


# -- answers out ----------------------------------------------------------------------------------


def hold_to_pb(org: str, h: HoldView) -> pb.Hold:
    """A hold of ``org`` as its protobuf message."""
    return pb.Hold(
        reservation_id=h.reservation_id,
        organization=org,
        amount_uecu=h.amount_uecu,
        deadline_unix_ms=h.deadline_unix_ms,
        state=_HOLD_STATES[h.state],
    )


def job_view_to_pb(org: str, j: JobView) -> pb.Job:
    """A job of ``org`` as its protobuf message."""
    return pb.Job(
        job_id=j.job_id,
        organization=org,
        state=_JOB_STATE_PB[j.state],
        approved_uecu=j.approved_uecu,
        drawn_uecu=j.drawn_uecu,
        committed_uecu=j.committed_uecu,
        held_uecu=j.steps_held_uecu,
        remaining_uecu=j.room_uecu,
        extra_uecu=j.extra_uecu,
        extra_max_uecu=j.extra_max_uecu,
        steps=j.steps,
        steps_committed=j.steps_committed,
        steps_ended=j.steps_ended,
        policy=_JOB_POLICY_PB[j.policy],
        team=j.team,
        project=j.project,
        user=j.user,
        job_type=_JOB_TYPE_PB.get(j.job_type, pb.JOB_TYPE_UNSPECIFIED),  # type: ignore[call-overload]
        rate_card_version=j.rate_card_version,
        ttl_ms=j.ttl_ms,
        deadline_unix_ms=j.deadline_unix_ms,
        opened_at_unix_ms=j.opened_at_ms,
        ended_at_unix_ms=j.ended_at_ms,
        returned_uecu=j.returned_uecu,
    )


def job_view_from_pb(m: pb.Job, available_uecu: int = 0, replayed: bool = False) -> JobView:
    """The domain value of a protobuf Job (an answer's available balance and replay flag
    given beside it)."""
    job_type = _JOB_TYPES.get(m.job_type)
    return JobView(
        job_id=m.job_id,
        state=_JOB_STATES[m.state],
        approved_uecu=m.approved_uecu,
        extra_uecu=m.extra_uecu,
        extra_max_uecu=m.extra_max_uecu,
        room_uecu=m.remaining_uecu,
        steps_held_uecu=m.held_uecu,
        committed_uecu=m.committed_uecu,
        steps=m.steps,
        steps_committed=m.steps_committed,
        steps_ended=m.steps_ended,
        policy=_JOB_POLICIES.get(m.policy, JobPolicy.REFUSE),
        team=m.team,
        project=m.project,
        user=m.user,
        job_type=job_type.value if job_type else "",
        rate_card_version=m.rate_card_version,
        ttl_ms=m.ttl_ms,
        deadline_unix_ms=m.deadline_unix_ms,
        opened_at_ms=m.opened_at_unix_ms,
        ended_at_ms=m.ended_at_unix_ms,
        returned_uecu=m.returned_uecu,
        available_uecu=available_uecu,
        replayed=replayed,
    )


def commit_to_pb(o: CommitOutcome) -> pb.CommitResponse:
    """A commit's outcome as its protobuf answer."""
    return pb.CommitResponse(
        reservation_id=o.reservation_id,
        committed_uecu=o.committed_uecu,
        released_uecu=o.released_uecu,
        overage_uecu=o.overage_uecu,
        unbilled_overage_uecu=o.unbilled_overage_uecu,
        late=o.late,
        available_uecu=o.available_uecu,
        replayed=o.replayed,
        quote=quote_to_pb(o.quote) if o.quote else None,
        degraded=o.degraded,
    )


def expected_to_pb(total_uecu: int, accuracy: JobAccuracy) -> pb.ExpectedCost:
    """Preview's expected cost: the worst case ``total_uecu`` scaled by ``accuracy``."""
    return pb.ExpectedCost(
        total_uecu=accuracy.expected_uecu(total_uecu),
        jobs=accuracy.jobs,
        committed_uecu=accuracy.committed_uecu,
        approved_uecu=accuracy.approved_uecu,
        job_type=_JOB_TYPE_PB.get(accuracy.job_type, pb.JOB_TYPE_UNSPECIFIED),  # type: ignore[call-overload]
    )


def quote_to_pb(quote: Quote) -> pb.Quote:
    """A pricing Quote as its protobuf message."""
    return pb.Quote(
        total_uecu=quote.total_uecu,
        rate_card_version=quote.rate_card_version,
        lines=[
            pb.QuoteLine(
                description=x.description,
                quantity=x.quantity,
                unit=str(x.unit),
                rate_uecu=x.rate_uecu,
                per=x.per,
                subtotal_uecu=x.subtotal_uecu,
                model=x.model,
                job_type=_JOB_TYPE_PB[x.job_type],
                item=x.item,
                byok=x.byok,
                negotiated=x.negotiated,
                gross_uecu=x.gross_uecu,
                discount_uecu=x.discount_uecu,
            )
            for x in quote.lines
        ],
    )


#: Balance fields that are plain integers on both sides, converted by name.
_BALANCE_SCALARS = tuple(
    f.name
    for f in dataclasses.fields(Balance)
    if f.name in pb.Balance.DESCRIPTOR.fields_by_name
    and f.name not in ("organization", "teams", "projects", "auto_topup_threshold_uecu")
)


def scope_to_pb(s: ScopeUsage) -> pb.ScopeUsage:
    """A team's or project's usage as its protobuf message."""
    return pb.ScopeUsage(
        id=s.id,
        has_cap=s.cap_uecu is not None,
        cap_uecu=s.cap_uecu or 0,
        held_uecu=s.held_uecu,
        used_uecu=s.used_uecu,
        available_uecu=s.available_uecu,
    )


def scope_from_pb(s: pb.ScopeUsage) -> ScopeUsage:
    """The domain value of a protobuf ScopeUsage."""
    return ScopeUsage(s.id, s.cap_uecu if s.has_cap else None, s.held_uecu, s.used_uecu)


def balance_to_pb(b: Balance) -> pb.Balance:
    """A Balance as its protobuf message (available and the auto-top-up flag derived)."""
    return pb.Balance(
        organization=b.organization,
        available_uecu=b.available_uecu,
        teams=[scope_to_pb(s) for s in b.teams],
        projects=[scope_to_pb(s) for s in b.projects],
        has_auto_topup=b.auto_topup_threshold_uecu is not None,
        auto_topup_threshold_uecu=b.auto_topup_threshold_uecu or 0,
        **{name: getattr(b, name) for name in _BALANCE_SCALARS},
    )


def balance_from_pb(m: pb.Balance) -> Balance:
    """The domain Balance of a protobuf message."""
    return Balance(
        organization=m.organization,
        teams=[scope_from_pb(s) for s in m.teams],
        projects=[scope_from_pb(s) for s in m.projects],
        auto_topup_threshold_uecu=m.auto_topup_threshold_uecu if m.has_auto_topup else None,
        **{name: getattr(m, name) for name in _BALANCE_SCALARS},
    )
