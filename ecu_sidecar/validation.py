"""Edge validation: every caller-supplied value is checked here before any store call.

Identifiers become parts of Redis keys and hash fields, so their alphabet excludes everything
that could leave a key namespace or hash tag: ``{``, ``}``, ``:``, whitespace and control
characters. Amounts are integers bounded far below 2^53 so Lua doubles stay exact.
Each failure raises InvalidArgument naming the request field (proto field path); a batch item's
field is named ``items[i].<field>`` (``item=i``), a path built only when a check fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ecu_sidecar.errors import InvalidArgument, OrganizationNotAllowed
from ecu_sidecar.jobs import JobApproval, JobPolicy
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    MAX_REQUEST_UECU,
    AccountRef,
    CommitItem,
    GrantKind,
    JobType,
    ReserveItem,
    Usage,
)

__all__ = [
    "CALLER_ID_MAX",
    "ID_PATTERN",
    "MAX_COUNT",
    "MODEL_MAX",
    "MODEL_PATTERN",
    "MODEL_REQUIRED",
    "SCOPE_ID_MAX",
    "check_account",
    "check_amount",
    "check_approval",
    "check_batch_size",
    "check_cap",
    "check_commit",
    "check_count",
    "check_expiry",
    "check_grant_kind",
    "check_id",
    "check_job_type",
    "check_model",
    "check_optional_id",
    "check_org",
    "check_reservation_id",
    "check_scope",
    "check_sequence",
    "check_step",
    "check_total",
    "check_ttl",
    "check_usage_lines",
    "field_path",
]

#: Organizations, teams, projects, users: 1-64 characters.
SCOPE_ID_MAX = 64
#: Reservation and grant ids: 1-128 characters (a UUID or a ULID fits with room to spare).
CALLER_ID_MAX = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
#: Model names are attribution only (never part of a key) and may carry a provider and version.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._/@+:-]+")
MODEL_MAX = 128
#: Token and call counts: any non-negative integer below 2^53.
MAX_COUNT = 2**53 - 1
#: Job types whose steps name their model (unless priced from a job spec, which names it).
MODEL_REQUIRED = frozenset({JobType.INFERENCE, JobType.JUDGE})
#: Latest expiry a grant may carry (year 9999), so it stays a sane epoch in milliseconds.
MAX_EPOCH_MS = 253_402_300_799_000
#: Extend sequence numbers: 1 to 2^53 - 1 (exact in Lua).
MAX_SEQUENCE = 2**53 - 1


def field_path(item: int | None, field: str) -> str:
    """The path of ``field`` in batch item ``item`` (None: a field of the request itself)."""
    return field if item is None else f"items[{item}].{field}"


def _is_int(value: object) -> bool:
    """An integer, and not a bool (True is an int to Python, never an amount to us)."""
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


# -- values -----------------------------------------------------------------------------------


def check_id(
    field: str, value: str, max_len: int = SCOPE_ID_MAX, *, item: int | None = None
) -> str:
    """A required identifier."""
    if not value:
        raise InvalidArgument(field_path(item, field), "is required")
    return _check_id_text(field, value, max_len, item)


def check_optional_id(
    field: str, value: str, max_len: int = SCOPE_ID_MAX, *, item: int | None = None
) -> str:
    """An identifier that may be empty (no team, no project, no user)."""
    if not value:
        return ""
    return _check_id_text(field, value, max_len, item)


def _check_id_text(field: str, value: str, max_len: int, item: int | None) -> str:
    if len(value) > max_len:
        raise InvalidArgument(
            field_path(item, field), f"must be at most {max_len} characters, got {len(value)}"
        )
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field_path(item, field),
            "may contain only letters, digits, '.', '_' and '-' (no '{', '}', ':', spaces)",
        )
    return value


def check_model(field: str, value: str, required: bool, *, item: int | None = None) -> str:
    """A model name: required for inference and judge steps, optional otherwise."""
    if not value:
        if required:
            raise InvalidArgument(field_path(item, field), "is required for this job type")
        return ""
    if len(value) > MODEL_MAX:
        raise InvalidArgument(
            field_path(item, field), f"must be at most {MODEL_MAX} characters, got {len(value)}"
        )
    if not MODEL_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field_path(item, field),
            "may contain only letters, digits and . _ / @ + : - (no braces, no spaces)",
        )
    return value


def check_amount(
    field: str, value: int, *, allow_zero: bool = False, item: int | None = None
) -> int:
    """An amount of µECU: a positive (or non-negative) integer at most MAX_REQUEST_UECU."""
    if not _is_int(value):
        raise InvalidArgument(
            field_path(item, field),
            f"must be an integer number of uECU, got {type(value).__name__}",
        )
    if value < (0 if allow_zero else 1):
        raise InvalidArgument(
            field_path(item, field), f"must be {'>= 0' if allow_zero else '> 0'} uECU, got {value}"
        )
    if value > MAX_REQUEST_UECU:
        raise InvalidArgument(
            field_path(item, field), f"must be at most {MAX_REQUEST_UECU} uECU, got {value}"
        )
    return value


def check_count(field: str, value: int, *, item: int | None = None) -> int:
    """A token or call count: 0 <= value < 2^53."""
    if not _is_int(value):
        raise InvalidArgument(
            field_path(item, field), f"must be an integer, got {type(value).__name__}"
        )
    if not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(
            field_path(item, field), f"must be between 0 and {MAX_COUNT}, got {value}"
        )
    return value


def check_ttl(field: str, ttl_ms: int, min_ms: int, max_ms: int, *, item: int | None = None) -> int:
    """A hold lifetime in ms: 0 (the default) or between ``min_ms`` and ``max_ms``."""
    if not _is_int(ttl_ms):
        raise InvalidArgument(field_path(item, field), "must be an integer number of milliseconds")
    if ttl_ms and not min_ms <= ttl_ms <= max_ms:
        raise InvalidArgument(
            field_path(item, field),
            f"must be 0 (default) or between {min_ms} and {max_ms} ms, got {ttl_ms}",
        )
    return ttl_ms


# -- requests ---------------------------------------------------------------------------------


def check_org(field: str, org: str, allowed: frozenset[str]) -> str:
    """A valid organization id this sidecar may act for (``allowed``: ECU_ALLOWED_ORGS, empty
    for any)."""
    check_id(field, org)
    if allowed and org not in allowed:
        raise OrganizationNotAllowed(
            f"{field}: organization {org} is not one this sidecar may act for", field=field
        )
    return org


def check_account(account: AccountRef, allowed: frozenset[str]) -> AccountRef:
    """The ``account`` of a request: who pays, and the caps it counts against."""
    check_org("account.organization", account.organization, allowed)
    check_optional_id("account.team", account.team)
    check_optional_id("account.project", account.project)
    check_optional_id("account.user", account.user)
    return account


def check_batch_size(n: int, max_items: int) -> None:
    """A batch's ``items``: 1 to ``max_items`` (ECU_MAX_BATCH_ITEMS) of them."""
    if n == 0:
        raise InvalidArgument("items", "must hold at least one item")
    if n > max_items:
        raise InvalidArgument("items", f"must hold at most {max_items} items, got {n}")


def check_reservation_id(rid: str, seen: set[str], *, item: int | None = None) -> str:
    """An item's reservation id, distinct from those ``seen`` before it in its request (then
    added to them)."""
    check_id("reservation_id", rid, CALLER_ID_MAX, item=item)
    if rid in seen:
        raise InvalidArgument(
            field_path(item, "reservation_id"), f"{rid} appears twice in the batch"
        )
    seen.add(rid)
    return rid


def check_step(
    it: ReserveItem,
    min_ttl_ms: int,
    max_ttl_ms: int,
    *,
    priced: bool = False,
    item: int | None = None,
) -> ReserveItem:
    """A step to hold, field by field: its amount (a caller's; ``priced``: the job spec's,
    whose model the spec names), job type, model and TTL (0: the default)."""
    if not priced:
        if it.job is not None:
            if it.amount_uecu:
                raise InvalidArgument(
                    field_path(item, "amount_uecu"), "give amount_uecu or job, not both"
                )
            return it  # the rest is checked once the job spec is priced
        check_amount("amount_uecu", it.amount_uecu, item=item)
    job_type = check_job_type("job_type", it.job_type, item=item)
    check_model("model", it.model, job_type in MODEL_REQUIRED and not priced, item=item)
    check_ttl("ttl_ms", it.ttl_ms, min_ttl_ms, max_ttl_ms, item=item)
    return it


def check_job_type(field: str, job_type: JobType, *, item: int | None = None) -> JobType:
    """A job type, named as on the wire when refused (JOB_TYPE_INFERENCE)."""
    if type(job_type) is not JobType:
        raise InvalidArgument(
            field_path(item, field),
            f"must be one of {', '.join(j.wire_name for j in JobType)}, got {job_type}",
        )
    return job_type


def check_approval(approval: JobApproval, min_ttl_ms: int, max_ttl_ms: int) -> JobApproval:
    """An approved job's fields, but its job spec (checked by pricing it): the job id (a caller
    id, like a reservation id), the approved total, the job type (optional with a spec, which
    names it), the rate card version (required with a spec, the quote's; none without), the
    policy and the abandonment ttl (0: the default)."""
    check_id("job_id", approval.job_id, CALLER_ID_MAX)
    check_amount("approved_total_uecu", approval.amount_uecu)
    if approval.spec is None:
        check_job_type("job_type", approval.job_type)
        if approval.rate_card_version:
            raise InvalidArgument(
                "rate_card_version",
                "is only meaningful with job (the previewed spec its quote priced)",
            )
    else:
        if approval.job_type is not None:
            check_job_type("job_type", approval.job_type)
        if not approval.rate_card_version:
            raise InvalidArgument(
                "rate_card_version",
                "is required with job: the rate_card_version of the preview's quote",
            )
    if not isinstance(approval.policy, JobPolicy):
        raise InvalidArgument(
            "policy",
            "must be JOB_POLICY_UNSPECIFIED (refuse), "
            f"{', '.join(p.wire_name for p in JobPolicy)}, got {approval.policy}",
        )
    check_ttl("ttl_ms", approval.ttl_ms, min_ttl_ms, max_ttl_ms)
    return approval


def check_usage_lines(it: CommitItem, *, item: int | None = None) -> CommitItem:
    """A commit priced from usage lines, before pricing: the lines carry the amount and the
    usage, and the rate card version the hold was priced with is named. No line at all (the
    job made no call) prices at 0."""
    if not it.usage_lines and (it.actual_uecu or it.usage != Usage()):
        raise InvalidArgument(
            field_path(item, "rate_card_version"),
            "is only meaningful with usage_lines (a commit of actual_uecu or usage names no "
            "version; naming only the version commits an empty usage list at 0)",
        )
    if it.actual_uecu:
        raise InvalidArgument(
            field_path(item, "actual_uecu"), "give actual_uecu or usage_lines, not both"
        )
    if it.usage != Usage():
        raise InvalidArgument(
            field_path(item, "usage"),
            "give usage or usage_lines, not both (lines carry the usage)",
        )
    if not it.rate_card_version:
        raise InvalidArgument(
            field_path(item, "rate_card_version"),
            "is required with usage_lines (the version the hold was priced with)",
        )
    return it


def check_commit(it: CommitItem, *, priced: bool = False, item: int | None = None) -> CommitItem:
    """A commit's actual amount and usage counts (``priced``: summed from its usage lines)."""
    u = it.usage
    if priced:
        for count in (u.tokens_in, u.tokens_out, u.calls):
            check_count("usage_lines", count, item=item)
    elif it.rate_card_version:
        raise InvalidArgument(
            field_path(item, "rate_card_version"), "is only meaningful with usage_lines"
        )
    check_amount("actual_uecu", it.actual_uecu, allow_zero=True, item=item)
    check_count("usage.tokens_in", u.tokens_in, item=item)
    check_count("usage.tokens_out", u.tokens_out, item=item)
    check_count("usage.calls", u.calls, item=item)
    return it


def check_total(amounts: Iterable[int]) -> None:
    """The items of one request together move at most MAX_REQUEST_UECU."""
    total = sum(amounts)
    if total > MAX_REQUEST_UECU:
        raise InvalidArgument(
            "items", f"total amount must be at most {MAX_REQUEST_UECU} uECU, got {total}"
        )


def check_sequence(sequence: int) -> int:
    """An extend's heartbeat number: 1 to 2^53 - 1."""
    if not _is_int(sequence) or not 1 <= sequence <= MAX_SEQUENCE:
        raise InvalidArgument(
            "sequence", f"must be an integer from 1 to {MAX_SEQUENCE}, got {sequence}"
        )
    return sequence


def check_grant_kind(kind: GrantKind) -> GrantKind:
    """Why an organization is credited."""
    if not isinstance(kind, GrantKind):
        raise InvalidArgument(
            "kind", f"must be one of {', '.join(k.wire_name for k in GrantKind)}, got {kind}"
        )
    return kind


def check_expiry(expires_at_ms: int) -> int:
    """A grant's expiry: 0 (never) or a Unix time in ms up to the year 9999."""
    if not _is_int(expires_at_ms) or not 0 <= expires_at_ms <= MAX_EPOCH_MS:
        raise InvalidArgument(
            "expires_at_unix_ms", f"must be 0 (never) or a Unix time in ms up to {MAX_EPOCH_MS}"
        )
    return expires_at_ms


def check_scope(scope: str) -> str:
    """What a cap applies to: ``team`` or ``project``."""
    if scope not in ("team", "project"):
        raise InvalidArgument("scope", f"must be CAP_SCOPE_TEAM or CAP_SCOPE_PROJECT, got {scope}")
    return scope


def check_cap(cap_uecu: int | None) -> int | None:
    """A team or project cap: None (no cap) or 0 to MAX_GRANTED_UECU."""
    if cap_uecu is not None and (not _is_int(cap_uecu) or not 0 <= cap_uecu <= MAX_GRANTED_UECU):
        raise InvalidArgument(
            "cap_uecu", f"must be between 0 and {MAX_GRANTED_UECU} uECU, got {cap_uecu}"
        )
    return cap_uecu
