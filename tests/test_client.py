"""The worker client against a real sidecar (real Redis and the embedded store).

Retries are proven on the wire: a client interceptor of the test's own records every attempt
(and can lose a response or start a sidecar between attempts); the server's metrics registry
counts what actually arrived.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.json_format import ParseDict

from ecu_sidecar import client as qc
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.client import AsyncQuotaClient, QuotaClient, RetryPolicy
from ecu_sidecar.model import CommitItem, GrantKind, HoldState, JobType, ReserveItem, Usage
from ecu_sidecar.pricing import (
    InferenceSpec,
    JudgeSpec,
    UsageKind,
    UsageLine,
    load_rate_card,
    preview,
    price_usage,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from tests.conftest import ADMIN_TOKEN, EXAMPLE_RATE_CARD, drop_keys

ORG = "acme"
Hook = Callable[[str, int, Any, Any, Any], Awaitable[Any]]


class Attempts(grpc.aio.UnaryUnaryClientInterceptor):
    """Records every attempt the client sends; an optional hook may tamper with one."""

    def __init__(self, hook: Hook | None = None) -> None:
        self.sent: list[tuple[str, Any]] = []
        self._hook = hook

    def of(self, method: str) -> list[Any]:
        """The requests of every attempt of ``method``."""
        return [req for m, req in self.sent if m == method]

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        name = client_call_details.method
        name = (name.decode() if isinstance(name, bytes) else name).rsplit("/", 1)[-1]
        self.sent.append((name, request))
        if self._hook is not None:
            return await self._hook(
                name, len(self.of(name)), continuation, client_call_details, request
            )
        return await continuation(client_call_details, request)


def simulated(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "simulated")


def rpcs(sidecar: SidecarServer, method: str, code: str) -> float:
    value = sidecar.registry.get_sample_value(
        "ecu_rpc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture
async def client(sidecar: SidecarServer) -> AsyncIterator[AsyncQuotaClient]:
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN) as c:
        yield c


async def funded(c: AsyncQuotaClient, amount: int, org: str = ORG) -> str:
    await c.grant(org, amount, grant_id="seed")
    return org


# -- the hold context manager ------------------------------------------------------------------


async def test_hold_commits_exactly_the_actual(client: AsyncQuotaClient) -> None:
    await funded(client, 1_000_000)
    async with client.hold(
        org=ORG,
        amount_uecu=400_000,
        job_type=JobType.INFERENCE,
        model="gpt-4o",
        team="t1",
        project="p1",
        user="u1",
        ttl_ms=60_000,
    ) as h:
        assert h.state is HoldState.ACTIVE and h.available_uecu == 600_000
        assert len(h.reservation_id) == 32 and h.deadline_unix_ms > 0
        during = await client.balance(ORG)
        assert (during.held_uecu, during.outstanding_holds) == (400_000, 1)
        out = await h.commit(150_000, usage=Usage(tokens_in=1200, tokens_out=300, calls=1))
        assert (out.committed_uecu, out.released_uecu, out.replayed) == (150_000, 250_000, False)
    assert h.state is HoldState.COMMITTED and h.committed == out
    after = await client.balance(ORG)
    assert (after.committed_uecu, after.held_uecu, after.available_uecu) == (150_000, 0, 850_000)
    assert after.outstanding_holds == 0
    assert [(t.id, t.used_uecu) for t in after.teams] == [("t1", 150_000)]
    assert [(p.id, p.used_uecu) for p in after.projects] == [("p1", 150_000)]


async def test_hold_releases_on_exception_and_reraises(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    await funded(client, 1_000_000)
    boom = RuntimeError("the step failed")
    with pytest.raises(RuntimeError) as ei:
        async with client.hold(org=ORG, amount_uecu=300_000, job_type="gepa") as h:
            assert (await client.balance(ORG)).available_uecu == 700_000
            raise boom
    assert ei.value is boom
    assert h.state is HoldState.RELEASED
    b = await client.balance(ORG)
    assert (b.available_uecu, b.held_uecu, b.committed_uecu) == (1_000_000, 0, 0)
    assert rpcs(sidecar, "Release", "OK") == 1


async def test_hold_releases_on_exit_without_commit(client: AsyncQuotaClient) -> None:
    await funded(client, 1_000_000)
    async with client.hold(org=ORG, amount_uecu=250_000, job_type="engine") as h:
        pass
    assert h.state is HoldState.RELEASED
    b = await client.balance(ORG)
    assert (b.available_uecu, b.held_uecu, b.released_uecu) == (1_000_000, 0, 250_000)


async def test_explicit_release_is_not_repeated_on_exit(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    await funded(client, 1_000)
    async with client.hold(org=ORG, amount_uecu=400, job_type="gepa") as h:
        out = await h.release()
        assert (out.released_uecu, out.state) == (400, HoldState.RELEASED)
    assert rpcs(sidecar, "Release", "OK") == 1
    assert rpcs(sidecar, "Release", "FAILED_PRECONDITION") == 0


async def test_extend_heartbeats_with_increasing_sequence(client: AsyncQuotaClient) -> None:
    await funded(client, 1_000)
    async with client.hold(org=ORG, amount_uecu=100, job_type="gepa", ttl_ms=5_000) as h:
        first = await h.extend(ttl_ms=60_000)
        second = await h.extend(ttl_ms=120_000)
        assert h.sequence == 2 and not first.replayed and not second.replayed
        assert second.deadline_unix_ms > first.deadline_unix_ms > 0
        assert h.deadline_unix_ms == second.deadline_unix_ms
        # The sidecar recorded exactly 2: it replays 2 from memory and refuses 1 as stale.
        replay = await client.extend(ORG, h.reservation_id, sequence=2, ttl_ms=120_000)
        assert replay.replayed and replay.deadline_unix_ms == second.deadline_unix_ms
        with pytest.raises(qc.Conflict) as ei:
            await client.extend(ORG, h.reservation_id, sequence=1)
        assert (ei.value.code, ei.value.reason) == (grpc.StatusCode.ABORTED, "STALE_SEQUENCE")
        await h.commit(100)


async def test_failed_reserve_places_nothing_to_release(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    await funded(client, 100)
    with pytest.raises(qc.InsufficientEcu):
        async with client.hold(org=ORG, amount_uecu=101, job_type="gepa"):
            pytest.fail("the block must not run when the hold was refused")
    assert rpcs(sidecar, "Release", "OK") + rpcs(sidecar, "Release", "NOT_FOUND") == 0


async def test_commit_in_doubt_keeps_the_hold_for_a_later_commit(
    sidecar: SidecarServer,
) -> None:
    async def drop_commits(name, n, continuation, details, request):
        if name == "Commit":
            raise simulated(grpc.StatusCode.UNAVAILABLE)
        return await continuation(details, request)

    flaky = AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}",
        admin_token=ADMIN_TOKEN,
        retry=RetryPolicy(attempts=2, initial_backoff_s=0.001, max_backoff_s=0.001),
        interceptors=[Attempts(drop_commits)],
    )
    async with flaky:
        await funded(flaky, 1_000)
        with pytest.raises(qc.Unavailable) as ei:
            async with flaky.hold(org=ORG, amount_uecu=600, job_type="gepa") as h:
                await h.commit(500)
        assert ei.value.attempts == 2
        # Not released: the commit may have landed, or the worker may still retry it.
        assert (await flaky.balance(ORG)).held_uecu == 600
        assert rpcs(sidecar, "Release", "OK") == 0
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}") as ok:
        out = await ok.commit(ORG, h.reservation_id, 500)
        assert (out.committed_uecu, out.released_uecu) == (500, 100)


# -- error mapping -----------------------------------------------------------------------------


async def test_insufficient_ecu_is_mapped_and_not_retried(
    sidecar: SidecarServer,
) -> None:
    seen = Attempts()
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, interceptors=[seen]
    ) as c:
        await funded(c, 100)
        with pytest.raises(qc.InsufficientEcu) as ei:
            await c.reserve(ORG, 101, job_type="judge", model="m", reservation_id="r1")
    err = ei.value
    assert isinstance(err, qc.QuotaError)
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_ECU")
    assert err.metadata["available"] == "100" and err.metadata["scope"] == "organization"
    assert (err.available_uecu, err.requested_uecu) == (100, 101)
    assert str(err).startswith("RESOURCE_EXHAUSTED INSUFFICIENT_ECU: insufficient ECU")
    assert err.attempts == 1 and len(seen.of("Reserve")) == 1
    assert rpcs(sidecar, "Reserve", "RESOURCE_EXHAUSTED") == 1


async def test_invalid_argument_names_the_field(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    await funded(client, 100)
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.reserve(ORG, 10, job_type="gepa", reservation_id="bad id")
    assert (ei.value.code, ei.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "reservation_id")
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.reserve(ORG, 10, job_type=JobType.INFERENCE)
    assert ei.value.field == "model"
    assert rpcs(sidecar, "Reserve", "INVALID_ARGUMENT") == 2


async def test_floats_and_unknown_enums_are_refused_before_the_wire(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.reserve(ORG, 1.5, job_type="gepa")  # type: ignore[arg-type]
    assert ei.value.field == "amount_uecu"
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.reserve(ORG, 10, job_type="training")
    assert ei.value.field == "job_type" and "inference" in ei.value.message
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.commit(ORG, "r1", 5, usage=Usage(tokens_in=True))  # type: ignore[arg-type]
    assert ei.value.field == "usage.tokens_in"
    assert rpcs(sidecar, "Reserve", "INVALID_ARGUMENT") + rpcs(sidecar, "Commit", "OK") == 0


async def test_state_and_idempotency_errors(client: AsyncQuotaClient) -> None:
    await funded(client, 1_000)
    with pytest.raises(qc.NotFound) as nf:
        await client.commit(ORG, "never-reserved", 5)
    assert nf.value.reason == "HOLD_NOT_FOUND"
    await client.reserve(ORG, 100, job_type="gepa", reservation_id="r1")
    await client.commit(ORG, "r1", 40)
    with pytest.raises(qc.FailedPrecondition) as fp:
        await client.release(ORG, "r1")
    assert fp.value.reason == "HOLD_COMMITTED"
    with pytest.raises(qc.Conflict) as cf:
        await client.reserve(ORG, 999, job_type="gepa", reservation_id="r1")
    assert (cf.value.code, cf.value.reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "IDEMPOTENCY_CONFLICT",
    )
    with pytest.raises(qc.NotFound) as nf:
        await client.balance("nobody")
    assert nf.value.reason == "ACCOUNT_NOT_FOUND"


async def test_admin_calls_send_the_token(sidecar: SidecarServer) -> None:
    target = f"127.0.0.1:{sidecar.port}"
    async with AsyncQuotaClient(target) as anonymous:
        with pytest.raises(qc.PermissionDenied) as ei:
            await anonymous.grant(ORG, 5, grant_id="g1")
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncQuotaClient(target, admin_token="wrong") as wrong:
        with pytest.raises(qc.PermissionDenied) as ei:
            await wrong.grant(ORG, 5, grant_id="g1")
        assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncQuotaClient(target, admin_token=ADMIN_TOKEN) as admin:
        first = await admin.grant(ORG, 5, grant_id="g1", kind="starter")
        again = await admin.grant(ORG, 5, grant_id="g1", kind="starter")
        assert (first.balance_uecu, first.replayed, again.replayed) == (5, False, True)
        cap = await admin.set_cap(ORG, "team", "t1", 3)
        assert (cap.id, cap.cap_uecu, cap.available_uecu) == ("t1", 3, 3)
        with pytest.raises(qc.InsufficientEcu) as ei:
            await admin.reserve(ORG, 4, job_type="gepa", team="t1")
        assert ei.value.metadata["scope"] == "team"
        cleared = await admin.set_cap(ORG, "team", "t1", None)
        assert cleared.cap_uecu is None
        assert (await admin.reserve(ORG, 4, job_type="gepa", team="t1")).available_uecu == 1


async def test_batches(client: AsyncQuotaClient) -> None:
    await funded(client, 1_000)
    out = await client.reserve_batch(
        ORG,
        [
            ReserveItem("", 100, JobType.GEPA),
            ReserveItem("mine", 200, JobType.JUDGE, model="judge-1"),
        ],
        team="t1",
    )
    ids = [h.reservation_id for h in out.holds]
    assert len(ids[0]) == 32 and ids[1] == "mine" and out.available_uecu == 700
    results = await client.commit_batch(
        ORG, [CommitItem(ids[0], 60), CommitItem("ghost", 1), CommitItem("mine", 200)]
    )
    assert [r.committed_uecu for r in results] == [60, 0, 200]
    assert results[0].error is None and results[2].error is None
    ghost = results[1].error
    assert isinstance(ghost, qc.NotFound) and ghost.reason == "HOLD_NOT_FOUND"
    assert (await client.balance(ORG)).available_uecu == 740


# -- retries -----------------------------------------------------------------------------------


async def test_lost_response_is_retried_with_the_same_reservation_id(
    sidecar: SidecarServer,
) -> None:
    async def lose_first_reserve_answer(name, n, continuation, details, request):
        call = await continuation(details, request)
        if name == "Reserve" and n == 1:
            await call  # the sidecar placed the hold; only the answer is lost
            raise simulated(grpc.StatusCode.UNAVAILABLE)
        return call

    seen = Attempts(lose_first_reserve_answer)
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, interceptors=[seen]
    ) as c:
        await funded(c, 1_000)
        out = await c.reserve(ORG, 300, job_type="gepa")
        attempts = seen.of("Reserve")
        assert len(attempts) == 2
        assert attempts[0].reservation_id == attempts[1].reservation_id
        assert out.holds[0].reservation_id == attempts[0].reservation_id
        assert out.replayed, "the retry must be answered from the first attempt's record"
        b = await c.balance(ORG)
        assert (b.held_uecu, b.outstanding_holds, b.reserved_uecu) == (300, 1, 300)
    assert rpcs(sidecar, "Reserve", "OK") == 2


async def test_retry_reaches_a_sidecar_that_starts_after_the_first_attempt(
    settings: Settings,
) -> None:
    port = free_port()
    late_settings = Settings.from_mapping(
        {
            "listen": ("test", f"127.0.0.1:{port}"),
            "key_prefix": ("test", settings.key_prefix + "late"),
            "redis_url": ("test", settings.redis_url),
            "admin_token": ("test", ADMIN_TOKEN),
        }
    )
    late = SidecarServer(late_settings)

    async def start_after_first_failure(name, n, continuation, details, request):
        call = await continuation(details, request)
        if name == "Reserve" and n == 1:
            assert await call.code() == grpc.StatusCode.UNAVAILABLE, "nothing listens yet"
            await late.start()
            await late.engine.grant(ORG, "seed", 1_000, GrantKind.TOP_UP)
        return call

    seen = Attempts(start_after_first_failure)
    try:
        async with AsyncQuotaClient(f"127.0.0.1:{port}", interceptors=[seen]) as c:
            out = await c.reserve(ORG, 400, job_type="gepa", reservation_id="job-7.step-1")
            ids = [r.reservation_id for r in seen.of("Reserve")]
            # At least the refused attempt and the one that landed; a slow reconnect may cost
            # one more. Every attempt carried the same id.
            assert len(ids) >= 2 and set(ids) == {"job-7.step-1"}
            assert out.holds[0].reservation_id == "job-7.step-1" and not out.replayed
            assert (await c.balance(ORG)).held_uecu == 400
        assert rpcs(late, "Reserve", "OK") == 1
    finally:
        if late.port:
            await drop_keys(late_settings)
        await late.stop(grace=0)


async def test_retries_are_bounded_when_nothing_answers() -> None:
    seen = Attempts()
    port = free_port()
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncQuotaClient(
        f"127.0.0.1:{port}", timeout_s=0.3, retry=policy, interceptors=[seen]
    ) as c:
        with pytest.raises(qc.Unavailable) as ei:
            await c.balance(ORG)
    assert ei.value.attempts == 3 and len(seen.of("GetBalance")) == 3
    # Later attempts wait for the connection and time out; the refusal is what is reported.
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE and f":{port}" in ei.value.message


async def test_extend_retry_reuses_its_sequence(sidecar: SidecarServer) -> None:
    async def lose_first_extend_answer(name, n, continuation, details, request):
        call = await continuation(details, request)
        if name == "Extend" and n == 1:
            await call
            raise simulated(grpc.StatusCode.DEADLINE_EXCEEDED)
        return call

    seen = Attempts(lose_first_extend_answer)
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, interceptors=[seen]
    ) as c:
        await funded(c, 1_000)
        async with c.hold(org=ORG, amount_uecu=10, job_type="gepa") as h:
            first = await h.extend(ttl_ms=30_000)
            assert first.replayed and [r.sequence for r in seen.of("Extend")] == [1, 1]
            second = await h.extend(ttl_ms=30_000)
            assert not second.replayed and h.sequence == 2
            await h.commit(10)


# -- the blocking client -----------------------------------------------------------------------


async def test_sync_client(sidecar: SidecarServer) -> None:
    target = f"127.0.0.1:{sidecar.port}"

    def worker() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with QuotaClient(target, admin_token=ADMIN_TOKEN) as c:
            c.grant(ORG, 1_000_000, grant_id="seed")
            with c.hold(org=ORG, amount_uecu=500_000, job_type="judge", model="j") as h:
                seen["during"] = c.balance(ORG).available_uecu
                h.extend()
                seen["sequence"] = h.sequence
                seen["commit"] = h.commit(123_456, usage=Usage(calls=2))
            seen["state"] = h.state
            try:
                with c.hold(org=ORG, amount_uecu=100_000, job_type="gepa") as h2:
                    raise KeyError("boom")
            except KeyError as exc:
                seen["reraised"] = exc.args
            seen["released"] = h2.state
            try:
                c.reserve(ORG, 10**12, job_type="gepa")
            except qc.InsufficientEcu as exc:
                seen["error"] = (exc.reason, exc.available_uecu, exc.attempts)
            seen["balance"] = c.balance(ORG)
        return seen

    seen = await asyncio.to_thread(worker)
    assert seen["during"] == 500_000 and seen["sequence"] == 1
    assert seen["commit"].committed_uecu == 123_456 and seen["state"] is HoldState.COMMITTED
    assert seen["reraised"] == ("boom",) and seen["released"] is HoldState.RELEASED
    assert seen["error"] == ("INSUFFICIENT_ECU", 1_000_000 - 123_456, 1)
    b = seen["balance"]
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (123_456, 0, 876_544)
    assert rpcs(sidecar, "Reserve", "RESOURCE_EXHAUSTED") == 1


def test_sync_retries_are_bounded_when_nothing_answers() -> None:
    policy = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    with QuotaClient(f"127.0.0.1:{free_port()}", timeout_s=0.3, retry=policy) as c:
        with pytest.raises(qc.Unavailable) as ei:
            c.release(ORG, "r1")
    assert ei.value.attempts == 2


async def test_a_rebuilding_organization_is_retried_beyond_the_attempts(
    sidecar: SidecarServer,
) -> None:
    """UNAVAILABLE REBUILDING (the organization fenced while the flusher rebuilds it after a
    Redis failover) is retried past ``attempts`` for up to ``rebuild_wait_s``; with 0 it
    counts as any UNAVAILABLE."""
    store = sidecar.store
    hour = 3_600_000

    async def rebuilt_before_the_sixth(name, n, continuation, details, request):
        if name.endswith("Reserve") and n == 6:
            store.clock_offset_ms += hour + 1  # the fence lapses, as when the rebuild is done
        return await continuation(details, request)

    seen = Attempts(rebuilt_before_the_sixth)
    policy = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, retry=policy, interceptors=[seen]
    ) as c:
        await funded(c, 1_000)
        # Seen in one history, then in another: fenced (the embedded store records the first).
        await store.check_epoch(ORG, "run:a", hour)
        assert await store.check_epoch(ORG, "run:b", hour) is not None
        out = await c.reserve(ORG, 300, job_type="gepa")
        assert len(seen.of("Reserve")) == 6  # five refused while fenced, past the two attempts
        assert not out.replayed and out.holds[0].amount_uecu == 300

        assert await store.check_epoch(ORG, "run:c", hour) is not None
        impatient = replace(policy, rebuild_wait_s=0)
        async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}", retry=impatient) as c2:
            with pytest.raises(qc.Unavailable) as ei:
                await c2.reserve(ORG, 300, job_type="gepa")
        assert ei.value.reason == "REBUILDING" and ei.value.attempts == 2
        b = await c.balance(ORG)
        assert (b.held_uecu, b.outstanding_holds) == (300, 1)  # the refused call changed nothing
    with pytest.raises(ValueError):
        RetryPolicy(rebuild_wait_s=-1)


def test_retry_policy() -> None:
    p = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.15)
    assert p.should_retry(grpc.StatusCode.UNAVAILABLE, 2)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, 3)
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        assert not p.should_retry(code, 1)
    for _ in range(50):
        assert 0.05 <= p.backoff_s(1) <= 0.1
        assert 0.075 <= p.backoff_s(5) <= 0.15
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# -- pricing: preview, holds from a job spec, usage-priced commits, the rate card ----------------

CARD = load_rate_card(EXAMPLE_RATE_CARD)
#: A job in the proto JSON form (as the CLI reads it), and the pricer's own form of it.
JOB_JSON = {
    "items": [
        {
            "inference": {
                "model": "gpt-4o",
                "promptText": "Rate this answer.",
                "maxOutputTokens": 500,
                "samples": 2,
            }
        },
        {"judge": {"judgeModel": "gpt-4o-mini", "calls": 3, "promptTokensPerCall": 900}},
    ]
}
JOB_SPEC = [
    InferenceSpec("gpt-4o", prompt_text="Rate this answer.", max_output_tokens=500, samples=2),
    JudgeSpec("gpt-4o-mini", calls=3, prompt_tokens_per_call=900),
]
USED = [
    UsageLine("inference", "gpt-4o", tokens_in=12, tokens_out=410, calls=2),
    UsageLine(UsageKind.JUDGE, "gpt-4o-mini", tokens_in=2_700, tokens_out=1_200, calls=3),
]


async def test_preview_then_hold_a_job_and_commit_its_usage(sidecar: SidecarServer) -> None:
    seen = Attempts()
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, interceptors=[seen]
    ) as c:
        await funded(c, 10_000_000)
        worst = preview(CARD, ORG, JOB_SPEC)
        shown = await c.preview(ORG, JOB_JSON, team="t1")
        assert isinstance(shown, qc.PreviewOutcome)
        assert shown.quote == replace(worst, lines=shown.quote.lines)
        assert [
            (x.description, x.subtotal_uecu, x.unit, x.job_type) for x in shown.quote.lines
        ] == [(x.description, x.subtotal_uecu, x.unit, x.job_type) for x in worst.lines]
        assert (shown.covered, shown.available_uecu) == (True, 10_000_000)
        assert shown.available_after_uecu == 10_000_000 - worst.total_uecu

        async with c.hold(org=ORG, job=JOB_JSON, team="t1") as h:
            assert h.amount_uecu == worst.total_uecu and h.quote == shown.quote
            assert h.rate_card_version == CARD.version
            assert (await c.balance(ORG)).held_uecu == worst.total_uecu
            out = await h.commit(usage_lines=USED)
        price = price_usage(CARD, ORG, USED, field="usage_lines")
        assert out.committed_uecu == price.total_uecu < worst.total_uecu
        assert out.quote is not None and out.quote.total_uecu == price.total_uecu
        assert [x.subtotal_uecu for x in out.quote.lines] == [x.subtotal_uecu for x in price.lines]
        assert h.state is HoldState.COMMITTED
    # The hold sent its pinned version; no amount, no job type of the worker's.
    (reserve,) = seen.of("Reserve")
    assert (reserve.amount_uecu, reserve.job_type, len(reserve.job.items)) == (0, 0, 2)
    (commit,) = seen.of("Commit")
    assert (commit.rate_card_version, commit.actual_uecu) == (CARD.version, 0)
    assert [u.kind for u in commit.usage_lines] == [
        pb.USAGE_KIND_INFERENCE,
        pb.USAGE_KIND_JUDGE,
    ]


async def test_reserve_job_and_commit_usage_by_reservation_id(client: AsyncQuotaClient) -> None:
    await funded(client, 10_000_000)
    job = ParseDict(JOB_JSON, pb.JobSpec())
    out = await client.reserve(ORG, job=job, reservation_id="step-1")
    (quote,) = out.quotes
    assert quote is not None and out.holds[0].amount_uecu == quote.total_uecu
    assert out.holds[0].rate_card_version == quote.rate_card_version == CARD.version
    again = await client.reserve(ORG, job=JOB_JSON, reservation_id="step-1")
    assert again.replayed and again.holds[0].amount_uecu == quote.total_uecu

    lines = [{"kind": "judge", "model": "gpt-4o-mini", "tokens_in": 900, "calls": 1}]
    done = await client.commit(
        ORG, "step-1", usage_lines=lines, rate_card_version=quote.rate_card_version
    )
    expected = price_usage(CARD, ORG, [UsageLine("judge", "gpt-4o-mini", 900, 0, 1)])
    assert done.committed_uecu == expected.total_uecu
    # Naming a version the sidecar never loaded is refused, not priced some other way.
    await client.reserve(ORG, job=JOB_JSON, reservation_id="step-2")
    with pytest.raises(qc.FailedPrecondition) as ei:
        await client.commit(ORG, "step-2", usage_lines=lines, rate_card_version="1999-01-01.1")
    assert ei.value.reason == "RATE_CARD_VERSION_UNKNOWN"


async def test_batches_with_jobs_and_usage(client: AsyncQuotaClient) -> None:
    await funded(client, 10_000_000)
    out = await client.reserve_batch(
        ORG,
        [
            ReserveItem("a", 0, None, job=JOB_JSON),  # type: ignore[arg-type]
            ReserveItem("b", 700, JobType.ENGINE),
        ],
    )
    worst = preview(CARD, ORG, JOB_SPEC).total_uecu
    assert [h.amount_uecu for h in out.holds] == [worst, 700]
    assert out.quotes[0] is not None and out.quotes[1] is None
    assert [h.rate_card_version for h in out.holds] == [CARD.version, ""]
    results = await client.commit_batch(
        ORG,
        [
            CommitItem("a", 0, usage_lines=USED, rate_card_version=CARD.version),
            CommitItem("b", 650),
        ],
    )
    assert [r.error for r in results] == [None, None]
    assert [r.committed_uecu for r in results] == [
        price_usage(CARD, ORG, USED).total_uecu,
        650,
    ]
    assert results[0].quote is not None and results[1].quote is None


async def test_pricing_input_errors_are_caught_before_the_wire(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.preview(ORG, {"items": [{"inference": {"modle": "gpt-4o"}}]})
    assert ei.value.field == "job" and "modle" in ei.value.message
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.preview(ORG, ["not", "a", "spec"])  # type: ignore[arg-type]
    assert ei.value.field == "job"
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.reserve(ORG, 100)  # an amount needs its job type
    assert ei.value.field == "job_type"
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.commit(ORG, "r1", usage_lines=[UsageLine("training", "gpt-4o")])
    assert ei.value.field == "usage_lines[0].kind"
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.commit(ORG, "r1", usage_lines=[{"kind": "judge", "tokens": 5}])
    assert ei.value.field == "usage_lines[0]"
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.commit(ORG, "r1", usage_lines=[UsageLine("judge", "m", tokens_in=1.5)])  # type: ignore[arg-type]
    assert ei.value.field == "usage_lines[0].tokens_in"
    # A hold placed with an amount has no rate card version to price usage with.
    await funded(client, 1_000)
    async with client.hold(org=ORG, amount_uecu=100, job_type="gepa") as h:
        with pytest.raises(qc.InvalidArgument) as ei:
            await h.commit(usage_lines=USED)
        assert ei.value.field == "usage_lines"
        await h.commit(60)
    assert rpcs(sidecar, "Preview", "INVALID_ARGUMENT") + rpcs(sidecar, "Preview", "OK") == 0
    assert rpcs(sidecar, "Commit", "INVALID_ARGUMENT") == 0
    assert rpcs(sidecar, "Commit", "OK") == 1  # the hold's own commit(60)
    # Unknown models are the sidecar's to refuse (the card is), naming the field.
    with pytest.raises(qc.InvalidArgument) as ei:
        await client.preview(ORG, {"items": [{"judge": {"judgeModel": "gpt-5", "calls": 1}}]})
    assert ei.value.field == "job.items[0].judge.judge_model"


async def test_rate_card_and_auto_top_up(client: AsyncQuotaClient) -> None:
    card = await client.rate_card()
    assert isinstance(card, qc.RateCardInfo)
    assert (card.version, card.versions) == (CARD.version, [CARD.version])
    # The card sets no BYOK engine fee: the answer says what a BYOK call pays, the engine fee.
    assert CARD.fees.byok_engine_call_uecu is None
    assert card.fees == replace(CARD.fees, byok_engine_call_uecu=CARD.fees.engine_call_uecu)
    assert card.models == sorted(CARD.models.values(), key=lambda m: m.name)
    assert card.organizations_with_terms == sorted(CARD.organizations)

    await funded(client, 5_000_000)
    assert await client.set_auto_topup(ORG, 1_000_000, 4_000_000) is None
    b = await client.balance(ORG)
    assert (b.auto_topup_threshold_uecu, b.auto_topup_amount_uecu) == (1_000_000, 4_000_000)
    await client.set_auto_topup(ORG, None)
    assert (await client.balance(ORG)).auto_topup_threshold_uecu is None
    async with AsyncQuotaClient(client.target) as anonymous:
        with pytest.raises(qc.PermissionDenied):
            await anonymous.set_auto_topup(ORG, 1, 1)


async def test_sync_client_pricing(sidecar: SidecarServer) -> None:
    target = f"127.0.0.1:{sidecar.port}"

    def worker() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with QuotaClient(target, admin_token=ADMIN_TOKEN) as c:
            c.grant(ORG, 10_000_000, grant_id="seed")
            seen["preview"] = c.preview(ORG, ParseDict(JOB_JSON, pb.JobSpec()))
            with c.hold(org=ORG, job=JOB_JSON) as h:
                seen["held"] = (h.amount_uecu, h.rate_card_version)
                seen["commit"] = h.commit(usage_lines=USED)
            seen["card"] = c.rate_card().version
            c.set_auto_topup(ORG, 2_000_000, 3_000_000)
            seen["balance"] = c.balance(ORG)
        return seen

    seen = await asyncio.to_thread(worker)
    worst = preview(CARD, ORG, JOB_SPEC).total_uecu
    assert seen["preview"].quote.total_uecu == worst
    assert seen["held"] == (worst, CARD.version)
    assert seen["commit"].committed_uecu == price_usage(CARD, ORG, USED).total_uecu
    assert seen["card"] == CARD.version
    assert seen["balance"].auto_topup_threshold_uecu == 2_000_000
