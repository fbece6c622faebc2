"""Request bytes that do not parse as the RPC's message: INVALID_ARGUMENT, counted, no traceback.

grpc.aio deserializes a request before any handler runs and, left to itself, answers a failure
UNKNOWN and logs its traceback at ERROR. The server installs tolerant deserializers
(ecu_sidecar.service.tolerant_deserializer) so that every RPC of the Quota service refuses such
bytes like any other invalid request: INVALID_ARGUMENT naming the RPC and the message type, an
ErrorInfo and a BadRequest, one count in ecu_rpc_requests_total and ecu_rpc_errors_total, at
most a DEBUG line, and no state change.

The bytes go through a generic channel call (no serializer), as a fuzzer or a client built
against another version of the protos would send them, to a real sidecar on 127.0.0.1 backed by
real Redis. The cases are built from the same valid base requests as the bad-input matrix:
random bytes, a valid request cut short inside a field, and a string field (the organization)
whose bytes are not UTF-8 (proto3 requires UTF-8; the upb runtime refuses it while parsing).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.server import SERVICE_NAME, SidecarServer
from tests.conftest import ADMIN_METADATA, require_redis
from tests.test_bad_input import (
    ADMIN_RPCS,
    BASE,
    CLOSED_JOB,
    OPEN_JOB,
    ORG,
    PROJECT,
    TEAM,
    seeded_state,
    state,
)
from tests.test_service import details

METHODS = pb.DESCRIPTOR.services_by_name["Quota"].methods_by_name
REQUEST_TYPES = {name: m.input_type for name, m in METHODS.items()}


@pytest.fixture
def backend() -> str:
    """Decoding happens before any store call: real Redis is enough (no embedded variant)."""
    require_redis()
    return "redis"


def parses(rpc: str, data: bytes) -> bool:
    cls = type(BASE[rpc])
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


def random_payloads(rpc: str, count: int) -> list[bytes]:
    """``count`` seeded random byte strings that do not parse as the RPC's request."""
    rng = random.Random(f"undecodable-{rpc}")
    out: list[bytes] = []
    while len(out) < count:
        data = rng.randbytes(rng.randint(1, 64))
        if not parses(rpc, data):
            out.append(data)
    return out


def truncated(rpc: str) -> bytes | None:
    """The longest prefix of the valid base request that does not parse (cut inside a field);
    None when the request has no bytes to cut (GetRateCardRequest has no fields)."""
    data = BASE[rpc].SerializeToString()
    for end in range(len(data) - 1, 0, -1):
        if not parses(rpc, data[:end]):
            return data[:end]
    return None


def bad_utf8(rpc: str) -> bytes | None:
    """The valid base request with the organization's bytes made invalid UTF-8 (same length,
    so every length prefix still holds); None when the request carries no organization."""
    data = BASE[rpc].SerializeToString()
    if ORG.encode() not in data:
        return None
    return data.replace(ORG.encode(), b"\xff" + ORG.encode()[1:], 1)


def cases() -> list[Any]:
    out = []
    for rpc in sorted(METHODS):
        payloads = {
            "random-1": random_payloads(rpc, 2)[0],
            "random-2": random_payloads(rpc, 2)[1],
            "unterminated-varint": b"\x08\xff\xff\xff",
            "truncated": truncated(rpc),
            "bad-utf8": bad_utf8(rpc),
        }
        for label, data in payloads.items():
            if data is not None:
                out.append(pytest.param(rpc, data, id=f"{rpc}-{label}"))
    return out


CASES = cases()


def test_cases_cover_every_rpc_and_kind() -> None:
    """Every RPC of the service descriptor is exercised; every request with an organization
    gets a bad-UTF-8 case and every request with fields a truncated one."""
    assert set(BASE) == set(METHODS)
    ids = {p.id for p in CASES}
    for rpc in METHODS:
        assert f"{rpc}-random-1" in ids
        assert f"{rpc}-unterminated-varint" in ids
        if BASE[rpc].ByteSize():
            assert f"{rpc}-truncated" in ids, rpc
        if rpc not in ("GetRateCard",):
            assert f"{rpc}-bad-utf8" in ids, rpc
    for p in CASES:
        rpc, data = p.values
        assert not parses(rpc, data), p.id


async def send(sidecar: SidecarServer, rpc: str, data: bytes) -> grpc.aio.AioRpcError:
    """Send raw bytes as the RPC's request; return the error it must end with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        method = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")  # no serializer: raw bytes
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await method(data, metadata=ADMIN_METADATA if rpc in ADMIN_RPCS else None)
    return ei.value


def counted(sidecar: SidecarServer, rpc: str) -> tuple[float, float]:
    """This RPC's INVALID_ARGUMENT count in ecu_rpc_requests_total and ecu_rpc_errors_total."""
    get = sidecar.registry.get_sample_value
    return (
        get("ecu_rpc_requests_total", {"method": rpc, "code": "INVALID_ARGUMENT"}) or 0.0,
        get("ecu_rpc_errors_total", {"method": rpc, "reason": "INVALID_ARGUMENT"}) or 0.0,
    )


def assert_undecodable(exc: grpc.aio.AioRpcError, rpc: str) -> None:
    message_type = REQUEST_TYPES[rpc].full_name
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    prefix = f"{rpc}: the request body is not a valid {message_type}: "
    assert (exc.details() or "").startswith(prefix), exc.details()
    cause = (exc.details() or "")[len(prefix) :]
    assert cause and "Traceback" not in cause
    d = details(exc)
    info = d["ErrorInfo"]
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "ecu-sidecar"
    assert dict(info.metadata) == {"rpc": rpc, "message_type": message_type}
    (violation,) = d["BadRequest"].field_violations
    assert violation.field == ""  # the whole body, not one field
    assert violation.description == f"the request body is not a valid {message_type}: {cause}"


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [(r.name, r.levelname, r.getMessage()) for r in loud]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(("rpc", "data"), CASES)
async def test_undecodable_bytes_are_invalid_argument(
    sidecar, stub, caplog: pytest.LogCaptureFixture, rpc: str, data: bytes
) -> None:
    before = await seeded_state(sidecar)
    balance = await stub.GetBalance(pb.GetBalanceRequest(organization=ORG))
    requests, errors = counted(sidecar, rpc)
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    exc = await send(sidecar, rpc, data)

    assert_undecodable(exc, rpc)
    assert counted(sidecar, rpc) == (requests + 1, errors + 1)
    assert_no_traceback(caplog)
    # Refused before the handler read anything: Redis is byte-for-byte as it was.
    assert await state(sidecar) == before
    assert await stub.GetBalance(pb.GetBalanceRequest(organization=ORG)) == balance


async def test_bad_utf8_in_a_nested_string_field(sidecar, caplog) -> None:
    """A string deep inside a job spec (a chat message's content) is checked the same way."""
    request = pb.PreviewRequest(
        account=pb.Account(organization=ORG),
        job=pb.JobSpec(
            items=[
                pb.JobItem(
                    inference=pb.InferenceSpec(
                        model="gpt-4o",
                        messages=pb.ChatMessages(
                            messages=[pb.ChatMessage(role="user", content="héllo")]
                        ),
                    )
                )
            ]
        ),
    )
    data = request.SerializeToString()
    bad = data.replace("é".encode(), b"\xc3\x28", 1)  # an invalid two-byte sequence
    assert bad != data and not parses("Preview", bad)
    caplog.set_level(logging.DEBUG)
    exc = await send(sidecar, "Preview", bad)
    assert_undecodable(exc, "Preview")
    assert "UTF-8" in (exc.details() or "")
    assert_no_traceback(caplog)


async def test_fuzzed_bytes_never_get_unknown(sidecar, caplog) -> None:
    """Bounded fuzz over every RPC: bytes that do not parse get the refusal above, bytes that
    happen to parse are handled as requests; nothing is UNKNOWN or INTERNAL, nothing is logged
    louder than DEBUG."""
    await seeded_state(sidecar)
    caplog.set_level(logging.DEBUG)
    rng = random.Random("undecodable-fuzz")
    undecodable = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        for rpc in sorted(METHODS):
            method = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")
            for _ in range(25):
                data = rng.randbytes(rng.randint(0, 96))
                try:
                    await method(data)  # no admin token: a parsed admin request is refused
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() not in (
                        grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL,
                    ), (rpc, data, exc.code(), exc.details())
                    if not parses(rpc, data):
                        assert_undecodable(exc, rpc)
                        undecodable += 1
                else:
                    assert parses(rpc, data), (rpc, data)
    assert undecodable > 100  # most random bytes do not parse: the fuzz is not vacuous
    assert_no_traceback(caplog)


# -- the job RPCs and a step's job_id (issue 16) -------------------------------------------------

#: Valid requests naming a job: the job RPCs' base requests, and a step and a batch of steps of
#: the seeded open job (a Reserve / ReserveBatch with job_id).
JOB_REQUESTS: dict[str, tuple[str, Any]] = {
    "ApproveJob": ("ApproveJob", BASE["ApproveJob"]),
    "GetJob": ("GetJob", BASE["GetJob"]),
    "HeartbeatJob": ("HeartbeatJob", BASE["HeartbeatJob"]),
    "CloseJob": ("CloseJob", BASE["CloseJob"]),
    "Reserve-job-id": (
        "Reserve",
        pb.ReserveRequest(
            reservation_id="new-step-1",
            account=pb.Account(organization=ORG, team=TEAM, project=PROJECT),
            amount_uecu=10_000,
            job_type=pb.JOB_TYPE_JUDGE,
            model="judge-1",
            ttl_ms=3_600_000,
            job_id=OPEN_JOB,
        ),
    ),
    "ReserveBatch-job-id": (
        "ReserveBatch",
        pb.ReserveBatchRequest(
            account=pb.Account(organization=ORG, team=TEAM, project=PROJECT),
            items=[
                pb.ReserveItem(
                    reservation_id=f"new-step-{i}",
                    amount_uecu=10_000,
                    job_type=pb.JOB_TYPE_JUDGE,
                    model="judge-1",
                    ttl_ms=3_600_000,
                )
                for i in range(2, 4)
            ],
            job_id=OPEN_JOB,
        ),
    ),
}


def job_id_bytes(request: Any) -> bytes:
    return request.job_id.encode()


def job_cases() -> list[Any]:
    """Bytes that break the request where it names the job: the job id's bytes made invalid
    UTF-8 (same length), the request cut inside the job id, and the job id's length prefix
    claiming more bytes than follow."""
    out = []
    for label, (rpc, request) in JOB_REQUESTS.items():
        data, jid = request.SerializeToString(), job_id_bytes(request)
        at = data.index(jid)
        assert data[at - 1] == len(jid)  # a one-byte length prefix right before the id
        payloads = {
            "job-id-bad-utf8": data[:at] + b"\xff" + data[at + 1 :],
            "cut-in-job-id": data[: at + len(jid) // 2],
            "job-id-length-beyond-the-end": data[: at - 1] + bytes([len(jid) + 100]) + data[at:],
        }
        for kind, payload in payloads.items():
            out.append(pytest.param(rpc, payload, id=f"{label}-{kind}"))
    return out


JOB_CASES = job_cases()


async def jobs_seen(stub: Any) -> list[Any]:
    """The seeded jobs as GetJob answers them (both must be unchanged by a refusal)."""
    return [
        await stub.GetJob(pb.GetJobRequest(organization=ORG, job_id=job_id))
        for job_id in (OPEN_JOB, CLOSED_JOB)
    ]


def test_job_cases_do_not_parse() -> None:
    assert len(JOB_CASES) == 3 * len(JOB_REQUESTS)
    for p in JOB_CASES:
        rpc, data = p.values
        assert not parses(rpc, data), p.id


@pytest.mark.parametrize(("rpc", "data"), JOB_CASES)
async def test_undecodable_job_requests_change_no_job(
    sidecar, stub, caplog: pytest.LogCaptureFixture, rpc: str, data: bytes
) -> None:
    before = await seeded_state(sidecar)
    jobs = await jobs_seen(stub)
    requests, errors = counted(sidecar, rpc)
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    exc = await send(sidecar, rpc, data)

    assert_undecodable(exc, rpc)
    assert counted(sidecar, rpc) == (requests + 1, errors + 1)
    assert_no_traceback(caplog)
    assert await state(sidecar) == before
    assert await jobs_seen(stub) == jobs


@pytest.mark.parametrize("label", sorted(JOB_REQUESTS))
async def test_the_uncorrupted_job_requests_are_served(sidecar, label: str) -> None:
    """Control: the same bytes before the damage are valid requests the sidecar serves (and
    the ones that move money change the state), so the refusals above are the damage's."""
    rpc, request = JOB_REQUESTS[label]
    before = await seeded_state(sidecar)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        method = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")
        reply = await method(request.SerializeToString())
    assert reply
    if rpc in ("ApproveJob", "CloseJob", "Reserve", "ReserveBatch"):
        assert await state(sidecar) != before
