"""The bad-input matrix over the gRPC API: every RPC, every input field, every invalid class.

Each invalid request must be answered INVALID_ARGUMENT with a message naming the field, a
google.rpc BadRequest whose first violation is that field path and an ErrorInfo with reason
INVALID_ARGUMENT, and must leave Redis byte-for-byte as it was. Every case starts from the
same seeded organization (funded, team and project caps, a live extended hold, a committed and
a released hold) so there is state a wrongly accepted request could change.

Refusals that are not about input (NOT_FOUND, RESOURCE_EXHAUSTED, ALREADY_EXISTS,
FAILED_PRECONDITION, ABORTED, UNAUTHENTICATED, ...) and identical replays must change nothing
either. A bounded hypothesis fuzz closes the module: Reserve/Commit/Release/Extend messages with
arbitrary values get only documented codes, and INVALID_ARGUMENT never comes with a state change.

Every hold lives for an hour, so nothing expires (and no sweep writes) during a test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    MAX_REQUEST_UECU,
    AccountRef,
    CommitItem,
    GrantKind,
    JobType,
    ReserveItem,
)
from ecu_sidecar.server import SidecarServer
from tests.conftest import ADMIN_METADATA, snapshot
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
MAX_BATCH = 2_000

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
        ],
        batch=True,
    )
    await engine.extend(ORG, HELD, HOUR_MS, 1)
    await engine.extend(ORG, HELD, HOUR_MS, HELD_SEQ)
    await engine.commit(ORG, [CommitItem(DONE, 150_000)])
    await engine.release(ORG, GONE)


async def state(server: SidecarServer) -> dict[bytes, Any]:
    return await snapshot(server.store, server.settings.key_prefix)


async def seeded_state(server: SidecarServer) -> dict[bytes, Any]:
    """Seed, check the seed really left state behind, and return its snapshot."""
    await seed(server.engine)
    snap = await state(server)
    holds = next(v for k, v in snap.items() if k.endswith(b":holds"))[1]
    assert {HELD.encode(), DONE.encode(), GONE.encode()} <= set(holds)
    assert any(k.endswith(b":outbox") for k in snap)
    return snap


# -- calling the API ---------------------------------------------------------------------------

ADMIN_RPCS = frozenset({"Grant", "SetCap"})


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
}

_STEP = re.compile(r"([a-z_]+)(?:\[(\d+)\])?")


def assign(msg: Message, changes: Mapping[str, Any]) -> Message:
    """Set each proto field path (``account.team``, ``items[2].usage.calls``) of ``msg``."""
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target: Any = msg
        for part in parents:
            m = _STEP.fullmatch(part)
            assert m is not None, part
            target = getattr(target, m.group(1))
            if m.group(2) is not None:
                target = target[int(m.group(2))]
        setattr(target, leaf, value)
    return msg


def mutate(rpc: str, changes: Mapping[str, Any]) -> Message:
    """A copy of BASE[rpc] with the given field paths set."""
    msg = type(BASE[rpc])()
    msg.CopyFrom(BASE[rpc])
    return assign(msg, changes)


def case(rpc: str, field: str, label: str, changes: Any, expect: str | None = None) -> Any:
    """One test: ``changes`` is a value for ``field`` or a mapping of paths to values."""
    if not isinstance(changes, Mapping):
        changes = {field: changes}
    return pytest.param(
        rpc, mutate(rpc, changes), expect or field, id=f"{rpc}-{expect or field}-{label}"
    )


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


RESERVE = [
    *field_cases("Reserve", "reservation_id", CALLER_IDS),
    *account_cases("Reserve"),
    *field_cases("Reserve", "amount_uecu", BAD_POSITIVE_AMOUNTS),
    *field_cases("Reserve", "job_type", BAD_ENUMS),
    *model_cases("Reserve", ""),
    *field_cases("Reserve", "ttl_ms", BAD_TTLS),
]

# The bad item is always in the middle (items[2] of 5): the field path must say which.
RESERVE_BATCH = [
    *account_cases("ReserveBatch"),
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

CASES = [
    *RESERVE,
    *RESERVE_BATCH,
    *COMMIT,
    *COMMIT_BATCH,
    *RELEASE,
    *EXTEND,
    *GET_BALANCE,
    *GRANT,
    *SET_CAP,
]


def test_matrix_covers_every_rpc_and_field() -> None:
    """Every RPC and every scalar input field of its request appears in the matrix."""
    service = pb.DESCRIPTOR.services_by_name["Quota"]
    assert {m.name for m in service.methods} == set(BASE)
    fields_hit = {(p.values[0], re.sub(r"\[\d+\]", "[]", p.values[2])) for p in CASES}

    def leaves(desc: Any, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for f in desc.fields:
            path = prefix + f.name + ("[]" if f.is_repeated else "")
            if f.message_type is not None:
                out |= leaves(f.message_type, path + ".")
            elif f.name != "clear":  # a bool: no invalid value exists
                out.add(path)
        return out

    for method in service.methods:
        missing = {
            path for path in leaves(method.input_type) if (method.name, path) not in fields_hit
        }
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
