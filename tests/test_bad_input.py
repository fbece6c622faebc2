"""The bad-input matrix over the gRPC API: every RPC, every input field, every invalid class.

Each invalid request must be answered INVALID_ARGUMENT with a message naming the field, a
google.rpc BadRequest whose first violation is that field path and an ErrorInfo with reason
INVALID_ARGUMENT, and must leave Redis byte-for-byte as it was. Every case starts from the
same seeded organization (funded, team and project caps, a live extended hold, a hold priced
from a job spec and pinned to the rate card, a committed and a released hold) so there is state
a wrongly accepted request could change.

The pricing inputs are covered the same way: every field of a job spec (Preview, Reserve and
ReserveBatch with ``job``, down to GEPA's per-iteration specs and a trace evaluation's judges),
every usage line field of Commit/CommitBatch, and the oneofs and lists a spec must fill. An
unknown model is refused naming its field, never priced as zero. Model limits (context window,
max output tokens) are read from the example rate card the sidecar serves, not pasted.

Refusals that are not about input (NOT_FOUND, RESOURCE_EXHAUSTED, ALREADY_EXISTS,
FAILED_PRECONDITION, ABORTED, UNAUTHENTICATED, ...) and identical replays must change nothing
either. A bounded hypothesis fuzz closes the module: Reserve/Commit/Release/Extend messages with
arbitrary values get only documented codes, and INVALID_ARGUMENT never comes with a state change.

The seed also approves two jobs (issue 16): one open, holding a step, and one closed; the job
RPCs (ApproveJob, GetJob, HeartbeatJob, CloseJob) and the job_id of Reserve and ReserveBatch go
through the same matrix.

Every hold and job lives for an hour, so nothing expires (and no sweep writes) during a test.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.convert import fingerprint, job_from_pb
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.jobs import JobApproval
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    MAX_REQUEST_UECU,
    AccountRef,
    CommitItem,
    GrantKind,
    JobType,
    ReserveItem,
)
from ecu_sidecar.pricing import ModelRates, RateCardRegistry, load_rate_card, preview
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from tests.conftest import ADMIN_METADATA, EXAMPLE_RATE_CARD, drop_keys, open_store, snapshot
from tests.test_service import details

ECU = 1_000_000
ORG = "acme"
TEAM = "team-a"
PROJECT = "proj-a"
USER = "user-a"
#: The live hold every case could wrongly touch (extended once, sequence 2).
HELD = "held-1"
HELD_UECU = 1 * ECU
HELD_SEQ = 2
#: A committed and a released hold (tombstones).
DONE = "done-1"
GONE = "gone-1"
HOUR_MS = 3_600_000
GRANTED = 10 * ECU
TEAM_CAP = 5 * ECU
PROJECT_CAP = 8 * ECU

MAX_TTL_MS = 86_400_000
MAX_EPOCH_MS = 253_402_300_799_000
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_BATCH = Settings().max_batch_items
JOB_MAX_TTL_MS = Settings().job_max_ttl_ms
#: An open job of the account (a plain amount) holding one step, and a closed one.
OPEN_JOB = "job-open-1"
OPEN_JOB_UECU = 1 * ECU
JOB_STEP = "job-step-1"
JOB_STEP_UECU = 100_000
CLOSED_JOB = "job-closed-1"

#: The card every test sidecar prices with (conftest.make_settings); limits are read from it.
CARD = load_rate_card(EXAMPLE_RATE_CARD)
V1 = CARD.version
#: A live hold priced from SEED_JOB, pinned to V1.
JOB_HELD = "job-held-1"
SEED_JOB = pb.JobSpec(
    items=[
        pb.JobItem(
            inference=pb.InferenceSpec(
                model="gpt-4o", prompt_tokens=2_000, max_output_tokens=1_000, samples=2
            )
        ),
        pb.JobItem(
            judge=pb.JudgeSpec(
                judge_model="gpt-4o-mini",
                calls=3,
                prompt_tokens_per_call=500,
                max_output_tokens_per_call=100,
            )
        ),
    ]
)

# -- the seeded state --------------------------------------------------------------------------


async def seed(engine: QuotaEngine) -> None:
    """Fund ORG, cap its team and project, and leave a live, a committed and a released hold."""
    await engine.grant(ORG, "seed-grant", GRANTED, GrantKind.TOP_UP)
    await engine.set_cap(ORG, "team", TEAM, TEAM_CAP)
    await engine.set_cap(ORG, "project", PROJECT, PROJECT_CAP)
    account = AccountRef(ORG, TEAM, PROJECT, USER)
    await engine.reserve(
        account,
        [
            ReserveItem(HELD, HELD_UECU, JobType.INFERENCE, "gpt-4o", HOUR_MS),
            ReserveItem(DONE, 200_000, JobType.GEPA, "", HOUR_MS),
            ReserveItem(GONE, 300_000, JobType.JUDGE, "judge-1", HOUR_MS),
            ReserveItem(
                JOB_HELD,
                0,
                None,  # type: ignore[arg-type]  # derived from the job, as the service does
                "",
                HOUR_MS,
                fingerprint=fingerprint(SEED_JOB),
                job=job_from_pb(SEED_JOB),
            ),
        ],
        batch=True,
    )
    await engine.extend(ORG, HELD, HOUR_MS, 1)
    await engine.extend(ORG, HELD, HOUR_MS, HELD_SEQ)
    await engine.commit(ORG, [CommitItem(DONE, 150_000)])
    await engine.release(ORG, GONE)
    for job_id in (OPEN_JOB, CLOSED_JOB):
        approval = JobApproval(job_id, OPEN_JOB_UECU, JobType.JUDGE, ttl_ms=HOUR_MS)
        await engine.approve_job(account, approval)
    await engine.job(ORG, CLOSED_JOB, "close")
    step = ReserveItem(JOB_STEP, JOB_STEP_UECU, JobType.JUDGE, "judge-1", HOUR_MS)
    await engine.reserve(account, [step], job_id=OPEN_JOB)


async def state(server: SidecarServer) -> dict[bytes, Any]:
    return await snapshot(server.settings)


async def seeded_state(server: SidecarServer) -> dict[bytes, Any]:
    """Seed, check the seed really left state behind, and return its snapshot."""
    await seed(server.engine)
    snap = await state(server)
    holds = next(v for k, v in snap.items() if k.endswith(b":holds"))[1]
    assert {HELD.encode(), DONE.encode(), GONE.encode(), JOB_HELD.encode()} <= set(holds)
    assert JOB_STEP.encode() in holds
    jobs = next(v for k, v in snap.items() if k.endswith(b":jobs"))[1]
    assert {OPEN_JOB.encode(), CLOSED_JOB.encode()} <= set(jobs)
    assert any(k.endswith(b":outbox") for k in snap)
    return snap


# -- calling the API ---------------------------------------------------------------------------

ADMIN_RPCS = frozenset({"Grant", "SetCap", "SetAutoTopUp"})


async def call(stub: Any, rpc: str, request: Message, metadata: Any = None) -> Message:
    if metadata is None and rpc in ADMIN_RPCS:
        metadata = ADMIN_METADATA
    return await getattr(stub, rpc)(request, metadata=metadata)


async def refused(stub: Any, rpc: str, request: Message, metadata: Any = None) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call(stub, rpc, request, metadata)
    return ei.value


def assert_invalid(exc: grpc.aio.AioRpcError, field: str) -> None:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    message = exc.details() or ""
    assert field in message, f"message {message!r} does not name {field!r}"
    d = details(exc)
    assert "BadRequest" in d, f"no BadRequest detail for {field!r}"
    assert d["BadRequest"].field_violations[0].field == field
    assert d["ErrorInfo"].reason == "INVALID_ARGUMENT"
    assert d["ErrorInfo"].domain == "ecu-sidecar"
    assert d["ErrorInfo"].metadata["field"] == field


# -- valid base requests, one per RPC; each case changes exactly the field(s) it names ---------

ACCOUNT = pb.Account(organization=ORG, team=TEAM, project=PROJECT, user=USER)


def chat(*messages: tuple[str, str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(
        messages=[pb.ChatMessage(role=r, content=c, name=n) for r, c, n in messages]
    )


#: Where each kind of spec sits in JOB (proto paths below ``job.``), and the model it uses.
INF = "items[0].inference"
JUDGE = "items[1].judge"
GEPA = "items[2].gepa"
GEPA_INF = f"{GEPA}.per_iteration[0].inference"
GEPA_JUDGE = f"{GEPA}.per_iteration[1].judge"
TRACE = "items[3].trace_eval"
TRACE_JUDGE = f"{TRACE}.judges[0]"
MODEL_AT = {
    INF: "gpt-4o",
    JUDGE: "gpt-4o-mini",
    GEPA_INF: "gpt-4-turbo",
    GEPA_JUDGE: "gpt-4o-mini",
    TRACE_JUDGE: "anthropic/claude-sonnet-4",
}

#: A valid job using every kind of spec and every way to give a prompt (text, chat messages,
#: a known token count); its worst case fits the team cap, so Reserve can hold it.
JOB = pb.JobSpec(
    items=[
        pb.JobItem(
            inference=pb.InferenceSpec(
                model=MODEL_AT[INF],
                prompt_text="Summarize the trace in three sentences.",
                max_output_tokens=500,
                samples=2,
            )
        ),
        pb.JobItem(
            judge=pb.JudgeSpec(
                judge_model=MODEL_AT[JUDGE],
                calls=3,
                messages=chat(
                    ("system", "You are a strict judge.", ""), ("user", "Grade it.", "qa")
                ),
                max_output_tokens_per_call=200,
            )
        ),
        pb.JobItem(
            gepa=pb.GepaSpec(
                iterations=4,
                per_iteration=[
                    pb.GepaStep(
                        inference=pb.InferenceSpec(
                            model=MODEL_AT[GEPA_INF], prompt_tokens=3_000, max_output_tokens=1_000
                        )
                    ),
                    pb.GepaStep(
                        judge=pb.JudgeSpec(
                            judge_model=MODEL_AT[GEPA_JUDGE],
                            calls=2,
                            prompt_text="Judge the candidate prompt.",
                            max_output_tokens_per_call=100,
                        )
                    ),
                ],
            )
        ),
        pb.JobItem(
            trace_eval=pb.TraceEvalSpec(
                traces=10,
                judges=[
                    pb.JudgeSpec(
                        judge_model=MODEL_AT[TRACE_JUDGE],
                        prompt_tokens_per_call=2_000,
                        max_output_tokens_per_call=300,
                    ),
                    pb.JudgeSpec(
                        judge_model="gpt-4o",
                        calls=2,
                        messages=chat(("user", "Is the trace correct?", "")),
                        max_output_tokens_per_call=50,
                    ),
                ],
            )
        ),
    ]
)

#: What the seeded JOB_HELD hold really used, by kind (priced with V1 at commit).
USAGE = [
    pb.UsageLine(
        kind=pb.USAGE_KIND_INFERENCE, model="gpt-4o", tokens_in=3_900, tokens_out=800, calls=2
    ),
    pb.UsageLine(
        kind=pb.USAGE_KIND_JUDGE, model="gpt-4o-mini", tokens_in=1_400, tokens_out=90, calls=3
    ),
    pb.UsageLine(kind=pb.USAGE_KIND_GEPA_ITERATION, calls=1),
    pb.UsageLine(kind=pb.USAGE_KIND_TRACE, calls=1),
]

BASE: dict[str, Message] = {
    "Reserve": pb.ReserveRequest(
        reservation_id="new-1",
        account=ACCOUNT,
        amount_uecu=100_000,
        job_type=pb.JOB_TYPE_INFERENCE,
        model="gpt-4o",
        ttl_ms=HOUR_MS,
    ),
    "ReserveBatch": pb.ReserveBatchRequest(
        account=ACCOUNT,
        items=[
            pb.ReserveItem(
                reservation_id=f"new-{i}",
                amount_uecu=100_000,
                job_type=pb.JOB_TYPE_INFERENCE,
                model="gpt-4o",
                ttl_ms=HOUR_MS,
            )
            for i in range(5)
        ],
    ),
    # Commits the live hold: a wrongly accepted bad commit would show in the snapshot.
    "Commit": pb.CommitRequest(
        reservation_id=HELD,
        organization=ORG,
        actual_uecu=400_000,
        usage=pb.Usage(tokens_in=1_000, tokens_out=200, calls=1),
    ),
    "CommitBatch": pb.CommitBatchRequest(
        organization=ORG,
        items=[
            pb.CommitItem(
                reservation_id=rid,
                actual_uecu=400_000,
                usage=pb.Usage(tokens_in=1_000, tokens_out=200, calls=1),
            )
            for rid in (HELD, "x-1", "x-2", "x-3", "x-4")
        ],
    ),
    "Release": pb.ReleaseRequest(reservation_id=HELD, organization=ORG),
    "Extend": pb.ExtendRequest(
        reservation_id=HELD, organization=ORG, ttl_ms=2 * HOUR_MS, sequence=HELD_SEQ + 1
    ),
    "GetBalance": pb.GetBalanceRequest(organization=ORG),
    "Grant": pb.GrantRequest(
        grant_id="grant-2", organization=ORG, amount_uecu=ECU, kind=pb.GRANT_KIND_TOP_UP
    ),
    "SetCap": pb.SetCapRequest(
        organization=ORG, scope=pb.CAP_SCOPE_TEAM, id=TEAM, cap_uecu=6 * ECU
    ),
    "SetAutoTopUp": pb.SetAutoTopUpRequest(
        organization=ORG, threshold_uecu=2 * ECU, amount_uecu=5 * ECU
    ),
    "Preview": pb.PreviewRequest(account=ACCOUNT, job=JOB),
    "GetRateCard": pb.GetRateCardRequest(),
    # Approves JOB's preview total, pinned to V1; the job type is derived from the spec.
    "ApproveJob": pb.ApproveJobRequest(
        job_id="job-new-1",
        account=ACCOUNT,
        job=JOB,
        approved_total_uecu=preview(CARD, ORG, job_from_pb(JOB)).total_uecu,
        rate_card_version=V1,
        policy=pb.JOB_POLICY_WALLET,
        ttl_ms=HOUR_MS,
    ),
    "GetJob": pb.GetJobRequest(organization=ORG, job_id=OPEN_JOB),
    "HeartbeatJob": pb.HeartbeatJobRequest(organization=ORG, job_id=OPEN_JOB),
    "CloseJob": pb.CloseJobRequest(organization=ORG, job_id=OPEN_JOB),
}
#: RPCs whose request has no input field at all (the coverage test checks it stays so).
NO_INPUT: frozenset[str] = frozenset()

#: The valid changes that turn a base request into one priced by the sidecar.
RESERVE_JOB = {"amount_uecu": 0, "job": JOB}
BATCH_JOB = {"items[2].amount_uecu": 0, "items[2].job": JOB}
COMMIT_USAGE = {
    "reservation_id": JOB_HELD,
    "actual_uecu": 0,
    "usage": pb.Usage(),
    "usage_lines": USAGE,
    "rate_card_version": V1,
}
BATCH_USAGE = {
    "items[2].reservation_id": JOB_HELD,
    "items[2].actual_uecu": 0,
    "items[2].usage": pb.Usage(),
    "items[2].usage_lines": USAGE,
    "items[2].rate_card_version": V1,
}

_STEP = re.compile(r"([a-z_]+)(?:\[(\d+)\])?")


#: Clears a oneof (``job.items[0].inference.prompt``) or a field.
CLEAR = object()


def assign(msg: Message, changes: Mapping[str, Any]) -> Message:
    """Set each proto field path (``account.team``, ``items[2].usage.calls``) of ``msg``.

    A message value replaces the sub-message (setting it, even when empty), a list replaces a
    repeated field, CLEAR clears a field or a oneof.
    """
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target: Any = msg
        for part in parents:
            m = _STEP.fullmatch(part)
            assert m is not None, part
            target = getattr(target, m.group(1))
            if m.group(2) is not None:
                target = target[int(m.group(2))]
        m = _STEP.fullmatch(leaf)
        assert m is not None, leaf
        name, index = m.group(1), m.group(2)
        if value is CLEAR:
            target.ClearField(name)
        elif index is not None:
            getattr(target, name)[int(index)].CopyFrom(value)
        elif isinstance(value, Message):
            sub = getattr(target, name)
            sub.SetInParent()
            sub.CopyFrom(value)
        elif isinstance(value, list):
            field = getattr(target, name)
            del field[:]
            field.extend(value)
        else:
            setattr(target, name, value)
    return msg


def mutate(rpc: str, changes: Mapping[str, Any]) -> Message:
    """A copy of BASE[rpc] with the given field paths set."""
    msg = type(BASE[rpc])()
    msg.CopyFrom(BASE[rpc])
    return assign(msg, changes)


#: Proto paths (beyond its expected field) that a case exercises, by case id: a field with no
#: invalid value of its own (a chat message's content) is refused through the field it feeds.
COVERS: dict[str, set[str]] = {}


def case(
    rpc: str,
    field: str,
    label: str,
    changes: Any,
    expect: str | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    covers: tuple[str, ...] = (),
) -> Any:
    """One test: ``changes`` is a value for ``field`` or a mapping of paths to values, applied
    after ``base`` (the valid changes a family of cases starts from)."""
    if not isinstance(changes, Mapping):
        changes = {field: changes}
    case_id = f"{rpc}-{expect or field}-{label}"
    if covers:
        COVERS.setdefault(case_id, set()).update(covers)
    return pytest.param(rpc, mutate(rpc, {**(base or {}), **changes}), expect or field, id=case_id)


# -- invalid value classes ---------------------------------------------------------------------

#: Malformed identifier texts (every id field shares this alphabet: [A-Za-z0-9._-]).
BAD_ID_TEXT = [
    ("brace-open", "ac{me"),
    ("brace-close", "ac}me"),
    ("colon", "acme:holds"),
    ("newline", "acme\n"),
    ("space", "ac me"),
    ("nul", "ac\x00me"),
    ("unicode", "acmé"),
    ("quote-slash", 'ac"/me'),
]


def bad_ids(max_len: int, *, required: bool) -> list[tuple[str, str]]:
    out = [*BAD_ID_TEXT, (f"over-{max_len + 1}", "a" * (max_len + 1))]
    if required:
        out.insert(0, ("empty", ""))
    return out


SCOPE_IDS = bad_ids(64, required=True)
OPTIONAL_SCOPE_IDS = bad_ids(64, required=False)
CALLER_IDS = bad_ids(128, required=True)

EXTREMES = [("int64-max", INT64_MAX), ("int64-min", INT64_MIN)]
#: Amounts that must be > 0 (reserve, grant).
BAD_POSITIVE_AMOUNTS = [
    ("zero", 0),
    ("negative", -1),
    ("above-1e15", MAX_REQUEST_UECU + 1),
    ("above-2^53", 2**53 + 1),
    *EXTREMES,
]
#: Amounts that may be 0 (commit actual).
BAD_AMOUNTS = BAD_POSITIVE_AMOUNTS[1:]
BAD_COUNTS = [("negative", -1), ("2^53", 2**53), *EXTREMES]
BAD_TTLS = [
    ("negative", -1),
    ("one", 1),
    ("below-min", 999),
    ("above-max", MAX_TTL_MS + 1),
    ("2^53", 2**53),
    *EXTREMES,
]
BAD_SEQUENCES = [("zero", 0), ("negative", -1), ("2^53", 2**53), *EXTREMES]
BAD_ENUMS = [("unspecified", 0), ("unknown-99", 99), ("negative", -1)]
BAD_MODELS = [
    ("braces", "gpt{4o}"),
    ("space", "gpt 4o"),
    ("over-128", "m" * 129),
    ("newline", "gpt-4o\n"),
    ("nul", "gpt\x00"),
    ("unicode", "gpt-4ö"),
]
BAD_EXPIRIES = [("negative", -1), ("after-year-9999", MAX_EPOCH_MS + 1), *EXTREMES]
BAD_CAPS = [
    ("negative", -1),
    ("above-2^52", MAX_GRANTED_UECU + 1),
    ("above-2^53", 2**53 + 1),
    *EXTREMES,
]


def field_cases(rpc: str, field: str, values: list[tuple[str, Any]]) -> list[Any]:
    return [case(rpc, field, label, value) for label, value in values]


def model_cases(rpc: str, prefix: str) -> list[Any]:
    model, job = f"{prefix}model", f"{prefix}job_type"
    return [
        case(rpc, model, "missing-inference", ""),
        case(rpc, model, "missing-judge", {job: pb.JOB_TYPE_JUDGE, model: ""}),
        *field_cases(rpc, model, BAD_MODELS),
        # Optional for the other job types, but still checked when given.
        case(rpc, model, "braces-gepa", {job: pb.JOB_TYPE_GEPA, model: "gpt{4o}"}),
    ]


def account_cases(rpc: str) -> list[Any]:
    return [
        *field_cases(rpc, "account.organization", SCOPE_IDS),
        *field_cases(rpc, "account.team", OPTIONAL_SCOPE_IDS),
        *field_cases(rpc, "account.project", OPTIONAL_SCOPE_IDS),
        *field_cases(rpc, "account.user", OPTIONAL_SCOPE_IDS),
    ]


def reserve_item(rid: str, amount: int = 100_000) -> pb.ReserveItem:
    return pb.ReserveItem(reservation_id=rid, amount_uecu=amount, job_type=pb.JOB_TYPE_GEPA)


def commit_item(rid: str) -> pb.CommitItem:
    return pb.CommitItem(reservation_id=rid, actual_uecu=1)


OPTIONAL_CALLER_IDS = bad_ids(128, required=False)
BAD_JOB_TTLS = [*BAD_TTLS[:3], ("above-max", JOB_MAX_TTL_MS + 1), *BAD_TTLS[4:]]

RESERVE = [
    *field_cases("Reserve", "reservation_id", CALLER_IDS),
    *field_cases("Reserve", "job_id", OPTIONAL_CALLER_IDS),
    *account_cases("Reserve"),
    *field_cases("Reserve", "amount_uecu", BAD_POSITIVE_AMOUNTS),
    *field_cases("Reserve", "job_type", BAD_ENUMS),
    *model_cases("Reserve", ""),
    *field_cases("Reserve", "ttl_ms", BAD_TTLS),
]

# The bad item is always in the middle (items[2] of 5): the field path must say which.
RESERVE_BATCH = [
    *account_cases("ReserveBatch"),
    *field_cases("ReserveBatch", "job_id", OPTIONAL_CALLER_IDS),
    *field_cases("ReserveBatch", "items[2].reservation_id", CALLER_IDS),
    *field_cases("ReserveBatch", "items[2].amount_uecu", BAD_POSITIVE_AMOUNTS),
    *field_cases("ReserveBatch", "items[2].job_type", BAD_ENUMS),
    *model_cases("ReserveBatch", "items[2]."),
    *field_cases("ReserveBatch", "items[2].ttl_ms", BAD_TTLS),
    case("ReserveBatch", "items[3].reservation_id", "duplicate", "new-1"),
    case("ReserveBatch", "items[2].reservation_id", "duplicate-first", "new-0"),
    pytest.param(
        "ReserveBatch", pb.ReserveBatchRequest(account=ACCOUNT), "items", id="ReserveBatch-empty"
    ),
    pytest.param(
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=ACCOUNT, items=[reserve_item(f"r-{i}", 1) for i in range(MAX_BATCH + 1)]
        ),
        "items",
        id=f"ReserveBatch-items-over-{MAX_BATCH}",
    ),
    pytest.param(
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=ACCOUNT,
            items=[reserve_item(f"big-{i}", MAX_REQUEST_UECU // 2 + 1) for i in range(2)],
        ),
        "items",
        id="ReserveBatch-items-total-above-1e15",
    ),
]

COMMIT = [
    *field_cases("Commit", "reservation_id", CALLER_IDS),
    *field_cases("Commit", "organization", SCOPE_IDS),
    *field_cases("Commit", "actual_uecu", BAD_AMOUNTS),
    *field_cases("Commit", "usage.tokens_in", BAD_COUNTS),
    *field_cases("Commit", "usage.tokens_out", BAD_COUNTS),
    *field_cases("Commit", "usage.calls", BAD_COUNTS),
]

COMMIT_BATCH = [
    *field_cases("CommitBatch", "organization", SCOPE_IDS),
    *field_cases("CommitBatch", "items[2].reservation_id", CALLER_IDS),
    *field_cases("CommitBatch", "items[2].actual_uecu", BAD_AMOUNTS),
    *field_cases("CommitBatch", "items[2].usage.tokens_in", BAD_COUNTS),
    *field_cases("CommitBatch", "items[2].usage.tokens_out", BAD_COUNTS),
    *field_cases("CommitBatch", "items[2].usage.calls", BAD_COUNTS),
    # items[0] commits the live hold; its duplicate later in the batch must reject the batch.
    case("CommitBatch", "items[3].reservation_id", "duplicate-held", HELD),
    pytest.param(
        "CommitBatch", pb.CommitBatchRequest(organization=ORG), "items", id="CommitBatch-empty"
    ),
    pytest.param(
        "CommitBatch",
        pb.CommitBatchRequest(
            organization=ORG,
            items=[commit_item(HELD)] + [commit_item(f"c-{i}") for i in range(MAX_BATCH)],
        ),
        "items",
        id=f"CommitBatch-items-over-{MAX_BATCH}",
    ),
]

RELEASE = [
    *field_cases("Release", "reservation_id", CALLER_IDS),
    *field_cases("Release", "organization", SCOPE_IDS),
]

EXTEND = [
    *field_cases("Extend", "reservation_id", CALLER_IDS),
    *field_cases("Extend", "organization", SCOPE_IDS),
    *field_cases("Extend", "ttl_ms", BAD_TTLS),
    *field_cases("Extend", "sequence", BAD_SEQUENCES),
]

GET_BALANCE = field_cases("GetBalance", "organization", SCOPE_IDS)

#: Optional: a caller without the admin token names its own organization (or none).
GET_RATE_CARD = field_cases("GetRateCard", "organization", OPTIONAL_SCOPE_IDS)

GRANT = [
    *field_cases("Grant", "grant_id", CALLER_IDS),
    *field_cases("Grant", "organization", SCOPE_IDS),
    *field_cases("Grant", "amount_uecu", BAD_POSITIVE_AMOUNTS),
    *field_cases("Grant", "kind", BAD_ENUMS),
    *field_cases("Grant", "expires_at_unix_ms", BAD_EXPIRIES),
]

SET_CAP = [
    *field_cases("SetCap", "organization", SCOPE_IDS),
    *field_cases("SetCap", "scope", BAD_ENUMS),
    *field_cases("SetCap", "id", SCOPE_IDS),
    *field_cases("SetCap", "cap_uecu", BAD_CAPS),
    # clear=True ignores cap_uecu but not the identifiers.
    case("SetCap", "id", "clear-empty", {"clear": True, "id": ""}),
    case("SetCap", "scope", "clear-unspecified", {"clear": True, "scope": 0}),
]

SET_AUTO_TOP_UP = [
    *field_cases("SetAutoTopUp", "organization", SCOPE_IDS),
    *field_cases("SetAutoTopUp", "threshold_uecu", BAD_POSITIVE_AMOUNTS),
    *field_cases("SetAutoTopUp", "amount_uecu", BAD_POSITIVE_AMOUNTS),
    # disable=True ignores threshold and amount but not the organization.
    case("SetAutoTopUp", "organization", "disable-empty", {"disable": True, "organization": ""}),
]

# -- pricing inputs: job specs and usage lines -------------------------------------------------

#: Counts that must be >= 1 (samples, calls, iterations, traces; 0 means 1 where documented).
BAD_POSITIVE_COUNTS = [("negative", -1), ("2^53", 2**53), *EXTREMES]


def over_window(model: ModelRates) -> str:
    """A prompt one token longer than the model's context window (" a" is one token in both
    shipped encodings, checked by test_over_window_text_is_one_token_too_long)."""
    return " a" * (model.context_window + 1)


def spec_cases(rpc: str, base: Mapping[str, Any], prefix: str, at: str, *, full: bool) -> list[Any]:
    """Every field of the inference or judge spec at ``prefix + at`` (``job.items[0].inference``).

    ``full`` runs every invalid value class; otherwise one per field (Reserve and ReserveBatch
    reuse the Preview matrix's paths, priced by the same code)."""
    model = CARD.models[MODEL_AT[at]]
    judge = not at.endswith("inference")
    model_f = "judge_model" if judge else "model"
    tokens_f = "prompt_tokens_per_call" if judge else "prompt_tokens"
    max_f = "max_output_tokens_per_call" if judge else "max_output_tokens"
    count_f = "calls" if judge else "samples"
    path = prefix + at
    some = (lambda values: values) if full else (lambda values: values[:1])

    def c(field: str, label: str, value: Any, **kw: Any) -> Any:
        return case(rpc, f"{path}.{field}", label, value, base=base, **kw)

    def chat_case(field: str, label: str, messages: pb.ChatMessages, covers: str = "") -> Any:
        return case(
            rpc,
            f"{path}.{field}",
            label,
            {f"{path}.messages": messages},
            base=base,
            covers=(f"{path}.messages.{covers}",) if covers else (),
        )

    huge = over_window(model)
    return [
        c(model_f, "missing", ""),
        # Never priced as zero: a model the card does not list is refused naming the field.
        c(model_f, "unknown", "gpt-5"),
        *[c(model_f, label, value) for label, value in some(BAD_MODELS)],
        case(rpc, f"{path}.prompt", "missing", {f"{path}.prompt": CLEAR}, base=base),
        c("prompt_text", "over-context-window", huge),
        c(tokens_f, "over-context-window", model.context_window + 1),
        *[c(tokens_f, label, value) for label, value in some(BAD_COUNTS)],
        chat_case("messages", "empty", pb.ChatMessages(), covers="messages"),
        chat_case("messages[1].role", "missing", chat(("system", "Be strict.", ""), ("", "x", ""))),
        chat_case(
            "messages",
            "content-over-context-window",
            chat(("user", huge, "")),
            covers="messages[0].content",
        ),
        chat_case(
            "messages",
            "name-over-context-window",
            chat(("user", "hi", huge)),
            covers="messages[0].name",
        ),
        c(max_f, "over-model-max", model.max_output_tokens + 1),
        *[c(max_f, label, value) for label, value in some(BAD_COUNTS)],
        *[c(count_f, label, value) for label, value in some(BAD_POSITIVE_COUNTS)],
        *(answer_cases(c, path, some) if judge else []),
    ]


def answer_cases(c: Any, path: str, some: Any) -> list[Any]:
    """The answer a judge reads: a bad bound, or an item that is not there or not an
    inference (a trace evaluation's judges name none)."""
    own = int(re.findall(r"\[(\d+)\]", path)[-1])
    oneof = (f"{path}.answer",)
    return [
        *[c("answer_max_tokens", label, value) for label, value in some(BAD_COUNTS)],
        c("answer_of_item", "out-of-range", 99, covers=oneof),
        c("answer_of_item", "negative", -1, covers=oneof),
        c("answer_of_item", "itself-a-judge", own, covers=oneof),
    ]


def job_cases(rpc: str, base: Mapping[str, Any], prefix: str, *, full: bool) -> list[Any]:
    """Every field of JOB at ``prefix`` (``job.`` or ``items[2].job.``), nested specs included."""
    some = (lambda values: values) if full else (lambda values: values[:1])
    zero = [("zero", 0)]

    def c(field: str, label: str, value: Any, expect: str | None = None, **kw: Any) -> Any:
        return case(rpc, prefix + field, label, value, expect, base=base, **kw)

    return [
        *[
            cc
            for at in (INF, JUDGE, GEPA_INF, GEPA_JUDGE, TRACE_JUDGE)
            for cc in spec_cases(rpc, base, prefix, at, full=full)
        ],
        c("items", "empty", {prefix + "items": []}),
        c(
            "items[1]",
            "empty-item",
            {prefix + "items[1]": pb.JobItem()},
            covers=(prefix + "items[1].kind",),
        ),
        *[
            c(f"{GEPA}.iterations", label, value)
            for label, value in zero + some(BAD_POSITIVE_COUNTS)
        ],
        c(f"{GEPA}.per_iteration", "empty", {f"{prefix}{GEPA}.per_iteration": []}),
        *[
            c(f"{GEPA}.prompt_growth_tokens_per_iteration", label, value)
            for label, value in some(BAD_COUNTS)
        ],
        c(
            f"{GEPA}.per_iteration[1]",
            "empty-step",
            {f"{prefix}{GEPA}.per_iteration[1]": pb.GepaStep()},
            covers=(f"{prefix}{GEPA}.per_iteration[1].kind",),
        ),
        *[c(f"{TRACE}.traces", label, value) for label, value in zero + some(BAD_POSITIVE_COUNTS)],
        c(f"{TRACE}.judges", "empty", {f"{prefix}{TRACE}.judges": []}),
        # Valid counts whose worst case passes what one request may move: the item, then the job.
        c("items[1]", "item-over-1e15", {f"{prefix}{JUDGE}.calls": 10**12}),
        case(
            rpc,
            prefix.rstrip("."),
            "job-over-1e15",
            {f"{prefix}{JUDGE}.calls": 6 * 10**11, f"{prefix}{GEPA_JUDGE}.calls": 2 * 10**11},
            base=base,
        ),
    ]


def usage_cases(rpc: str, base: Mapping[str, Any], prefix: str, *, full: bool) -> list[Any]:
    """Every usage-line field of a usage-priced commit at ``prefix`` ('' or ``items[2].``)."""
    some = (lambda values: values) if full else (lambda values: values[:1])

    def c(field: str, label: str, value: Any, **kw: Any) -> Any:
        return case(rpc, prefix + field, label, value, base=base, **kw)

    lines = prefix + "usage_lines"
    return [
        c("actual_uecu", "with-usage-lines", 400_000),
        c("usage", "with-usage-lines", pb.Usage(tokens_in=1)),
        c("rate_card_version", "missing-with-usage-lines", ""),
        case(rpc, prefix + "rate_card_version", "without-usage-lines", V1),
        *[c("usage_lines[1].kind", label, value) for label, value in BAD_ENUMS],
        c("usage_lines[0].model", "missing", ""),
        c("usage_lines[0].model", "unknown", "gpt-5"),
        *[c("usage_lines[1].model", label, value) for label, value in some(BAD_MODELS)],
        c("usage_lines[2].model", "given-for-gepa", "gpt-4o"),
        *[c("usage_lines[0].tokens_in", label, value) for label, value in some(BAD_COUNTS)],
        *[c("usage_lines[1].tokens_out", label, value) for label, value in some(BAD_COUNTS)],
        *[c("usage_lines[0].calls", label, value) for label, value in some(BAD_COUNTS)],
        c("usage_lines[3].tokens_in", "given-for-trace", 5),
        c("usage_lines[2].tokens_out", "given-for-gepa", 5),
        c("usage_lines", "total-over-1e15", {f"{lines}[0].tokens_out": 2**53 - 1}),
    ]


PREVIEW = [
    *account_cases("Preview"),
    *job_cases("Preview", {}, "job.", full=True),
    pytest.param(
        "Preview", pb.PreviewRequest(account=ACCOUNT), "job.items", id="Preview-job.items-no-job"
    ),
]

RESERVE_WITH_JOB = [
    case("Reserve", "amount_uecu", "with-job", {"job": JOB}),
    case("Reserve", "job.items", "empty-job", {"amount_uecu": 0, "job": pb.JobSpec()}),
    *job_cases("Reserve", RESERVE_JOB, "job.", full=False),
    case("ReserveBatch", "items[2].amount_uecu", "with-job", {"items[2].job": JOB}),
    *job_cases("ReserveBatch", BATCH_JOB, "items[2].job.", full=False),
]

#: ApproveJob without a spec: a plain amount the caller priced (its job type is then required).
PLAIN_APPROVAL = {"job": CLEAR, "rate_card_version": "", "job_type": pb.JOB_TYPE_JUDGE}

APPROVE_JOB = [
    *field_cases("ApproveJob", "job_id", CALLER_IDS),
    *account_cases("ApproveJob"),
    *field_cases("ApproveJob", "approved_total_uecu", BAD_POSITIVE_AMOUNTS),
    case("ApproveJob", "rate_card_version", "missing-with-job", ""),
    case(
        "ApproveJob",
        "rate_card_version",
        "without-job",
        {**PLAIN_APPROVAL, "rate_card_version": V1},
    ),
    case("ApproveJob", "job_type", "unspecified-without-job", {**PLAIN_APPROVAL, "job_type": 0}),
    *field_cases("ApproveJob", "job_type", BAD_ENUMS[1:]),
    *field_cases("ApproveJob", "policy", BAD_ENUMS[1:]),
    *field_cases("ApproveJob", "ttl_ms", BAD_JOB_TTLS),
    *job_cases("ApproveJob", {}, "job.", full=False),
]

#: GetJob, HeartbeatJob and CloseJob name a job of an organization.
JOB_OPS = [
    cc
    for rpc in ("GetJob", "HeartbeatJob", "CloseJob")
    for cc in (
        *field_cases(rpc, "organization", SCOPE_IDS),
        *field_cases(rpc, "job_id", CALLER_IDS),
    )
]

COMMIT_WITH_USAGE = [
    *usage_cases("Commit", COMMIT_USAGE, "", full=True),
    *usage_cases("CommitBatch", BATCH_USAGE, "items[2].", full=False),
]

CASES = [
    *RESERVE,
    *RESERVE_BATCH,
    *COMMIT,
    *COMMIT_BATCH,
    *RELEASE,
    *EXTEND,
    *GET_BALANCE,
    *GET_RATE_CARD,
    *GRANT,
    *SET_CAP,
    *SET_AUTO_TOP_UP,
    *PREVIEW,
    *RESERVE_WITH_JOB,
    *COMMIT_WITH_USAGE,
    *APPROVE_JOB,
    *JOB_OPS,
]


def proto_path(field: str) -> str:
    """An error's field path as the request's proto path (``job.items[].inference.model``):
    indices dropped, and chat messages (``….messages[1].role``) through their wrapper."""
    path = re.sub(r"\[\d+\]", "[]", field)
    return re.sub(r"\.messages\[\]", ".messages.messages[]", path)


def test_over_window_text_is_one_token_too_long() -> None:
    from ecu_sidecar.pricing import count_text

    for model in {CARD.models[name] for name in MODEL_AT.values()}:
        assert count_text(" a" * 1_000, model.encoding) == 1_000
        assert count_text(over_window(model), model.encoding) == model.context_window + 1


def input_paths(desc: Any, prefix: str = "") -> set[str]:
    """What a request can get wrong: every scalar field (but bools, which have no invalid
    value), every list (empty, too long, or over a total) and every oneof (none of it given),
    as proto paths with ``[]`` for list elements."""
    out = {prefix + oneof.name for oneof in desc.oneofs}
    for f in desc.fields:
        if f.type == f.TYPE_BOOL:
            continue
        path = prefix + f.name
        if f.message_type is None:
            out.add(path + ("[]" if f.is_repeated else ""))
            continue
        if f.is_repeated:
            out.add(path)
        out |= input_paths(f.message_type, path + ("[]." if f.is_repeated else "."))
    return out


def test_matrix_covers_every_rpc_and_field() -> None:
    """Every RPC, and every input field, list and oneof of its request, appears in the matrix."""
    service = pb.DESCRIPTOR.services_by_name["Quota"]
    assert {m.name for m in service.methods} == set(BASE)
    fields_hit = {(p.values[0], proto_path(p.values[2])) for p in CASES}
    for p in CASES:
        fields_hit |= {(p.values[0], re.sub(r"\[\d+\]", "[]", c)) for c in COVERS.get(p.id, ())}
    # Sanity: the walk reaches the deepest fields and leaves the bools out.
    preview = input_paths(pb.PreviewRequest.DESCRIPTOR)
    assert "job.items[].gepa.per_iteration[].judge.messages.messages[].content" in preview
    assert "job.items[].trace_eval.judges[].prompt" in preview
    assert "job.items[].inference.byok" not in preview

    for method in service.methods:
        paths = input_paths(method.input_type)
        if method.name in NO_INPUT:
            # Nothing to get wrong; test_base_request_is_valid and the no-side-effect test
            # still call it. A field added later must get its cases here.
            assert not paths, f"{method.name} gained input fields: {sorted(paths)}"
            continue
        missing = {path for path in paths if (method.name, path) not in fields_hit}
        assert not missing, f"{method.name}: no bad-input case for {sorted(missing)}"


@pytest.mark.parametrize("rpc", sorted(BASE))
async def test_base_request_is_valid(sidecar, stub, rpc: str) -> None:
    """The unmutated base of every case succeeds: each refusal is its one bad field's doing."""
    await seeded_state(sidecar)
    await call(stub, rpc, BASE[rpc])


@pytest.mark.parametrize(("rpc", "request_", "field"), CASES)
async def test_bad_input_is_refused_and_changes_nothing(
    sidecar, stub, rpc: str, request_: Message, field: str
) -> None:
    before = await seeded_state(sidecar)
    exc = await refused(stub, rpc, request_)
    assert_invalid(exc, field)
    assert await state(sidecar) == before


# -- the edges of every range are accepted -----------------------------------------------------

BOUNDARIES = [
    case("Reserve", "reservation_id", "128-chars", "r" * 128),
    case("Reserve", "account.team", "64-chars", "t" * 64),
    case("Reserve", "ttl_ms", "min", 1_000),
    case("Reserve", "ttl_ms", "max", MAX_TTL_MS),
    case("Reserve", "ttl_ms", "zero-default", 0),
    case("Reserve", "model", "128-chars", "m" * 128),
    case("Reserve", "model", "provider-version", "openai/gpt-4o@2024-08-06:latest+x"),
    case("Reserve", "model", "empty-for-gepa", {"job_type": pb.JOB_TYPE_GEPA, "model": ""}),
    case("Reserve", "account.user", "dots-dashes", "a.b_c-d"),
    pytest.param(
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=ACCOUNT, items=[reserve_item(f"r-{i}", 1) for i in range(MAX_BATCH)]
        ),
        "items",
        id=f"ReserveBatch-items-exactly-{MAX_BATCH}",
    ),
    case("Commit", "actual_uecu", "zero", 0),
    case("Commit", "usage.tokens_in", "2^53-1", 2**53 - 1),
    case("Extend", "sequence", "2^53-1", 2**53 - 1),
    case("Extend", "ttl_ms", "zero-own-ttl", 0),
    case("Grant", "amount_uecu", "1e15", MAX_REQUEST_UECU),
    case("Grant", "expires_at_unix_ms", "year-9999", MAX_EPOCH_MS),
    case("SetCap", "cap_uecu", "zero", 0),
    case("SetCap", "cap_uecu", "2^52", MAX_GRANTED_UECU),
    case("SetCap", "cap_uecu", "clear-ignores-negative", {"clear": True, "cap_uecu": -1}),
    case("SetAutoTopUp", "threshold_uecu", "1e15", MAX_REQUEST_UECU),
    case(
        "SetAutoTopUp",
        "disable",
        "ignores-threshold-and-amount",
        {"disable": True, "threshold_uecu": -1, "amount_uecu": 0},
    ),
    # The model's own limits are accepted; 0 means the model's max output, and 1 call/sample.
    case(
        "Preview",
        f"job.{INF}.prompt_tokens",
        "context-window",
        CARD.models["gpt-4o"].context_window,
    ),
    # gpt-4o is chat-only: its plain prompt is counted as the user message it is sent as, whose
    # 7 tokens of framing (3 + 3 + "user") fill the window with the text.
    case(
        "Preview",
        f"job.{INF}.prompt_text",
        "context-window",
        " a" * (CARD.models["gpt-4o"].context_window - 7),
    ),
    case(
        "Preview",
        f"job.{INF}.max_output_tokens",
        "model-max",
        CARD.models["gpt-4o"].max_output_tokens,
    ),
    case("Preview", f"job.{INF}.max_output_tokens", "zero-model-max", 0),
    case("Preview", f"job.{INF}.samples", "zero-is-one", 0),
    # A judge reads the answer of an inference item of its list, or a bound in tokens as large
    # as a count may be (what a call reads stops at the judge's context window).
    case("Preview", f"job.{JUDGE}.answer_of_item", "the-inference", 0),
    case("Preview", f"job.{GEPA_JUDGE}.answer_of_item", "the-inference", 0),
    case("Preview", f"job.{JUDGE}.answer_max_tokens", "largest-count", 2**53 - 1),
    # A GEPA prompt that grows stops at the model's context window, however fast it grows.
    case("Preview", f"job.{GEPA}.prompt_growth_tokens_per_iteration", "largest-count", 2**53 - 1),
    case("Preview", f"job.{JUDGE}.calls", "zero-is-one", 0),
    case("Preview", f"job.{INF}.prompt_tokens", "zero", 0),
    case("Preview", f"job.{INF}.byok", "byok", True),
    # An organization without an account gets its quote (covered = false), not an error.
    case(
        "Preview",
        "account.organization",
        "no-account",
        {"account.organization": "nobody", "account.team": "", "account.project": ""},
    ),
    case("Reserve", "job", "instead-of-amount", RESERVE_JOB),
    case("Reserve", "job", "type-and-model-derived", {**RESERVE_JOB, "job_type": 0, "model": ""}),
    case("ReserveBatch", "items[2].job", "instead-of-amount", BATCH_JOB),
    case("Commit", "usage_lines", "priced-with-the-pinned-version", COMMIT_USAGE),
    case("Commit", "usage_lines", "empty-is-a-plain-commit", {"usage_lines": []}),
    # A job that made no call: the version alone, no line, prices at 0.
    case("Commit", "usage_lines", "none-used-priced-at-zero", {**COMMIT_USAGE, "usage_lines": []}),
    case(
        "CommitBatch",
        "items[2].usage_lines",
        "none-used-priced-at-zero",
        {**BATCH_USAGE, "items[2].usage_lines": []},
    ),
    case("ApproveJob", "job_id", "128-chars", "j" * 128),
    case("ApproveJob", "job", "plain-amount", PLAIN_APPROVAL),
    case("ApproveJob", "job_type", "given-with-job", pb.JOB_TYPE_TRACE_EVAL),
    case("ApproveJob", "policy", "unspecified-refuse", pb.JOB_POLICY_UNSPECIFIED),
    case("ApproveJob", "ttl_ms", "zero-default", 0),
    case("ApproveJob", "ttl_ms", "min", 1_000),
    case("ApproveJob", "ttl_ms", "max", JOB_MAX_TTL_MS),
]


@pytest.mark.parametrize(("rpc", "request_", "field"), BOUNDARIES)
async def test_range_edges_are_accepted(
    sidecar, stub, rpc: str, request_: Message, field: str
) -> None:
    await seeded_state(sidecar)
    await call(stub, rpc, request_)


# -- refusals that are not about input change nothing either ------------------------------------


def _reserve(**over: Any) -> pb.ReserveRequest:
    return mutate("Reserve", over)


REFUSALS = [
    pytest.param(
        "Reserve",
        _reserve(
            **{
                **RESERVE_JOB,
                "account.organization": "nobody",
                "account.team": "",
                "account.project": "",
            }
        ),
        None,
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        id="reserve-job-unknown-organization",
    ),
    pytest.param(
        "Reserve",
        _reserve(**{**RESERVE_JOB, f"job.{TRACE}.traces": 100_000}),
        None,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU",
        id="reserve-job-over-team-cap",
    ),
    pytest.param(
        "Reserve",
        _reserve(**{**RESERVE_JOB, "reservation_id": JOB_HELD}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="reserve-job-replay-other-job",
    ),
    pytest.param(
        "Commit",
        mutate("Commit", {**COMMIT_USAGE, "rate_card_version": "2020-01-01.1"}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RATE_CARD_VERSION_UNKNOWN",
        id="commit-usage-version-not-loaded",
    ),
    pytest.param(
        "CommitBatch",
        mutate("CommitBatch", {**BATCH_USAGE, "items[2].rate_card_version": "2020-01-01.1"}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RATE_CARD_VERSION_UNKNOWN",
        id="commit-batch-usage-version-not-loaded",
    ),
    # A hold placed with an amount pinned no card: its usage cannot be priced with one.
    pytest.param(
        "Commit",
        mutate("Commit", {**COMMIT_USAGE, "reservation_id": HELD}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "RATE_CARD_MISMATCH",
        id="commit-usage-of-an-amount-hold",
    ),
    pytest.param(
        "SetAutoTopUp",
        BASE["SetAutoTopUp"],
        (),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        id="set-auto-top-up-without-token",
    ),
    pytest.param(
        "SetAutoTopUp",
        mutate("SetAutoTopUp", {"organization": "nobody"}),
        None,
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        id="set-auto-top-up-unknown-organization",
    ),
    pytest.param(
        "Reserve",
        _reserve(**{"account.organization": "nobody", "account.team": "", "account.project": ""}),
        None,
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        id="reserve-unknown-organization",
    ),
    pytest.param(
        "Reserve",
        _reserve(**{"account.team": "", "account.project": "", "amount_uecu": GRANTED}),
        None,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU",
        id="reserve-over-balance",
    ),
    pytest.param(
        "Reserve",
        _reserve(amount_uecu=TEAM_CAP),
        None,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_ECU",
        id="reserve-over-team-cap",
    ),
    pytest.param(
        "Reserve",
        _reserve(reservation_id=HELD, amount_uecu=HELD_UECU + 1),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="reserve-replay-other-amount",
    ),
    pytest.param(
        "ReserveBatch",
        mutate("ReserveBatch", {"items[4].reservation_id": HELD}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="reserve-batch-one-conflict-none-placed",
    ),
    pytest.param(
        "Commit",
        mutate("Commit", {"reservation_id": GONE}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_RELEASED",
        id="commit-after-release",
    ),
    pytest.param(
        "Commit",
        mutate("Commit", {"reservation_id": DONE, "actual_uecu": 150_001}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="commit-replay-other-actual",
    ),
    pytest.param(
        "Commit",
        mutate("Commit", {"reservation_id": DONE, "actual_uecu": 150_000}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="commit-replay-other-usage",
    ),
    pytest.param(
        "Commit",
        mutate("Commit", {"reservation_id": "never"}),
        None,
        grpc.StatusCode.NOT_FOUND,
        "HOLD_NOT_FOUND",
        id="commit-unknown-hold",
    ),
    pytest.param(
        "Release",
        mutate("Release", {"reservation_id": DONE}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_COMMITTED",
        id="release-after-commit",
    ),
    pytest.param(
        "Extend",
        mutate("Extend", {"sequence": HELD_SEQ - 1}),
        None,
        grpc.StatusCode.ABORTED,
        "STALE_SEQUENCE",
        id="extend-stale-sequence",
    ),
    pytest.param(
        "Extend",
        mutate("Extend", {"sequence": HELD_SEQ, "ttl_ms": 2 * HOUR_MS}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="extend-same-sequence-other-ttl",
    ),
    pytest.param(
        "Extend",
        mutate("Extend", {"reservation_id": GONE}),
        None,
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_RELEASED",
        id="extend-released",
    ),
    pytest.param(
        "GetBalance",
        mutate("GetBalance", {"organization": "nobody"}),
        None,
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        id="balance-unknown-organization",
    ),
    pytest.param(
        "Grant",
        BASE["Grant"],
        (),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        id="grant-without-token",
    ),
    pytest.param(
        "Grant",
        mutate("Grant", {"amount_uecu": -1}),
        (),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        id="grant-bad-input-without-token",
    ),
    pytest.param(
        "Grant",
        BASE["Grant"],
        (("authorization", "Bearer wrong"),),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        id="grant-wrong-token",
    ),
    pytest.param(
        "Grant",
        mutate("Grant", {"grant_id": "seed-grant"}),
        None,
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
        id="grant-replay-other-amount",
    ),
    pytest.param(
        "SetCap",
        BASE["SetCap"],
        (),
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        id="set-cap-without-token",
    ),
    pytest.param(
        "SetCap",
        mutate("SetCap", {"organization": "nobody"}),
        None,
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
        id="set-cap-unknown-organization",
    ),
]


@pytest.mark.parametrize(("rpc", "request_", "metadata", "code", "reason"), REFUSALS)
async def test_refusal_changes_nothing(
    sidecar, stub, rpc: str, request_: Message, metadata: Any, code: Any, reason: str
) -> None:
    before = await seeded_state(sidecar)
    exc = await refused(stub, rpc, request_, metadata)
    assert exc.code() == code, (exc.code(), exc.details())
    assert details(exc)["ErrorInfo"].reason == reason
    assert await state(sidecar) == before


#: A second card version the two-card sidecar also knows (not current).
V2 = "2027-01-01.1"


@pytest.fixture
def v2_card(tmp_path: Path) -> Path:
    """The example card under version V2 (same rates)."""
    path = tmp_path / "v2.toml"
    text = Path(EXAMPLE_RATE_CARD).read_text()
    assert f'version = "{V1}"' in text
    path.write_text(text.replace(f'version = "{V1}"', f'version = "{V2}"'))
    return path


@pytest_asyncio.fixture
async def two_cards(settings: Settings, v2_card: Path) -> AsyncIterator[SidecarServer]:
    """A sidecar pricing with the example card (V1) that also knows V2 (registered)."""
    v2 = v2_card
    rates = RateCardRegistry()
    rates.register(v2)
    rates.load(EXAMPLE_RATE_CARD)
    server = SidecarServer(settings, store=open_store(settings), rates=rates)
    await server.start()
    yield server
    try:
        await drop_keys(settings)
    finally:
        await server.stop(grace=0)


async def test_commit_priced_with_another_loaded_version_changes_nothing(two_cards) -> None:
    """The hold pinned V1; usage priced with V2 (loaded, not the hold's) is refused by the
    script, for Commit and per item in CommitBatch, and nothing changes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{two_cards.port}") as channel:
        stub = quota_pb2_grpc.QuotaStub(channel)
        card = await stub.GetRateCard(pb.GetRateCardRequest())
        assert card.version == V1 and set(card.versions) == {V1, V2}
        before = await seeded_state(two_cards)

        exc = await refused(
            stub, "Commit", mutate("Commit", {**COMMIT_USAGE, "rate_card_version": V2})
        )
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
        assert details(exc)["ErrorInfo"].reason == "RATE_CARD_MISMATCH"
        assert V1 in (exc.details() or "") and V2 in (exc.details() or "")
        assert await state(two_cards) == before

        # Per item in a batch: the job hold priced with V2, the amount hold (no card) with V1.
        batch = pb.CommitBatchRequest(
            organization=ORG,
            items=[
                pb.CommitItem(reservation_id=JOB_HELD, usage_lines=USAGE, rate_card_version=V2),
                pb.CommitItem(reservation_id=HELD, usage_lines=USAGE, rate_card_version=V1),
            ],
        )
        out = await call(stub, "CommitBatch", batch)
        mismatch = (grpc.StatusCode.FAILED_PRECONDITION.value[0], "RATE_CARD_MISMATCH")
        assert [(r.code, r.reason) for r in out.results] == [mismatch, mismatch]
        assert await state(two_cards) == before

        exc = await refused(
            stub, "Commit", mutate("Commit", {**COMMIT_USAGE, "rate_card_version": "2020-01-01.1"})
        )
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
        assert details(exc)["ErrorInfo"].reason == "RATE_CARD_VERSION_UNKNOWN"


async def test_grant_past_balance_limit_changes_nothing(sidecar, stub) -> None:
    await seeded_state(sidecar)
    for i in range(4):  # 4·10^15 + 10^7 granted; one more 10^15 passes 2^52
        await call(stub, "Grant", mutate("Grant", {"grant_id": f"big-{i}", "amount_uecu": 10**15}))
    before = await state(sidecar)
    exc = await refused(stub, "Grant", mutate("Grant", {"amount_uecu": MAX_REQUEST_UECU}))
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE, exc.details()
    assert details(exc)["ErrorInfo"].reason == "BALANCE_LIMIT"
    assert await state(sidecar) == before


REPLAYS = [
    pytest.param(
        "Reserve",
        pb.ReserveRequest(
            reservation_id=HELD,
            account=ACCOUNT,
            amount_uecu=HELD_UECU,
            job_type=pb.JOB_TYPE_INFERENCE,
            model="gpt-4o",
            ttl_ms=HOUR_MS,
        ),
        id="reserve",
    ),
    pytest.param(
        "Commit",
        pb.CommitRequest(reservation_id=DONE, organization=ORG, actual_uecu=150_000),
        id="commit",
    ),
    pytest.param("Release", pb.ReleaseRequest(reservation_id=GONE, organization=ORG), id="release"),
    pytest.param(
        "Extend",
        pb.ExtendRequest(reservation_id=HELD, organization=ORG, ttl_ms=HOUR_MS, sequence=HELD_SEQ),
        id="extend",
    ),
    pytest.param(
        "Grant",
        pb.GrantRequest(
            grant_id="seed-grant", organization=ORG, amount_uecu=GRANTED, kind=pb.GRANT_KIND_TOP_UP
        ),
        id="grant",
    ),
    pytest.param(
        "SetCap",
        pb.SetCapRequest(organization=ORG, scope=pb.CAP_SCOPE_TEAM, id=TEAM, cap_uecu=TEAM_CAP),
        id="set-cap-same",
    ),
    pytest.param("GetBalance", BASE["GetBalance"], id="balance"),
    # The spec's fingerprint matches the seeded hold's: a replay, whatever it would cost now.
    pytest.param(
        "Reserve",
        pb.ReserveRequest(reservation_id=JOB_HELD, account=ACCOUNT, ttl_ms=HOUR_MS, job=SEED_JOB),
        id="reserve-job",
    ),
    # No side effects at all.
    pytest.param("Preview", BASE["Preview"], id="preview"),
    pytest.param("GetRateCard", BASE["GetRateCard"], id="rate-card"),
    pytest.param(
        "ApproveJob",
        pb.ApproveJobRequest(
            job_id=OPEN_JOB,
            account=ACCOUNT,
            approved_total_uecu=OPEN_JOB_UECU,
            job_type=pb.JOB_TYPE_JUDGE,
            ttl_ms=HOUR_MS,
        ),
        id="approve-job",
    ),
    pytest.param("CloseJob", pb.CloseJobRequest(organization=ORG, job_id=CLOSED_JOB), id="close"),
    pytest.param(
        "Reserve",
        pb.ReserveRequest(
            reservation_id=JOB_STEP,
            account=ACCOUNT,
            amount_uecu=JOB_STEP_UECU,
            job_type=pb.JOB_TYPE_JUDGE,
            model="judge-1",
            ttl_ms=HOUR_MS,
            job_id=OPEN_JOB,
        ),
        id="reserve-job-step",
    ),
]


@pytest.mark.parametrize(("rpc", "request_"), REPLAYS)
async def test_identical_replay_changes_nothing(sidecar, stub, rpc: str, request_: Message) -> None:
    before = await seeded_state(sidecar)
    answer = await call(stub, rpc, request_)
    if hasattr(answer, "replayed"):
        assert answer.replayed
    assert await state(sidecar) == before


# -- fuzz ----------------------------------------------------------------------------------------

#: Every code a Reserve, Commit, Release or Extend may answer (ecu_sidecar.status, proto header).
DOCUMENTED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
    }
)

_any_text = st.one_of(
    st.sampled_from(["", "a" * 65, "a" * 129, "{acme}", "acme\n", "ac me", "a\x00", "é", "a:b"]),
    st.text(max_size=140),
)
#: Edges of every integer range in the API.
EDGE_INTS = (
    *(0, 1, -1, 999, MAX_TTL_MS, MAX_TTL_MS + 1),
    *(MAX_REQUEST_UECU, MAX_REQUEST_UECU + 1, MAX_GRANTED_UECU),
    *(2**53 - 1, 2**53, INT64_MAX, INT64_MIN),
)
_any_int = st.one_of(st.sampled_from(EDGE_INTS), st.integers(INT64_MIN, INT64_MAX))
#: Arbitrary TTLs, minus the valid ones short enough to expire while the test runs (the
#: background sweeper would then write between two snapshots).
_any_ttl = _any_int.filter(lambda v: not 1_000 <= v < 60_000)
_any_enum = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))

_rid = st.one_of(
    st.sampled_from([HELD, DONE, GONE, "fz-1", "fz-2"]),
    st.from_regex(r"[A-Za-z0-9._-]{1,16}", fullmatch=True),
)
_org = st.sampled_from([ORG, ORG, "nobody"])
_ttl = st.one_of(st.sampled_from([0, HOUR_MS, MAX_TTL_MS]), st.integers(60_000, MAX_TTL_MS))

#: Per RPC and input field: (a valid value, an arbitrary value).
FUZZ: dict[str, dict[str, tuple[Any, Any]]] = {
    "Reserve": {
        "reservation_id": (_rid, _any_text),
        "account.organization": (_org, _any_text),
        "account.team": (st.sampled_from(["", TEAM]), _any_text),
        "account.project": (st.sampled_from(["", PROJECT]), _any_text),
        "account.user": (st.sampled_from(["", USER]), _any_text),
        "amount_uecu": (st.integers(1, 3 * ECU), _any_int),
        "job_type": (st.integers(1, 5), _any_enum),
        "model": (st.sampled_from(["gpt-4o", "judge-1", "openai/gpt-4o@2024"]), _any_text),
        "ttl_ms": (_ttl, _any_ttl),
    },
    "Commit": {
        "reservation_id": (_rid, _any_text),
        "organization": (_org, _any_text),
        "actual_uecu": (st.integers(0, 2 * ECU), _any_int),
        "usage.tokens_in": (st.integers(0, 10**6), _any_int),
        "usage.tokens_out": (st.integers(0, 10**6), _any_int),
        "usage.calls": (st.integers(0, 100), _any_int),
    },
    "Release": {
        "reservation_id": (_rid, _any_text),
        "organization": (_org, _any_text),
    },
    "Extend": {
        "reservation_id": (_rid, _any_text),
        "organization": (_org, _any_text),
        "ttl_ms": (_ttl, _any_ttl),
        "sequence": (st.integers(1, 5), _any_int),
    },
}

#: Key prefixes (one per run of the fuzz test) already seeded.
_FUZZ_SEEDED: set[str] = set()


@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_fuzz_answers_only_documented_codes(sidecar, stub, data: st.DataObject) -> None:
    """Valid requests with up to two fields replaced by arbitrary values: only documented codes;
    INVALID_ARGUMENT names a replaced field (the only one when one was replaced) and changes
    nothing."""
    # The fixture lives across examples: seed once per run.
    if sidecar.settings.key_prefix not in _FUZZ_SEEDED:
        await seed(sidecar.engine)
        _FUZZ_SEEDED.add(sidecar.settings.key_prefix)
    rpc = data.draw(st.sampled_from(sorted(FUZZ)), label="rpc")
    fields = FUZZ[rpc]
    replaced = data.draw(st.sets(st.sampled_from(sorted(fields)), max_size=2), label="replaced")
    values = {}
    for path, (valid, arbitrary) in fields.items():
        values[path] = data.draw(arbitrary if path in replaced else valid, label=path)
    request_ = assign(type(BASE[rpc])(), values)

    before = await state(sidecar)
    try:
        await call(stub, rpc, request_)
        event(f"{rpc} OK")
        return
    except grpc.aio.AioRpcError as exc:
        error = exc
    event(f"{rpc} {error.code().name}")
    assert error.code() in DOCUMENTED, (rpc, request_, error.code(), error.details())
    d = details(error)
    assert d["ErrorInfo"].reason, error.details()
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field = d["BadRequest"].field_violations[0].field
        assert field in (error.details() or "")
        assert d["ErrorInfo"].reason == "INVALID_ARGUMENT"
        # The valid values are valid in every combination (a valid model is never empty), so
        # only a replaced field can be the one refused.
        assert field in replaced, (field, replaced)
        assert await state(sidecar) == before, (rpc, request_)
