"""Each RPC's request built from plain Python values; its response's converter is in
``responses``.

Both client flavours share this module; they add only the wire call. A builder (``reserve``,
``commit`` ...) validates its arguments before anything is sent (floats and bools are refused
as amounts, enums are checked, job specs parsed) and returns a ``Call``: the RPC's name, its
request and the converter of its response. The request is built once, caller ids included, so
every attempt of a retried call resends the same reservation id, grant id or extend sequence.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import Message

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.client import responses
from ecu_sidecar.client.errors import invalid
from ecu_sidecar.client.responses import JOB_TYPES, PreviewOutcome, RateCardInfo
from ecu_sidecar.jobs import JobPolicy, JobView
from ecu_sidecar.model import (
    Balance,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    JobType,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    Usage,
)
from ecu_sidecar.pricing import Quote, UsageKind, UsageLine

__all__ = [
    "Call",
    "PreviewOutcome",
    "RateCardInfo",
    "approve_job",
    "balance",
    "close_job",
    "commit",
    "commit_batch",
    "extend",
    "get_job",
    "grant",
    "heartbeat_job",
    "new_caller_id",
    "preview",
    "rate_card",
    "release",
    "reserve",
    "reserve_batch",
    "set_auto_topup",
    "set_cap",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One RPC to make: built (and its caller ids fixed) once, sent once per attempt."""

    method: str
    """The RPC's name in the Quota service (``Reserve``)."""
    request: Message
    """The request message, resent unchanged by every attempt."""
    convert: Callable[[Any], T]
    """The response message → what the client method returns."""
    admin: bool = False
    """Whether the call sends the admin token."""


def new_caller_id() -> str:
    """A fresh reservation (or grant) id: 32 hex digits, within [A-Za-z0-9._-]{1,128}."""
    return uuid.uuid4().hex


# -- the enums on the wire ---------------------------------------------------------------------

_GRANT_KINDS = {
    GrantKind.STARTER: pb.GRANT_KIND_STARTER,
    GrantKind.TOP_UP: pb.GRANT_KIND_TOP_UP,
    GrantKind.AUTO_TOP_UP: pb.GRANT_KIND_AUTO_TOP_UP,
    GrantKind.ENTERPRISE: pb.GRANT_KIND_ENTERPRISE,
    GrantKind.ADJUSTMENT: pb.GRANT_KIND_ADJUSTMENT,
}
_CAP_SCOPES = {"team": pb.CAP_SCOPE_TEAM, "project": pb.CAP_SCOPE_PROJECT}
_JOB_POLICIES = {JobPolicy.REFUSE: pb.JOB_POLICY_REFUSE, JobPolicy.WALLET: pb.JOB_POLICY_WALLET}
_USAGE_KINDS = {
    UsageKind.INFERENCE: pb.USAGE_KIND_INFERENCE,
    UsageKind.JUDGE: pb.USAGE_KIND_JUDGE,
    UsageKind.GEPA_ITERATION: pb.USAGE_KIND_GEPA_ITERATION,
    UsageKind.TRACE: pb.USAGE_KIND_TRACE,
}


# -- values in: checked before anything is sent -----------------------------------------------


def _choice(field: str, value: Any, table: Mapping[Any, int]) -> int:
    """An enum given as its Python enum member or its string value (any case)."""
    key = value.lower() if isinstance(value, str) else value
    if key in table:
        return table[key]
    raise invalid(field, f"must be one of {', '.join(map(str, table))}, got {value!r}")


def _int(field: str, value: Any) -> int:
    """An integer (µECU, ms, count): floats and bools are refused, never rounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be an integer, got {type(value).__name__}")
    return value


def _job_type(field: str, job_type: JobType | str | None, job: Any) -> int:
    """The job type: required for an amount, optional (derived by the sidecar) with a job."""
    if job_type is None:
        if job is None:
            raise invalid(field, "is required with an amount (not a job)")
        return pb.JOB_TYPE_UNSPECIFIED
    return _choice(field, job_type, JOB_TYPES)


def _job(field: str, job: Any) -> pb.JobSpec:
    """A job spec given as a pb.JobSpec or its proto JSON form (``{"items": [...]}``)."""
    if isinstance(job, pb.JobSpec):
        return job
    if isinstance(job, Mapping):
        try:
            return ParseDict(job, pb.JobSpec())
        except ParseError as exc:
            raise invalid(field, f"is not a job spec in the proto JSON form: {exc}") from None
    raise invalid(field, f"must be a pb.JobSpec or a dict, got {type(job).__name__}")


def _usage(field: str, usage: Usage | None) -> pb.Usage:
    u = usage or Usage()
    return pb.Usage(
        tokens_in=_int(f"{field}.tokens_in", u.tokens_in),
        tokens_out=_int(f"{field}.tokens_out", u.tokens_out),
        calls=_int(f"{field}.calls", u.calls),
    )


def _usage_lines(field: str, lines: Sequence[Any]) -> list[pb.UsageLine]:
    """Usage lines given as UsageLine, pb.UsageLine or a dict of UsageLine's fields."""
    if isinstance(lines, (str, bytes, Mapping)) or not isinstance(lines, Sequence):
        raise invalid(field, f"must be a list of usage lines, got {type(lines).__name__}")
    out = []
    for i, line in enumerate(lines):
        here = f"{field}[{i}]"
        if isinstance(line, pb.UsageLine):
            out.append(line)
            continue
        if isinstance(line, Mapping):
            try:
                line = UsageLine(**line)
            except TypeError as exc:
                raise invalid(here, f"is not a usage line: {exc}") from None
        if not isinstance(line, UsageLine):
            raise invalid(here, f"must be a UsageLine, got {type(line).__name__}")
        if not isinstance(line.byok, bool):
            raise invalid(f"{here}.byok", f"must be true or false, got {line.byok!r}")
        out.append(
            pb.UsageLine(
                kind=_choice(f"{here}.kind", line.kind, _USAGE_KINDS),
                model=line.model,
                tokens_in=_int(f"{here}.tokens_in", line.tokens_in),
                tokens_out=_int(f"{here}.tokens_out", line.tokens_out),
                calls=_int(f"{here}.calls", line.calls),
                byok=line.byok,
            )
        )
    return out


# -- one builder per RPC, each followed by its response's converter ----------------------------


def reserve(
    org: str,
    amount_uecu: int = 0,
    *,
    job_type: JobType | str | None = None,
    model: str = "",
    team: str = "",
    project: str = "",
    user: str = "",
    ttl_ms: int = 0,
    reservation_id: str | None = None,
    job: pb.JobSpec | Mapping[str, Any] | None = None,
    job_id: str = "",
) -> Call[ReserveOutcome]:
    """Reserve: an amount with its job type, or a job the sidecar prices; the reservation id
    is generated here, once, when not given. With ``job_id``: a step of that approved job."""
    request = pb.ReserveRequest(
        reservation_id=reservation_id or new_caller_id(),
        account=pb.Account(organization=org, team=team, project=project, user=user),
        amount_uecu=_int("amount_uecu", amount_uecu),
        job_type=_job_type("job_type", job_type, job),
        model=model,
        ttl_ms=_int("ttl_ms", ttl_ms),
        job_id=job_id,
    )
    if job is not None:
        request.job.CopyFrom(_job("job", job))
    convert = responses.job_step_outcome if job_id else responses.reserve_outcome
    return Call("Reserve", request, convert)


def reserve_batch(
    org: str,
    items: Sequence[ReserveItem],
    *,
    team: str = "",
    project: str = "",
    user: str = "",
    job_id: str = "",
) -> Call[ReserveOutcome]:
    """ReserveBatch: many steps of one account, all or none; each item without an id gets
    one here, once. With ``job_id``: steps of that approved job."""
    return Call(
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=pb.Account(organization=org, team=team, project=project, user=user),
            items=[_reserve_item(f"items[{i}]", it) for i, it in enumerate(items)],
            job_id=job_id,
        ),
        responses.job_steps_outcome if job_id else responses.reserve_batch_outcome,
    )


def _reserve_item(field: str, it: ReserveItem) -> pb.ReserveItem:
    item = pb.ReserveItem(
        reservation_id=it.reservation_id or new_caller_id(),
        amount_uecu=_int(f"{field}.amount_uecu", it.amount_uecu),
        job_type=_job_type(f"{field}.job_type", it.job_type, it.job),
        model=it.model,
        ttl_ms=_int(f"{field}.ttl_ms", it.ttl_ms),
    )
    if it.job is not None:
        item.job.CopyFrom(_job(f"{field}.job", it.job))
    return item


def commit(
    org: str,
    reservation_id: str,
    actual_uecu: int = 0,
    *,
    usage: Usage | None = None,
    usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    rate_card_version: str = "",
) -> Call[CommitOutcome]:
    """Commit: the actual amount, or usage lines the sidecar prices with the rate card
    version named."""
    request = pb.CommitRequest(
        reservation_id=reservation_id,
        organization=org,
        actual_uecu=_int("actual_uecu", actual_uecu),
        usage=_usage("usage", usage),
        rate_card_version=rate_card_version,
    )
    if usage_lines is not None:
        request.usage_lines.extend(_usage_lines("usage_lines", usage_lines))
    return Call("Commit", request, responses.commit_outcome)


def commit_batch(org: str, items: Sequence[CommitItem]) -> Call[list[CommitOutcome]]:
    """CommitBatch: many holds, each settled or refused on its own."""
    return Call(
        "CommitBatch",
        pb.CommitBatchRequest(
            organization=org,
            items=[
                pb.CommitItem(
                    reservation_id=it.reservation_id,
                    actual_uecu=_int(f"items[{i}].actual_uecu", it.actual_uecu),
                    usage=_usage(f"items[{i}].usage", it.usage),
                    usage_lines=_usage_lines(f"items[{i}].usage_lines", it.usage_lines or []),
                    rate_card_version=it.rate_card_version,
                )
                for i, it in enumerate(items)
            ],
        ),
        responses.commit_batch_outcomes,
    )


def release(org: str, reservation_id: str) -> Call[ReleaseOutcome]:
    """Release: void a hold."""
    return Call(
        "Release",
        pb.ReleaseRequest(reservation_id=reservation_id, organization=org),
        responses.release_outcome,
    )


def extend(org: str, reservation_id: str, *, sequence: int, ttl_ms: int = 0) -> Call[ExtendOutcome]:
    """Extend: a heartbeat with its sequence number, resent unchanged by a retry."""
    return Call(
        "Extend",
        pb.ExtendRequest(
            reservation_id=reservation_id,
            organization=org,
            ttl_ms=_int("ttl_ms", ttl_ms),
            sequence=_int("sequence", sequence),
        ),
        responses.extend_outcome,
    )


def balance(org: str) -> Call[Balance]:
    """GetBalance: the organization's wallet, hold counters and caps."""
    return Call("GetBalance", pb.GetBalanceRequest(organization=org), responses.balance)


def grant(
    org: str,
    amount_uecu: int,
    *,
    grant_id: str,
    kind: GrantKind | str = GrantKind.TOP_UP,
    expires_at_ms: int = 0,
) -> Call[GrantOutcome]:
    """Grant (admin): credit under a caller-chosen, idempotent grant id."""
    return Call(
        "Grant",
        pb.GrantRequest(
            grant_id=grant_id,
            organization=org,
            amount_uecu=_int("amount_uecu", amount_uecu),
            kind=_choice("kind", kind, _GRANT_KINDS),
            expires_at_unix_ms=_int("expires_at_unix_ms", expires_at_ms),
        ),
        responses.grant_outcome,
        admin=True,
    )


def set_cap(org: str, scope: str, scope_id: str, cap_uecu: int | None) -> Call[ScopeUsage]:
    """SetCap (admin): a team or project cap, cleared by ``cap_uecu=None``."""
    return Call(
        "SetCap",
        pb.SetCapRequest(
            organization=org,
            scope=_choice("scope", scope, _CAP_SCOPES),
            id=scope_id,
            cap_uecu=0 if cap_uecu is None else _int("cap_uecu", cap_uecu),
            clear=cap_uecu is None,
        ),
        responses.scope_usage,
        admin=True,
    )


def set_auto_topup(org: str, threshold_uecu: int | None, amount_uecu: int = 0) -> Call[None]:
    """SetAutoTopUp (admin): a threshold and amount, or off with ``threshold_uecu=None``."""
    return Call(
        "SetAutoTopUp",
        pb.SetAutoTopUpRequest(
            organization=org,
            threshold_uecu=0 if threshold_uecu is None else _int("threshold_uecu", threshold_uecu),
            amount_uecu=0 if threshold_uecu is None else _int("amount_uecu", amount_uecu),
            disable=threshold_uecu is None,
        ),
        responses.nothing,
        admin=True,
    )


def preview(
    org: str,
    job: pb.JobSpec | Mapping[str, Any],
    *,
    team: str = "",
    project: str = "",
    user: str = "",
) -> Call[PreviewOutcome]:
    """Preview: a job's worst case for an account (no side effects)."""
    return Call(
        "Preview",
        pb.PreviewRequest(
            account=pb.Account(organization=org, team=team, project=project, user=user),
            job=_job("job", job),
        ),
        responses.preview_outcome,
    )


def rate_card(org: str = "") -> Call[RateCardInfo]:
    """GetRateCard: the rate card the sidecar prices with. Which organizations have negotiated
    terms: all of them with the admin token (sent when the client has one), else at most
    ``org``."""
    return Call(
        "GetRateCard", pb.GetRateCardRequest(organization=org), responses.rate_card_info, admin=True
    )


def approve_job(
    org: str,
    job_id: str | None,
    approved: int | Quote | PreviewOutcome,
    *,
    job: pb.JobSpec | Mapping[str, Any] | None = None,
    rate_card_version: str = "",
    job_type: JobType | str | None = None,
    policy: JobPolicy | str = JobPolicy.REFUSE,
    ttl_ms: int = 0,
    team: str = "",
    project: str = "",
    user: str = "",
) -> Call[JobView]:
    """ApproveJob: what the user approved, a preview's quote (or the PreviewOutcome) of the
    ``job`` spec, which the sidecar prices again to check it, or a plain amount with its job
    type. The job id is generated here, once, when not given."""
    quote = approved.quote if isinstance(approved, PreviewOutcome) else approved
    if isinstance(quote, Quote):
        if job is None:
            raise invalid("job", "is required with a quote: the sidecar prices it again to check")
        amount, rate_card_version = quote.total_uecu, quote.rate_card_version
    else:
        amount = _int("approved", quote)
    request = pb.ApproveJobRequest(
        job_id=job_id or new_caller_id(),
        account=pb.Account(organization=org, team=team, project=project, user=user),
        approved_total_uecu=amount,
        rate_card_version=rate_card_version,
        job_type=_job_type("job_type", job_type, job),
        policy=_choice("policy", policy, _JOB_POLICIES),
        ttl_ms=_int("ttl_ms", ttl_ms),
    )
    if job is not None:
        request.job.CopyFrom(_job("job", job))
    return Call("ApproveJob", request, responses.job_view)


def get_job(org: str, job_id: str) -> Call[JobView]:
    """GetJob: a job's amounts, step counts and state."""
    return Call("GetJob", pb.GetJobRequest(organization=org, job_id=job_id), responses.job_view)


def heartbeat_job(org: str, job_id: str) -> Call[JobView]:
    """HeartbeatJob: keep an open job alive for another ttl."""
    request = pb.HeartbeatJobRequest(organization=org, job_id=job_id)
    return Call("HeartbeatJob", request, responses.job_view)


def close_job(org: str, job_id: str) -> Call[JobView]:
    """CloseJob: what the job did not bill returns to the wallet."""
    request = pb.CloseJobRequest(organization=org, job_id=job_id)
    return Call("CloseJob", request, responses.job_view)
