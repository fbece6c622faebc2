"""The gRPC edge: status codes, google.rpc details, admin gating, health and reflection."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ecu_sidecar import errors
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.pricing import load_rate_card
from ecu_sidecar.status import STATUS_BY_ERROR
from tests.conftest import ADMIN_METADATA, EXAMPLE_RATE_CARD


def details(exc: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(exc)
    assert status is not None, "error carries no google.rpc.Status"
    out: dict[str, object] = {}
    for any_ in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
        ):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.__name__] = msg
    return out


async def grant(stub, org: str, amount: int, gid: str = "g1") -> pb.GrantResponse:
    return await stub.Grant(
        pb.GrantRequest(
            grant_id=gid, organization=org, amount_uecu=amount, kind=pb.GRANT_KIND_TOP_UP
        ),
        metadata=ADMIN_METADATA,
    )


def test_every_error_has_a_status() -> None:
    import ecu_sidecar.pricing  # noqa: F401  (its errors subclass EcuError too)

    def all_subclasses(cls: type) -> set[type]:
        out = set()
        for sub in cls.__subclasses__():
            out |= {sub} | all_subclasses(sub)
        return out

    # Ledger errors that are also EcuErrors map through their EcuError base class.
    domain = {
        c for c in all_subclasses(errors.EcuError) if c.__module__ != "ecu_sidecar.ledger.types"
    }
    assert domain == set(STATUS_BY_ERROR)


async def test_reserve_commit_roundtrip(stub) -> None:
    await grant(stub, "acme", 1_000_000)
    r = await stub.Reserve(
        pb.ReserveRequest(
            reservation_id="r1",
            account=pb.Account(organization="acme", team="t", user="u"),
            amount_uecu=400_000,
            job_type=pb.JOB_TYPE_INFERENCE,
            model="gpt-4o",
            ttl_ms=60_000,
        )
    )
    assert r.hold.state == pb.HOLD_STATE_ACTIVE and r.available_uecu == 600_000
    c = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r1",
            organization="acme",
            actual_uecu=150_000,
            usage=pb.Usage(tokens_in=10),
        )
    )
    assert (c.committed_uecu, c.released_uecu, c.available_uecu) == (150_000, 250_000, 850_000)
    b = (await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))).balance
    assert (b.granted_uecu, b.committed_uecu, b.held_uecu, b.available_uecu) == (
        1_000_000,
        150_000,
        0,
        850_000,
    )
    assert [t.id for t in b.teams] == ["t"] and b.teams[0].used_uecu == 150_000


async def test_insufficient_ecu_has_quota_failure(stub) -> None:
    await grant(stub, "acme", 100)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Reserve(
            pb.ReserveRequest(
                reservation_id="r1",
                account=pb.Account(organization="acme"),
                amount_uecu=101,
                job_type=pb.JOB_TYPE_GEPA,
            )
        )
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    d = details(ei.value)
    assert d["ErrorInfo"].reason == "INSUFFICIENT_ECU"
    assert d["ErrorInfo"].metadata["available"] == "100"
    assert d["QuotaFailure"].violations[0].subject == "organization:acme"
    assert "available 100" in d["QuotaFailure"].violations[0].description


async def test_invalid_argument_names_field(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Reserve(
            pb.ReserveRequest(
                reservation_id="r{1}",
                account=pb.Account(organization="acme"),
                amount_uecu=1,
                job_type=pb.JOB_TYPE_GEPA,
            )
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reservation_id" in ei.value.details()
    assert details(ei.value)["BadRequest"].field_violations[0].field == "reservation_id"


async def test_admin_rpcs_need_the_token(stub) -> None:
    req = pb.GrantRequest(
        grant_id="g", organization="acme", amount_uecu=5, kind=pb.GRANT_KIND_TOP_UP
    )
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Grant(req)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Grant(req, metadata=(("authorization", "Bearer wrong"),))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, (
        "a refused grant must not create the account"
    )


NOBODY = "org-without-account"

#: Every RPC an organization without an account is refused by, with a valid request for it.
NO_ACCOUNT_CALLS = {
    "GetBalance": pb.GetBalanceRequest(organization=NOBODY),
    "Reserve": pb.ReserveRequest(
        reservation_id="r1",
        account=pb.Account(organization=NOBODY),
        amount_uecu=1,
        job_type=pb.JOB_TYPE_GEPA,
    ),
    "ReserveBatch": pb.ReserveBatchRequest(
        account=pb.Account(organization=NOBODY),
        items=[pb.ReserveItem(reservation_id="r1", amount_uecu=1, job_type=pb.JOB_TYPE_GEPA)],
    ),
    "Commit": pb.CommitRequest(reservation_id="r1", organization=NOBODY, actual_uecu=1),
    "CommitBatch": pb.CommitBatchRequest(
        organization=NOBODY, items=[pb.CommitItem(reservation_id="r1", actual_uecu=1)]
    ),
    "Release": pb.ReleaseRequest(reservation_id="r1", organization=NOBODY),
    "Extend": pb.ExtendRequest(reservation_id="r1", organization=NOBODY, sequence=1),
    "SetCap": pb.SetCapRequest(
        organization=NOBODY, scope=pb.CAP_SCOPE_TEAM, id="team-a", cap_uecu=1
    ),
    "SetAutoTopUp": pb.SetAutoTopUpRequest(organization=NOBODY, threshold_uecu=1, amount_uecu=1),
}


@pytest.mark.parametrize("rpc", sorted(NO_ACCOUNT_CALLS))
async def test_account_not_found_names_the_organization(stub, rpc: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await getattr(stub, rpc)(NO_ACCOUNT_CALLS[rpc], metadata=ADMIN_METADATA)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value.details()
    assert ei.value.details() == f"organization {NOBODY} has no ECU account (no grant yet)"
    info = details(ei.value)["ErrorInfo"]
    assert info.reason == "ACCOUNT_NOT_FOUND"
    assert info.metadata["organization"] == NOBODY


def test_wire_names_are_the_proto_enum_names() -> None:
    """Error messages spell enum values as the wire and JSON do; every spelling exists."""
    from ecu_sidecar.model import GrantKind, JobType
    from ecu_sidecar.pricing import UsageKind

    for members, enum in (
        (JobType, pb.JobType),
        (GrantKind, pb.GrantKind),
        (UsageKind, pb.UsageKind),
    ):
        assert {m.wire_name for m in members} == set(enum.keys()) - {enum.Name(0)}


#: A request with an enum field left unset (0) or set to a number the proto does not define,
#: the field path, and the message's list of accepted values.
ENUM_CASES = [
    (
        "Grant",
        pb.GrantRequest(grant_id="g1", organization="acme", amount_uecu=1),
        "kind",
        "kind: must be one of GRANT_KIND_STARTER, GRANT_KIND_TOP_UP, GRANT_KIND_AUTO_TOP_UP, "
        "GRANT_KIND_ENTERPRISE, GRANT_KIND_ADJUSTMENT, got ",
        "GRANT_KIND_UNSPECIFIED",
    ),
    (
        "Reserve",
        pb.ReserveRequest(
            reservation_id="r1", account=pb.Account(organization="acme"), amount_uecu=1
        ),
        "job_type",
        "job_type: must be one of JOB_TYPE_INFERENCE, JOB_TYPE_JUDGE, JOB_TYPE_GEPA, "
        "JOB_TYPE_TRACE_EVAL, JOB_TYPE_ENGINE, got ",
        "JOB_TYPE_UNSPECIFIED",
    ),
    (
        "SetCap",
        pb.SetCapRequest(organization="acme", id="team-a", cap_uecu=1),
        "scope",
        "scope: must be CAP_SCOPE_TEAM or CAP_SCOPE_PROJECT, got ",
        "CAP_SCOPE_UNSPECIFIED",
    ),
    (
        "Commit",
        pb.CommitRequest(
            reservation_id="r1",
            organization="acme",
            usage_lines=[pb.UsageLine(model="gpt-4o", tokens_in=1, calls=1)],
            rate_card_version=load_rate_card(EXAMPLE_RATE_CARD).version,
        ),
        "usage_lines[0].kind",
        "usage_lines[0].kind: must be one of USAGE_KIND_INFERENCE, USAGE_KIND_JUDGE, "
        "USAGE_KIND_GEPA_ITERATION, USAGE_KIND_TRACE, got ",
        "USAGE_KIND_UNSPECIFIED",
    ),
]


@pytest.mark.parametrize("unset", [True, False], ids=["unset", "unknown-number"])
@pytest.mark.parametrize(("rpc", "request_", "field", "message", "unspecified"), ENUM_CASES)
async def test_enum_errors_use_the_wire_spelling(
    stub, rpc: str, request_, field: str, message: str, unspecified: str, unset: bool
) -> None:
    await grant(stub, "acme", 1_000_000)
    request = type(request_)()
    request.CopyFrom(request_)
    if not unset:  # a number from a newer proto: named by its number
        if rpc == "Commit":
            request.usage_lines[0].kind = 99
        else:
            setattr(request, field, 99)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await getattr(stub, rpc)(request, metadata=ADMIN_METADATA)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == message + (unspecified if unset else "99")
    assert details(ei.value)["BadRequest"].field_violations[0].field == field


async def test_health_serving(sidecar) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "ecu_sidecar.api.v1.Quota"):
            resp = await h.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(sidecar) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in response.list_services_response.service}
            break
    assert {"ecu_sidecar.api.v1.Quota", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"overage_uecu": 7, "unbilled_overage_uecu": 2, "late": True},
        {"replayed": True, "degraded": True, "available_uecu": 0},
        {"committed_uecu": 0, "released_uecu": 0},
        {"quote": "priced"},
    ],
    ids=["plain", "overage-late", "replayed-degraded", "zero", "quote"],
)
def test_a_commit_answer_carries_every_field(changes: dict[str, object]) -> None:
    from ecu_sidecar.convert import commit_to_pb, quote_to_pb
    from ecu_sidecar.model import CommitOutcome, JobType
    from ecu_sidecar.pricing import Line, Quote
    from ecu_sidecar.pricing.pricer import Unit

    line = Line("judge calls", 3, Unit.CALL, 4, 1, 12, "gpt-4o-mini", JobType.JUDGE)
    quote = Quote(total_uecu=12, lines=(line,), rate_card_version="v1")
    values = {"committed_uecu": 90, "released_uecu": 10, "available_uecu": 5_000, **changes}
    if values.get("quote"):
        values["quote"] = quote
    o = CommitOutcome("r-1", **values)  # type: ignore[arg-type]
    m = commit_to_pb(o)
    for name in (
        "reservation_id",
        "committed_uecu",
        "released_uecu",
        "overage_uecu",
        "unbilled_overage_uecu",
        "late",
        "available_uecu",
        "replayed",
        "degraded",
    ):
        assert getattr(m, name) == getattr(o, name), name
    assert m.HasField("quote") == bool(changes.get("quote"))
    if o.quote:
        assert m.quote == quote_to_pb(quote)


async def test_batch_answers_carry_every_hold_and_result(stub) -> None:
    # ReserveBatch and CommitBatch answers carry every hold field, one (empty) quote per
    # amount item, one result per commit item, failures in their own slot.
    await grant(stub, "acme", 1_000_000)
    single = await stub.Reserve(
        pb.ReserveRequest(
            reservation_id="s1",
            account=pb.Account(organization="acme"),
            amount_uecu=1_000,
            job_type=pb.JOB_TYPE_JUDGE,
            model="gpt-4o-mini",
            ttl_ms=60_000,
        )
    )
    out = await stub.ReserveBatch(
        pb.ReserveBatchRequest(
            account=pb.Account(organization="acme"),
            items=[
                pb.ReserveItem(
                    reservation_id=f"b{i}",
                    amount_uecu=1_000 * (i + 1),
                    job_type=pb.JOB_TYPE_JUDGE,
                    model="gpt-4o-mini",
                    ttl_ms=60_000,
                )
                for i in range(3)
            ],
        )
    )
    assert [h.reservation_id for h in out.holds] == ["b0", "b1", "b2"]
    assert [h.amount_uecu for h in out.holds] == [1_000, 2_000, 3_000]
    for h in out.holds:
        assert h.organization == "acme" and h.state == pb.HOLD_STATE_ACTIVE
        assert 0 <= h.deadline_unix_ms - single.hold.deadline_unix_ms < 60_000
    assert list(out.quotes) == [pb.Quote()] * 3 and out.available_uecu == 1_000_000 - 7_000
    assert single.hold.organization == "acme" and single.hold.amount_uecu == 1_000

    done = await stub.CommitBatch(
        pb.CommitBatchRequest(
            organization="acme",
            items=[
                pb.CommitItem(reservation_id="b0", actual_uecu=500),
                pb.CommitItem(reservation_id="nope", actual_uecu=1),
                pb.CommitItem(reservation_id="b2", actual_uecu=3_000),
            ],
        )
    )
    ok0, missing, ok2 = done.results
    assert (ok0.code, ok0.commit.committed_uecu, ok0.commit.released_uecu) == (0, 500, 500)
    assert (ok2.code, ok2.commit.committed_uecu, ok2.commit.released_uecu) == (0, 3_000, 0)
    assert missing.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.commit.reservation_id == "nope" and missing.reason
