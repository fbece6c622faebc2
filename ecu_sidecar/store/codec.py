"""The scripts' arguments and replies: domain values to ARGV, reply arrays to outcomes (each
script's contract is in the header of its .lua file)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ecu_sidecar.errors import BY_REASON, EcuError, JobClosed
from ecu_sidecar.jobs import JobAccuracy, JobApproval, JobPolicy, JobState, JobView
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    CommitOutcome,
    HoldState,
    HoldView,
    KnownHold,
    LedgerAccount,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
)

__all__ = [
    "balance_reply",
    "commit_args",
    "commit_reply",
    "hydrate_args",
    "reserve_args",
    "reserve_reply",
    "script_error",
    "text",
]

_BALANCE_FIELDS = {
    "granted": "granted_uecu",
    "balance": "balance_uecu",
    "held": "held_uecu",
    "committed": "committed_uecu",
    "reserved": "reserved_uecu",
    "committed_from_holds": "committed_from_holds_uecu",
    "released": "released_uecu",
    "expired": "expired_uecu",
    "overage": "overage_uecu",
    "unbilled_overage": "unbilled_overage_uecu",
    "late_committed": "late_committed_uecu",
    "expired_holds": "expired_holds",
    "expired_grants": "expired_grants_uecu",
    "orphan_committed": "orphan_committed_uecu",
    "late_unbilled": "late_unbilled_uecu",
    "carried_committed": "carried_committed_uecu",
    "repaired": "repaired_uecu",
    "atu_a": "auto_topup_amount_uecu",
}

#: Notification kinds in the order the hydrate script takes their "already sent" flags.
_NOTICE_FLAGS = ("low_balance_20", "low_balance_5", "auto_topup_requested")

#: A hold's state as the scripts reply it (one-letter bytes), to the enum.
_HOLD_STATES = {state.value.encode(): state for state in HoldState}


def text(value: Any) -> str:
    """A reply value (bytes, or already text or a number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def script_error(reply: list[Any]) -> EcuError:
    """A script's refusal ``{'ERR', reason, message, name, value, ...}`` as its domain error."""
    reason, message = text(reply[1]), text(reply[2])
    meta = {text(reply[i]): text(reply[i + 1]) for i in range(3, len(reply) - 1, 2)}
    if reason == JobClosed.reason:  # the scripts name the state by its stored letter
        meta["state"] = JobState(meta["state"]).word
    return BY_REASON[reason](message, **meta)


def reserve_args(
    account: AccountRef, items: Sequence[ReserveItem], default_ttl_ms: int, job_id: str
) -> list[Any]:
    """reserve.lua's arguments after the common four."""
    args: list[Any] = [account.team, account.project, account.user, job_id, len(items)]
    for it in items:
        args += [
            it.reservation_id, it.amount_uecu, it.job_type.value, it.model,
            it.ttl_ms or default_ttl_ms, it.rate_card_version, it.fingerprint,
        ]  # fmt: skip
    return args


def reserve_reply(r: list[Any]) -> ReserveOutcome:
    """reserve.lua's reply."""
    states = _HOLD_STATES
    holds = [
        HoldView(r[i].decode(), r[i + 1], r[i + 2], states[r[i + 3]], r[i + 4].decode())
        for i in range(4, len(r), 5)
    ]
    room = None if r[3] in (b"", "") else int(r[3])
    return ReserveOutcome(holds, int(r[1]), bool(r[2]), job_room_uecu=room)


def job_args(op: str, job_id: str, account: AccountRef | None = None,
             approval: JobApproval | None = None, ttl_ms: int = 0,
             overage_max_percent: int = 0) -> list[Any]:  # fmt: skip
    """job.lua's arguments after the common four."""
    if approval is None or account is None:
        return [op, job_id]
    return [
        op, job_id, approval.amount_uecu, approval.job_type.value, account.team,
        account.project, account.user, approval.rate_card_version, approval.policy.value,
        ttl_ms, overage_max_percent, approval.fingerprint,
    ]  # fmt: skip


def job_reply(job_id: str, r: list[Any]) -> JobView:
    """job.lua's reply."""
    return JobView(
        job_id=job_id,
        state=JobState(text(r[3])),
        approved_uecu=int(r[4]),
        extra_uecu=int(r[5]),
        extra_max_uecu=int(r[6]),
        room_uecu=int(r[7]),
        steps_held_uecu=int(r[8]),
        committed_uecu=int(r[9]),
        steps=int(r[10]),
        steps_committed=int(r[11]),
        steps_ended=int(r[12]),
        policy=JobPolicy(text(r[13])),
        team=text(r[14]),
        project=text(r[15]),
        user=text(r[16]),
        job_type=text(r[17]),
        rate_card_version=text(r[18]),
        ttl_ms=int(r[19]),
        deadline_unix_ms=int(r[20]),
        opened_at_ms=int(r[21]),
        ended_at_ms=int(r[22]),
        returned_uecu=int(r[23]),
        available_uecu=int(r[2]),
        replayed=bool(r[1]),
    )


def commit_args(
    items: Sequence[CommitItem],
    overage_max_percent: int,
    known: Mapping[str, KnownHold] | None,
) -> list[Any]:
    """commit.lua's arguments after the common four."""
    args: list[Any] = [overage_max_percent, len(known) if known else 0, len(items)]
    for it in items:
        u = it.usage
        args += [
            it.reservation_id, it.actual_uecu, u.tokens_in, u.tokens_out, u.calls,
            it.rate_card_version, it.breakdown,
        ]  # fmt: skip
    for rid, k in (known or {}).items():
        args += [
            rid, "D" if k.kind == "degraded" else "L", k.amount_uecu, k.t0_ms, k.team,
            k.project, k.user, k.job_type, k.model,
        ]  # fmt: skip
    return args


def commit_reply(r: list[Any]) -> CommitBatchOutcome:
    """commit.lua's reply: each item's outcome or error."""
    out = []
    for i in range(2, len(r), 10):
        rid, status = r[i].decode(), r[i + 1]
        if status != b"OK":
            error = BY_REASON[status.decode()](r[i + 2].decode(), reservation_id=rid)
            out.append(CommitOutcome(rid, available_uecu=int(r[1]), error=error))
            continue
        out.append(
            CommitOutcome(
                rid,
                committed_uecu=int(r[i + 3]),
                released_uecu=int(r[i + 4]),
                overage_uecu=int(r[i + 5]),
                unbilled_overage_uecu=int(r[i + 6]),
                late=bool(r[i + 7]),
                replayed=bool(r[i + 8]),
                available_uecu=int(r[i + 9]),
            )
        )
    return CommitBatchOutcome(out, int(r[1]))


def balance_reply(org: str, r: list[Any]) -> Balance:
    """balance.lua's reply: the counters, caps and usage by team and project."""
    fields = {text(r[i]): text(r[i + 1]) for i in range(2, len(r), 2)}
    values = {attr: int(fields.get(name, 0)) for name, attr in _BALANCE_FIELDS.items()}
    scopes: dict[str, dict[str, dict[str, int]]] = {"t": {}, "p": {}, "js": {}}
    for name, value in fields.items():
        kind, sep, rest = name.partition(":")
        if sep and kind in scopes:
            scope_id, _, attr = rest.rpartition(":")
            scopes[kind].setdefault(scope_id, {})[attr] = int(value)
    teams, projects = (
        [
            ScopeUsage(sid, c.get("cap"), c.get("held", 0), c.get("used", 0))
            for sid, c in sorted(scopes[k].items())
        ]
        for k in ("t", "p")
    )
    threshold = fields.get("atu_t")
    return Balance(
        organization=org,
        outstanding_holds=int(r[1]),
        teams=teams,
        projects=projects,
        auto_topup_threshold_uecu=int(threshold) if threshold else None,
        job_accuracy={
            job: JobAccuracy(job, c.get("n", 0), c.get("c", 0), c.get("a", 0))
            for job, c in scopes["js"].items()
        },
        **values,
    )


def hydrate_args(
    account: LedgerAccount, flushed_id: str, group: str, force: bool, epoch: str
) -> list[Any]:
    """hydrate.lua's arguments after the common four."""
    flags = set(account.notified)
    args: list[Any] = [
        flushed_id,
        group,
        "1" if force else "0",
        account.granted_uecu,
        account.expired_grants_uecu,
        account.committed_uecu,
        account.generation,
        "" if account.auto_topup_threshold_uecu is None else account.auto_topup_threshold_uecu,
        account.auto_topup_amount_uecu,
        "" if account.notice_reference_uecu is None else account.notice_reference_uecu,
        *("1" if kind in flags else "" for kind in _NOTICE_FLAGS),
        len(account.scopes),
    ]
    for scope, scope_id, cap, used in account.scopes:
        args += [scope[0], scope_id, "" if cap is None else cap, used]
    args.append(len(account.expiring_grants))
    for grant_id, expires_ms, rest in account.expiring_grants:
        args += [grant_id, expires_ms, rest]
    args.append(len(account.recent_grants))
    for grant_id, amount, kind, expires_ms in account.recent_grants:
        args += [grant_id, amount, kind, expires_ms]
    args.append(len(account.active_holds))
    for h in account.active_holds:
        args += [
            h.reservation_id, h.amount_uecu, h.t0_ms, h.deadline_ms, h.ttl_ms, h.sequence,
            h.team, h.project, h.user, h.job_type, h.model, h.rate_card_version, h.job_id,
        ]  # fmt: skip
    args.append(len(account.jobs))
    for j in account.jobs:
        args += [
            j.job_id, j.state.value, j.approved_uecu, j.extra_uecu, j.extra_max_uecu,
            j.room_uecu, j.steps_held_uecu, j.committed_uecu, j.steps, j.steps_committed,
            j.steps_ended, j.policy.value, j.team, j.project, j.user, j.job_type,
            j.rate_card_version, j.ttl_ms, j.opened_at_ms, j.ended_at_ms, j.returned_uecu,
        ]  # fmt: skip
    args.append(len(account.job_accuracy))
    for a in account.job_accuracy:
        args += [a.job_type, a.jobs, a.committed_uecu, a.approved_uecu]
    args.append(epoch)
    return args
