"""The Python client evaluation workers use to talk to the sidecar, async and sync.

Both flavours share everything but the wire call: each public method is generated from one
request builder below (``_reserve``, ``_commit`` ...) that validates plain Python values and
returns a ``_Call`` (RPC name, request message, response converter). ``AsyncQuotaClient`` and
``QuotaClient`` each add only the call layer: per-attempt deadline, admin metadata, retries.

Retries: only UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times with jittered
backoff, and only because every mutating call is idempotent by its caller id: a request is
built once, so a retry resends the same reservation id, grant id or extend sequence and the
sidecar answers it from its record instead of charging twice. Retries after the first attempt
wait (within their deadline) for the connection to come back rather than failing fast again.

The star is ``hold``::

    async with client.hold(org="acme", amount_uecu=400_000, job_type="inference",
                           model="gpt-4o") as h:
        ...                                   # the step; h.extend() heartbeats long runs
        await h.commit(actual_uecu, usage=Usage(tokens_in=10))

An exception in the block, or leaving it without commit or release, releases the hold, except
after a commit whose outcome is unknown (retries exhausted): the commit may have landed, and
the worker may still retry it, so the hold is left to that retry or to its deadline.

While the block runs, the hold is kept alive: a background task (async) or thread (sync)
extends it whenever only ``keepalive_margin`` (a third by default) of its TTL is left, so a
hold expires only when its worker died (an expired hold's late commit is billed only what is
still available plus its overage bound). ``keepalive=False`` turns this off. A failed
keep-alive extend never interrupts the block: it is logged and kept in ``h.keepalive_error``.

Workers never compute money: give ``job=`` (a ``pb.JobSpec`` or its proto JSON form as a dict)
instead of an amount and the sidecar holds the job's worst case, pinned to its rate card
version; then commit what was used as ``usage_lines`` and the sidecar prices it with that same
version, which the hold sends by itself::

    job = {"items": [{"inference": {"model": "gpt-4o", "promptText": prompt,
                                    "maxOutputTokens": 500}}]}
    print((await client.preview("acme", job)).quote.total_uecu)   # what the user approves
    async with client.hold(org="acme", job=job) as h:
        ...
        await h.commit(usage_lines=[UsageLine("inference", "gpt-4o", tokens_in=812,
                                              tokens_out=240, calls=1)])
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import grpc
from google.protobuf.json_format import ParseDict, ParseError
from google.protobuf.message import Message

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.client.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientEcu,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaError,
    Unavailable,
    error_for,
    error_from_rpc,
    invalid,
)
from ecu_sidecar.client.retry import RETRYABLE_CODES, RetryPolicy, give_up, retry_after
from ecu_sidecar.convert import balance_from_pb, scope_from_pb
from ecu_sidecar.model import (
    Balance,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    HoldState,
    HoldView,
    JobType,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    Usage,
)
from ecu_sidecar.pricing import Fees, Line, ModelRates, Quote, Unit, UsageKind, UsageLine

__all__ = [
    "DEFAULT_KEEPALIVE_MARGIN",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "RETRYABLE_CODES",
    "AsyncHold",
    "AsyncQuotaClient",
    "Conflict",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Hold",
    "InsufficientEcu",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreviewOutcome",
    "QuotaClient",
    "QuotaError",
    "RateCardInfo",
    "RetryPolicy",
    "Unavailable",
    "UsageLine",
    "error_from_rpc",
    "new_caller_id",
]

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the sidecar listens by default (ECU_LISTEN's default)."""

DEFAULT_TIMEOUT_S = 2.0
"""Deadline of one attempt of one RPC."""

DEFAULT_KEEPALIVE_MARGIN = 1 / 3
"""``hold()`` extends its hold when this fraction of the hold's TTL is left before the deadline."""

#: Shortest pause of the keep-alive between two attempts (a TTL of a few ms must not spin).
_KEEPALIVE_MIN_WAIT_S = 0.005

#: Reconnect quickly: the sidecar is on localhost, and a worker that started before it (or
#: outlived a restart) should not wait gRPC's default 1-120 s reconnect backoff.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

T = TypeVar("T")
H = TypeVar("H")
P = ParamSpec("P")


# -- request building (shared by both flavours) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One RPC to make: built (and its caller ids fixed) once, sent once per attempt."""

    method: str
    request: Message
    convert: Callable[[Any], T]
    admin: bool = False


def new_caller_id() -> str:
    """A fresh reservation (or grant) id: 32 hex digits, within [A-Za-z0-9._-]{1,128}."""
    return uuid.uuid4().hex


_JOB_TYPES = {
    JobType.INFERENCE: pb.JOB_TYPE_INFERENCE,
    JobType.JUDGE: pb.JOB_TYPE_JUDGE,
    JobType.GEPA: pb.JOB_TYPE_GEPA,
    JobType.TRACE_EVAL: pb.JOB_TYPE_TRACE_EVAL,
    JobType.ENGINE: pb.JOB_TYPE_ENGINE,
}
_GRANT_KINDS = {
    GrantKind.STARTER: pb.GRANT_KIND_STARTER,
    GrantKind.TOP_UP: pb.GRANT_KIND_TOP_UP,
    GrantKind.AUTO_TOP_UP: pb.GRANT_KIND_AUTO_TOP_UP,
    GrantKind.ENTERPRISE: pb.GRANT_KIND_ENTERPRISE,
    GrantKind.ADJUSTMENT: pb.GRANT_KIND_ADJUSTMENT,
}
_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_CAP_SCOPES = {"team": pb.CAP_SCOPE_TEAM, "project": pb.CAP_SCOPE_PROJECT}
_HOLD_STATES = {
    pb.HOLD_STATE_ACTIVE: HoldState.ACTIVE,
    pb.HOLD_STATE_COMMITTED: HoldState.COMMITTED,
    pb.HOLD_STATE_RELEASED: HoldState.RELEASED,
    pb.HOLD_STATE_EXPIRED: HoldState.EXPIRED,
}
_JOB_TYPES_BACK = {number: member for member, number in _JOB_TYPES.items()}
_USAGE_KINDS = {
    UsageKind.INFERENCE: pb.USAGE_KIND_INFERENCE,
    UsageKind.JUDGE: pb.USAGE_KIND_JUDGE,
    UsageKind.GEPA_ITERATION: pb.USAGE_KIND_GEPA_ITERATION,
    UsageKind.TRACE: pb.USAGE_KIND_TRACE,
}


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


@dataclass(frozen=True, slots=True)
class RateCardInfo:
    """The rate card a sidecar prices with (GetRateCard)."""

    version: str
    fees: Fees
    models: list[ModelRates]
    """Every model with its rates, sorted by name."""
    organizations_with_terms: list[str]
    """Organizations with negotiated terms (ids only)."""
    versions: list[str]
    """Every version the sidecar can still price commits with."""


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


def _usage(field: str, usage: Usage | None) -> pb.Usage:
    u = usage or Usage()
    return pb.Usage(
        tokens_in=_int(f"{field}.tokens_in", u.tokens_in),
        tokens_out=_int(f"{field}.tokens_out", u.tokens_out),
        calls=_int(f"{field}.calls", u.calls),
    )


def _hold_view(h: pb.Hold, quote: Quote | None) -> HoldView:
    return HoldView(
        h.reservation_id,
        h.amount_uecu,
        h.deadline_unix_ms,
        _HOLD_STATES[h.state],
        rate_card_version=quote.rate_card_version if quote else "",
    )


def _reserve_outcome(resp: pb.ReserveResponse) -> ReserveOutcome:
    quote = _quote_or_none(resp.quote)
    return ReserveOutcome(
        [_hold_view(resp.hold, quote)], resp.available_uecu, resp.replayed, quotes=[quote]
    )


def _reserve_batch_outcome(resp: pb.ReserveBatchResponse) -> ReserveOutcome:
    quotes = [_quote_or_none(q) for q in resp.quotes] or [None] * len(resp.holds)
    return ReserveOutcome(
        [_hold_view(h, q) for h, q in zip(resp.holds, quotes, strict=True)],
        resp.available_uecu,
        resp.replayed,
        quotes=quotes,
    )


def _commit_outcome(c: pb.CommitResponse) -> CommitOutcome:
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


def _commit_batch_outcomes(resp: pb.CommitBatchResponse) -> list[CommitOutcome]:
    out = []
    for r in resp.results:
        if r.code == 0:
            out.append(_commit_outcome(r.commit))
        else:
            code = _CODE_BY_NUMBER.get(r.code, grpc.StatusCode.UNKNOWN)
            error = error_for(code, r.message, r.reason)
            out.append(CommitOutcome(r.commit.reservation_id, error=error))
    return out


def _to_balance(resp: pb.GetBalanceResponse) -> Balance:
    return balance_from_pb(resp.balance)


def _job_type(field: str, job_type: JobType | str | None, job: Any) -> int:
    """The job type: required for an amount, optional (derived by the sidecar) with a job."""
    if job_type is None:
        if job is None:
            raise invalid(field, "is required when reserving an amount (not a job)")
        return pb.JOB_TYPE_UNSPECIFIED
    return _choice(field, job_type, _JOB_TYPES)


def _reserve(
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
) -> _Call[ReserveOutcome]:
    """Hold a step's worst case: ``amount_uecu`` with its ``job_type``, or a ``job`` spec that
    the sidecar prices (its quote in ``quotes[0]``, pinned to the rate card version). The
    reservation id is generated when not given."""
    request = pb.ReserveRequest(
        reservation_id=reservation_id or new_caller_id(),
        account=pb.Account(organization=org, team=team, project=project, user=user),
        amount_uecu=_int("amount_uecu", amount_uecu),
        job_type=_job_type("job_type", job_type, job),
        model=model,
        ttl_ms=_int("ttl_ms", ttl_ms),
    )
    if job is not None:
        request.job.CopyFrom(_job("job", job))
    return _Call("Reserve", request, _reserve_outcome)


def _reserve_batch(
    org: str,
    items: Sequence[ReserveItem],
    *,
    team: str = "",
    project: str = "",
    user: str = "",
) -> _Call[ReserveOutcome]:
    """Hold many steps of one account, all or none; items with an empty id get one. An item
    with ``job`` (amount 0, job_type None or given) is priced by the sidecar."""
    return _Call(
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=pb.Account(organization=org, team=team, project=project, user=user),
            items=[_reserve_item(f"items[{i}]", it) for i, it in enumerate(items)],
        ),
        _reserve_batch_outcome,
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


def _commit(
    org: str,
    reservation_id: str,
    actual_uecu: int = 0,
    *,
    usage: Usage | None = None,
    usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    rate_card_version: str = "",
) -> _Call[CommitOutcome]:
    """Settle a hold with what the step really cost: ``actual_uecu``, or ``usage_lines`` that
    the sidecar prices with ``rate_card_version`` (the version the hold was priced with; the
    price and its breakdown come back in ``quote``)."""
    request = pb.CommitRequest(
        reservation_id=reservation_id,
        organization=org,
        actual_uecu=_int("actual_uecu", actual_uecu),
        usage=_usage("usage", usage),
        rate_card_version=rate_card_version,
    )
    if usage_lines is not None:
        request.usage_lines.extend(_usage_lines("usage_lines", usage_lines))
    return _Call("Commit", request, _commit_outcome)


def _commit_batch(org: str, items: Sequence[CommitItem]) -> _Call[list[CommitOutcome]]:
    """Settle many holds; failed items carry their QuotaError in ``CommitOutcome.error``.
    Items may carry ``usage_lines`` with ``rate_card_version`` instead of an actual."""
    return _Call(
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
        _commit_batch_outcomes,
    )


def _release(org: str, reservation_id: str) -> _Call[ReleaseOutcome]:
    """Void a hold: its amount returns to available."""
    return _Call(
        "Release",
        pb.ReleaseRequest(reservation_id=reservation_id, organization=org),
        lambda r: ReleaseOutcome(
            r.reservation_id, r.released_uecu, _HOLD_STATES[r.state], r.available_uecu, r.replayed
        ),
    )


def _extend(
    org: str, reservation_id: str, *, sequence: int, ttl_ms: int = 0
) -> _Call[ExtendOutcome]:
    """Push a live hold's deadline (heartbeat ``sequence``: from 1, increasing)."""
    return _Call(
        "Extend",
        pb.ExtendRequest(
            reservation_id=reservation_id,
            organization=org,
            ttl_ms=_int("ttl_ms", ttl_ms),
            sequence=_int("sequence", sequence),
        ),
        lambda r: ExtendOutcome(r.reservation_id, r.deadline_unix_ms, r.replayed),
    )


def _balance(org: str) -> _Call[Balance]:
    """The organization's wallet, hold counters and caps."""
    return _Call("GetBalance", pb.GetBalanceRequest(organization=org), _to_balance)


def _grant(
    org: str,
    amount_uecu: int,
    *,
    grant_id: str,
    kind: GrantKind | str = GrantKind.TOP_UP,
    expires_at_ms: int = 0,
) -> _Call[GrantOutcome]:
    """Admin: credit an organization under a caller-chosen, idempotent grant id."""
    return _Call(
        "Grant",
        pb.GrantRequest(
            grant_id=grant_id,
            organization=org,
            amount_uecu=_int("amount_uecu", amount_uecu),
            kind=_choice("kind", kind, _GRANT_KINDS),
            expires_at_unix_ms=_int("expires_at_unix_ms", expires_at_ms),
        ),
        lambda r: GrantOutcome(r.grant_id, r.balance_uecu, r.available_uecu, r.replayed),
        admin=True,
    )


def _set_cap(org: str, scope: str, scope_id: str, cap_uecu: int | None) -> _Call[ScopeUsage]:
    """Admin: set a team or project cap, or clear it with ``cap_uecu=None``."""
    return _Call(
        "SetCap",
        pb.SetCapRequest(
            organization=org,
            scope=_choice("scope", scope, _CAP_SCOPES),
            id=scope_id,
            cap_uecu=0 if cap_uecu is None else _int("cap_uecu", cap_uecu),
            clear=cap_uecu is None,
        ),
        lambda r: scope_from_pb(r.usage),
        admin=True,
    )


def _set_auto_topup(org: str, threshold_uecu: int | None, amount_uecu: int = 0) -> _Call[None]:
    """Admin: when available falls below ``threshold_uecu``, notify billing to top up
    ``amount_uecu``; ``threshold_uecu=None`` turns auto-top-up off."""
    return _Call(
        "SetAutoTopUp",
        pb.SetAutoTopUpRequest(
            organization=org,
            threshold_uecu=0 if threshold_uecu is None else _int("threshold_uecu", threshold_uecu),
            amount_uecu=0 if threshold_uecu is None else _int("amount_uecu", amount_uecu),
            disable=threshold_uecu is None,
        ),
        lambda r: None,
        admin=True,
    )


def _preview(
    org: str,
    job: pb.JobSpec | Mapping[str, Any],
    *,
    team: str = "",
    project: str = "",
    user: str = "",
) -> _Call[PreviewOutcome]:
    """A job's worst case, itemized, and whether the balance covers it (no side effects)."""
    return _Call(
        "Preview",
        pb.PreviewRequest(
            account=pb.Account(organization=org, team=team, project=project, user=user),
            job=_job("job", job),
        ),
        lambda r: PreviewOutcome(
            _quote(r.quote), r.covered, r.available_uecu, r.available_after_uecu
        ),
    )


def _to_rate_card(r: pb.GetRateCardResponse) -> RateCardInfo:
    return RateCardInfo(
        version=r.version,
        fees=Fees(r.engine_call_uecu, r.judge_call_uecu, r.gepa_iteration_uecu, r.trace_uecu),
        models=[
            ModelRates(
                name=m.model,
                input_uecu_per_mtok=m.input_uecu_per_mtok,
                output_uecu_per_mtok=m.output_uecu_per_mtok,
                encoding=m.encoding,
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                estimate_factor_percent=m.estimate_factor_percent,
            )
            for m in r.models
        ],
        organizations_with_terms=list(r.organizations_with_terms),
        versions=list(r.versions),
    )


def _rate_card() -> _Call[RateCardInfo]:
    """The rate card the sidecar prices with: version, fees, models, versions still loaded."""
    return _Call("GetRateCard", pb.GetRateCardRequest(), _to_rate_card)


def _method_signature(build: Callable[..., Any], returns: Any) -> inspect.Signature:
    """The builder's signature with ``self`` in front and the converted return type."""
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return sig.replace(parameters=[this, *sig.parameters.values()], return_annotation=returns)


def _result_annotation(build: Callable[..., Any]) -> Any:
    """``T`` of a builder's ``_Call[T]`` annotation (a string: annotations are postponed)."""
    ann = inspect.signature(build).return_annotation
    if isinstance(ann, str) and ann.startswith("_Call[") and ann.endswith("]"):
        return ann[len("_Call[") : -1]
    return inspect.Signature.empty


def _expose(build: Callable[..., Any], method: Callable[..., Any], returns: Any) -> None:
    """Give a generated method the builder's public name, docstring and signature."""
    method.__name__ = build.__name__.lstrip("_")
    method.__qualname__ = method.__name__
    method.__doc__ = build.__doc__
    method.__signature__ = _method_signature(build, returns)  # type: ignore[attr-defined]


def _async_rpc(
    build: Callable[P, _Call[T]],
) -> Callable[Concatenate[AsyncQuotaClient, P], Coroutine[Any, Any, T]]:
    """An AsyncQuotaClient method: build the call, then await it through the call layer."""

    async def method(self: AsyncQuotaClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._invoke(build(*args, **kwargs))

    _expose(build, method, _result_annotation(build))
    return method


def _sync_rpc(build: Callable[P, _Call[T]]) -> Callable[Concatenate[QuotaClient, P], T]:
    """A QuotaClient method: build the call, then make it through the call layer."""

    def method(self: QuotaClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._invoke(build(*args, **kwargs))

    _expose(build, method, _result_annotation(build))
    return method


# -- holds -------------------------------------------------------------------------------------


class _HoldBase:
    """State and bookkeeping shared by AsyncHold and Hold; the flavours only make the calls.

    Every extend (the caller's ``extend()`` and the keep-alive's) is made under the hold's one
    lock, which also takes the next heartbeat sequence: the two never send numbers out of
    order (the sidecar would refuse the lower as STALE_SEQUENCE). Commit and release take the
    lock too, so a keep-alive extend never races the hold's settlement."""

    def __init__(
        self,
        reserve: _Call[ReserveOutcome],
        *,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        request = reserve.request
        assert isinstance(request, pb.ReserveRequest)
        if not isinstance(keepalive, bool):
            raise TypeError(f"keepalive must be True or False, got {keepalive!r}")
        if isinstance(keepalive_margin, bool) or not 0 < keepalive_margin < 1:
            raise ValueError(
                f"keepalive_margin must be a fraction of the TTL between 0 and 1 (exclusive), "
                f"got {keepalive_margin!r}"
            )
        self._reserve_call = reserve
        self.reservation_id: str = request.reservation_id
        """The hold's reservation id (generated unless the caller chose one)."""
        self.organization: str = request.account.organization
        """The organization paying for the hold."""
        self.amount_uecu: int = request.amount_uecu
        """The amount held (a job's worst case once the hold is placed)."""
        self.quote: Quote | None = None
        """With ``job=``: the priced worst case, once the hold is placed."""
        self.rate_card_version = ""
        """With ``job=``: the rate card version the hold pinned; ``commit(usage_lines=...)``
        sends it."""
        self.deadline_unix_ms = 0
        """When the sidecar will expire the hold (pushed by ``extend`` and the keep-alive)."""
        self.available_uecu = 0
        """The organization's available balance right after the hold was placed."""
        self.state: HoldState | None = None
        """None before the hold is placed, then ACTIVE, COMMITTED, RELEASED or EXPIRED."""
        self.sequence = 0
        """The last heartbeat sequence sent by ``extend`` or the keep-alive (0 before the
        first)."""
        self.committed: CommitOutcome | None = None
        """The commit's answer once committed."""
        self.keepalive = keepalive
        """Whether the hold is extended in the background while the block runs."""
        self.keepalive_margin = keepalive_margin
        """The keep-alive extends when this fraction of the TTL is left before the deadline."""
        self.keepalive_extends = 0
        """Extends the keep-alive made that the sidecar accepted."""
        self.keepalive_error: BaseException | None = None
        """The keep-alive's last failure (None while it never failed). UNAVAILABLE is retried
        before the deadline; any other failure (the hold is gone) stops the keep-alive."""
        self._commit_in_doubt = False
        self._ttl_ms = request.ttl_ms
        """The hold's TTL: the one asked, else estimated when the hold is placed."""
        self._extend_due = 0.0
        """time.monotonic() at which the keep-alive extends next."""

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.organization}/{self.reservation_id} "
            f"{self.amount_uecu} uECU {self.state}>"
        )

    def _placed(self, out: ReserveOutcome, sent: float) -> None:
        (view,) = out.holds
        self.amount_uecu = view.amount_uecu
        self.quote = out.quotes[0] if out.quotes else None
        self.rate_card_version = view.rate_card_version
        self.deadline_unix_ms = view.deadline_unix_ms
        self.available_uecu = out.available_uecu
        self.state = view.state
        if not self._ttl_ms:
            # The sidecar's default TTL: read off the deadline against this host's clock (the
            # sidecar's Redis must agree with it within the margin; pass ttl_ms to be exact).
            self._ttl_ms = max(1, view.deadline_unix_ms - int(time.time() * 1000))
        self._covered(sent, 0)

    def _covered(self, sent: float, ttl_ms: int) -> None:
        """A hold placed or extended by a call sent at ``sent`` (monotonic) lives at least
        ``ttl_ms`` (0: its own TTL) from then: the sidecar's clock read the time after the
        call left, and an extend never shortens a deadline. Extend again before the margin."""
        ttl_s = (ttl_ms or self._ttl_ms) / 1000
        self._extend_due = sent + ttl_s - self.keepalive_margin * (self._ttl_ms / 1000)

    def _keepalive_wait_s(self) -> float:
        return max(self._extend_due - time.monotonic(), _KEEPALIVE_MIN_WAIT_S)

    def _keepalive_failed(self, error: BaseException) -> bool:
        """Record a failed keep-alive extend; True when the keep-alive should try again."""
        self.keepalive_error = error
        if isinstance(error, QuotaError) and error.code in RETRYABLE_CODES:
            # The hold may still be alive: try again well before the deadline.
            retry_s = max(self.keepalive_margin * self._ttl_ms / 4000, _KEEPALIVE_MIN_WAIT_S)
            self._extend_due = time.monotonic() + retry_s
            log.warning(
                "keep-alive could not extend hold %s/%s (retrying in %.3fs): %s",
                self.organization,
                self.reservation_id,
                retry_s,
                error,
            )
            return True
        log.warning(
            "keep-alive of hold %s/%s stopped: %s",
            self.organization,
            self.reservation_id,
            error,
        )
        return False

    def _keepalive_due(self) -> bool:
        """Whether the keep-alive (holding the lock) should extend now."""
        return self.state is HoldState.ACTIVE and time.monotonic() >= self._extend_due

    def _commit_call(
        self, actual_uecu: int, usage: Usage | None, usage_lines: Sequence[Any] | None
    ) -> _Call[CommitOutcome]:
        if usage_lines is None:
            return _commit(self.organization, self.reservation_id, actual_uecu, usage=usage)
        if not self.rate_card_version:
            raise invalid(
                "usage_lines",
                "this hold was reserved with an amount, not a job: it has no rate card version "
                "to price usage with; commit the actual amount instead",
            )
        return _commit(
            self.organization,
            self.reservation_id,
            actual_uecu,
            usage=usage,
            usage_lines=usage_lines,
            rate_card_version=self.rate_card_version,
        )

    def _committed(self, out: CommitOutcome) -> CommitOutcome:
        self.state, self.committed, self._commit_in_doubt = HoldState.COMMITTED, out, False
        return out

    def _commit_failed(self, error: QuotaError) -> None:
        # After retries ran out the commit may still have landed; releasing now would make the
        # caller's own retry of the commit fail, and the usage would never be billed.
        if error.code in RETRYABLE_CODES:
            self._commit_in_doubt = True

    def _release_call(self) -> _Call[ReleaseOutcome]:
        return _release(self.organization, self.reservation_id)

    def _released(self, out: ReleaseOutcome) -> ReleaseOutcome:
        self.state = out.state
        return out

    def _extend_call(self, ttl_ms: int) -> _Call[ExtendOutcome]:
        # Advance before sending (under the hold's lock): a number never reused for another
        # heartbeat, even when this one's outcome is unknown; retries inside the call layer
        # resend the same number.
        call = _extend(
            self.organization, self.reservation_id, sequence=self.sequence + 1, ttl_ms=ttl_ms
        )
        self.sequence += 1
        return call

    def _extended(self, out: ExtendOutcome, sent: float, ttl_ms: int) -> ExtendOutcome:
        self.deadline_unix_ms = out.deadline_unix_ms
        self._covered(sent, ttl_ms)
        return out

    def _must_release_on_exit(self) -> bool:
        return self.state is HoldState.ACTIVE and not self._commit_in_doubt

    def _release_failed_on_exit(self, error: QuotaError, block_error: BaseException | None) -> None:
        if block_error is None:
            raise error
        log.warning(
            "could not release hold %s/%s after %s: %s (it expires at its deadline)",
            self.organization,
            self.reservation_id,
            type(block_error).__name__,
            error,
        )


class AsyncHold(_HoldBase):
    """A hold placed on entering ``async with client.hold(...)``, released unless committed,
    kept alive by a background task while the block runs (unless ``keepalive=False``)."""

    def __init__(
        self, client: AsyncQuotaClient, reserve: _Call[ReserveOutcome], **keepalive: Any
    ) -> None:
        super().__init__(reserve, **keepalive)
        self._client = client
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncHold:
        sent = time.monotonic()
        self._placed(await self._client._invoke(self._reserve_call), sent)
        if self.keepalive and self.state is HoldState.ACTIVE:
            self._keeper = asyncio.create_task(
                self._keep_alive(), name=f"ecu-keepalive-{self.reservation_id}"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_keepalive()
        if self._must_release_on_exit():
            try:
                await self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_wait_s())
            async with self._lock:
                if self.state is not HoldState.ACTIVE:
                    return
                if not self._keepalive_due():  # the caller extended meanwhile
                    continue
                try:
                    await self._extend_locked(0)
                except Exception as error:  # never into the block: recorded, logged
                    if not self._keepalive_failed(error):
                        return
                else:
                    self.keepalive_extends += 1

    async def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait([keeper])

    async def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(await self._client._invoke(call), sent, ttl_ms)

    async def commit(
        self,
        actual_uecu: int = 0,
        *,
        usage: Usage | None = None,
        usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    ) -> CommitOutcome:
        """Settle the hold with what the step really cost, or with the ``usage_lines`` it used
        (a hold placed with ``job=``: priced by the sidecar with the hold's pinned rate card
        version). A replay answers the same."""
        call = self._commit_call(actual_uecu, usage, usage_lines)
        async with self._lock:
            try:
                return self._committed(await self._client._invoke(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    async def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        async with self._lock:
            return self._released(await self._client._invoke(self._release_call()))

    async def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        async with self._lock:
            return await self._extend_locked(ttl_ms)


class Hold(_HoldBase):
    """A hold placed on entering ``with client.hold(...)``, released unless committed, kept
    alive by a background thread while the block runs (unless ``keepalive=False``)."""

    def __init__(
        self, client: QuotaClient, reserve: _Call[ReserveOutcome], **keepalive: Any
    ) -> None:
        super().__init__(reserve, **keepalive)
        self._client = client
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def __enter__(self) -> Hold:
        sent = time.monotonic()
        self._placed(self._client._invoke(self._reserve_call), sent)
        if self.keepalive and self.state is HoldState.ACTIVE:
            self._stop.clear()
            self._keeper = threading.Thread(
                target=self._keep_alive, name=f"ecu-keepalive-{self.reservation_id}", daemon=True
            )
            self._keeper.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_keepalive()
        if self._must_release_on_exit():
            try:
                self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._keepalive_wait_s()):
            with self._lock:
                if self._stop.is_set() or self.state is not HoldState.ACTIVE:
                    return
                if not self._keepalive_due():  # the caller extended meanwhile
                    continue
                try:
                    self._extend_locked(0)
                except Exception as error:  # never into the block: recorded, logged
                    if not self._keepalive_failed(error):
                        return
                else:
                    self.keepalive_extends += 1

    def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        self._stop.set()
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join()  # at most one extend in flight, bounded by the call's retries

    def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(self._client._invoke(call), sent, ttl_ms)

    def commit(
        self,
        actual_uecu: int = 0,
        *,
        usage: Usage | None = None,
        usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    ) -> CommitOutcome:
        """Settle the hold with what the step really cost, or with the ``usage_lines`` it used
        (a hold placed with ``job=``: priced by the sidecar with the hold's pinned rate card
        version). A replay answers the same."""
        call = self._commit_call(actual_uecu, usage, usage_lines)
        with self._lock:
            try:
                return self._committed(self._client._invoke(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        with self._lock:
            return self._released(self._client._invoke(self._release_call()))

    def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        with self._lock:
            return self._extend_locked(ttl_ms)


_KEEPALIVE_PARAMETERS = (
    inspect.Parameter("keepalive", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
    inspect.Parameter(
        "keepalive_margin",
        inspect.Parameter.KEYWORD_ONLY,
        default=DEFAULT_KEEPALIVE_MARGIN,
        annotation="float",
    ),
)


def _hold_method(
    build: Callable[P, _Call[ReserveOutcome]], hold_cls: Callable[..., H]
) -> Callable[Concatenate[Any, P], H]:
    """A ``hold`` method: builds the reservation (fixing its id) without placing it yet; the
    reservation's arguments plus ``keepalive`` and ``keepalive_margin``."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> H:
        keepalive = {k: kwargs.pop(k) for k in ("keepalive", "keepalive_margin") if k in kwargs}
        return hold_cls(self, build(*args, **kwargs), **keepalive)

    _expose(build, method, getattr(hold_cls, "__name__", inspect.Signature.empty))
    sig: inspect.Signature = method.__signature__  # type: ignore[attr-defined]
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), *_KEEPALIVE_PARAMETERS]
    )
    method.__name__ = method.__qualname__ = "hold"
    method.__doc__ = (
        "A context manager placing the hold on entry; released on exception or unless "
        "committed. While the block runs the hold is extended whenever ``keepalive_margin`` "
        f"(default {DEFAULT_KEEPALIVE_MARGIN:.3g}) of its TTL is left; ``keepalive=False`` "
        "turns that off."
    )
    return method


# -- clients -----------------------------------------------------------------------------------


class _ClientBase:
    """Connection settings shared by both flavours."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ) -> None:
        """Settings only; the channel opens on the first call. Interceptors of the flavour."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        """The sidecar's host:port."""
        self.timeout_s = timeout_s
        """Deadline of each attempt of each call."""
        self.retry = retry or RetryPolicy()
        """Which failures are retried, how often and after what pause."""
        self._admin_token = admin_token or ""
        self._options = [*_CHANNEL_OPTIONS, *channel_options]
        self._interceptors = list(interceptors)

    def _metadata(self, call: _Call[Any]) -> tuple[tuple[str, str], ...] | None:
        if call.admin and self._admin_token:
            return (("authorization", f"Bearer {self._admin_token}"),)
        return None


class AsyncQuotaClient(_ClientBase):
    """The asyncio client (grpc.aio); use as ``async with AsyncQuotaClient(...) as client``."""

    _channel: grpc.aio.Channel | None = None
    _stub: quota_pb2_grpc.QuotaStub | None = None

    def _get_stub(self) -> quota_pb2_grpc.QuotaStub:
        # Opened lazily: a grpc.aio channel belongs to the running event loop.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=self._options, interceptors=self._interceptors or None
            )
            self._stub = quota_pb2_grpc.QuotaStub(self._channel)
        return self._stub

    async def _invoke(self, call: _Call[T]) -> T:
        rpc = getattr(self._get_stub(), call.method)
        metadata = self._metadata(call)
        failures: list[grpc.RpcError] = []
        since = 0.0
        while True:
            try:
                response = await rpc(
                    call.request,
                    timeout=self.timeout_s,
                    metadata=metadata,
                    wait_for_ready=bool(failures),
                )
            except grpc.RpcError as exc:
                if not failures:
                    since = time.monotonic()
                failures.append(exc)
                if not retry_after(self.retry, call.method, failures, since):
                    raise give_up(failures) from exc
                await asyncio.sleep(self.retry.backoff_s(len(failures)))
                continue
            return call.convert(response)

    async def close(self) -> None:
        """Close the channel (in-flight calls are cancelled)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncQuotaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    reserve = _async_rpc(_reserve)
    reserve_batch = _async_rpc(_reserve_batch)
    commit = _async_rpc(_commit)
    commit_batch = _async_rpc(_commit_batch)
    release = _async_rpc(_release)
    extend = _async_rpc(_extend)
    balance = _async_rpc(_balance)
    grant = _async_rpc(_grant)
    set_cap = _async_rpc(_set_cap)
    set_auto_topup = _async_rpc(_set_auto_topup)
    preview = _async_rpc(_preview)
    rate_card = _async_rpc(_rate_card)
    hold = _hold_method(_reserve, AsyncHold)


class QuotaClient(_ClientBase):
    """The blocking client (grpc channel); use as ``with QuotaClient(...) as client``."""

    _channel: grpc.Channel | None = None
    _stub: quota_pb2_grpc.QuotaStub | None = None
    _opening = threading.Lock()  # threads may share a client; open one channel, not several

    def _get_stub(self) -> quota_pb2_grpc.QuotaStub:
        with self._opening:
            if self._stub is None:
                self._channel = grpc.insecure_channel(self.target, options=self._options)
                channel = grpc.intercept_channel(self._channel, *self._interceptors)
                self._stub = quota_pb2_grpc.QuotaStub(channel)
            return self._stub

    def _invoke(self, call: _Call[T]) -> T:
        rpc = getattr(self._get_stub(), call.method)
        metadata = self._metadata(call)
        failures: list[grpc.RpcError] = []
        since = 0.0
        while True:
            try:
                response = rpc(
                    call.request,
                    timeout=self.timeout_s,
                    metadata=metadata,
                    wait_for_ready=bool(failures),
                )
            except grpc.RpcError as exc:
                if not failures:
                    since = time.monotonic()
                failures.append(exc)
                if not retry_after(self.retry, call.method, failures, since):
                    raise give_up(failures) from exc
                time.sleep(self.retry.backoff_s(len(failures)))
                continue
            return call.convert(response)

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    reserve = _sync_rpc(_reserve)
    reserve_batch = _sync_rpc(_reserve_batch)
    commit = _sync_rpc(_commit)
    commit_batch = _sync_rpc(_commit_batch)
    release = _sync_rpc(_release)
    extend = _sync_rpc(_extend)
    balance = _sync_rpc(_balance)
    grant = _sync_rpc(_grant)
    set_cap = _sync_rpc(_set_cap)
    set_auto_topup = _sync_rpc(_set_auto_topup)
    preview = _sync_rpc(_preview)
    rate_card = _sync_rpc(_rate_card)
    hold = _hold_method(_reserve, Hold)
