"""Protobuf ↔ pricing types: job specs and usage lines in, quotes out.

Unset oneofs become ``None`` so the pricer reports "give exactly one of prompt_text, messages,
prompt_tokens" with the right field path; zero counts that the API documents as "0 = 1"
(samples, calls) are mapped here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.model import Balance, JobType, ScopeUsage
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
    "balance_from_pb",
    "balance_to_pb",
    "fingerprint",
    "job_from_pb",
    "quote_to_pb",
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
    )


def _step(msg: Any) -> Any:
    which = msg.WhichOneof("kind")
    if which == "inference":
        return _inference(msg.inference)
    if which == "judge":
        return _judge(msg.judge)
    if which == "gepa":
        return GepaSpec(msg.gepa.iterations, [_step(s) for s in msg.gepa.per_iteration])
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
