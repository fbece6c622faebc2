"""The client's hold keeps itself alive while its block runs (a live worker's hold never
expires), against a real sidecar on real Redis and on the embedded store.

The keep-alive is a wall-clock mechanism, so these tests let wall-clock time pass, but never
time it: the block waits until the handle has counted N keep-alive extends (N deadlines that
would otherwise have passed), then asserts outcomes. Holds are expired deliberately by
stepping the store's clock offset, never by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio

from ecu_sidecar import client as qc
from ecu_sidecar.client import AsyncQuotaClient, QuotaClient
from ecu_sidecar.model import Balance, HoldState
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    assert_conserved,
    make_settings,
    wait_until,
    wait_until_sync,
)
from tests.test_client import Attempts, rpcs, simulated

ORG = "acme"
#: A hold's TTL in these tests: short, so a block of a few TTLs stays well under 2 s.
TTL_MS = 300
#: Extend with half the TTL left (not the default third): 150 ms of slack for a loaded machine.
MARGIN = 0.5
#: Keep-alive extends to wait for: the block outlives three TTLs.
EXTENDS = 6
#: Upper bound on any wait for the keep-alive (a hung keep-alive fails here, not by timeout).
PATIENCE_S = 20.0


@pytest.fixture
def settings(backend: str) -> Settings:
    # A short minimum TTL, and a sweeper that runs often: a hold the keep-alive let lapse
    # would be expired (and then refuse the next extend) within a few ms.
    return make_settings(backend, min_ttl_ms=50, sweep_interval_ms=20)


@pytest_asyncio.fixture
async def client(sidecar: SidecarServer) -> AsyncIterator[AsyncQuotaClient]:
    async with AsyncQuotaClient(f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN) as c:
        await c.grant(ORG, 1_000_000, grant_id="seed")
        yield c


async def until(condition: Callable[[], bool]) -> None:
    """Wait (event loop free) until ``condition`` holds; fail after PATIENCE_S."""
    await wait_until(condition, "the keep-alive getting there", PATIENCE_S)


def until_sync(condition: Callable[[], bool]) -> None:
    wait_until_sync(condition, "the keep-alive getting there", PATIENCE_S)


def sound(b: Balance) -> Balance:
    assert_conserved(b)
    return b


async def test_keepalive_keeps_a_short_hold_alive_for_several_ttls(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    async with client.hold(
        org=ORG, amount_uecu=400_000, job_type="gepa", ttl_ms=TTL_MS, keepalive_margin=MARGIN
    ) as h:
        placed_deadline = h.deadline_unix_ms
        await until(lambda: h.keepalive_extends >= EXTENDS)
        # Still active: held, not expired, its deadline pushed past the first one's.
        during = sound(await client.balance(ORG))
        assert (during.held_uecu, during.outstanding_holds, during.expired_holds) == (400_000, 1, 0)
        assert h.state is HoldState.ACTIVE and h.keepalive_error is None
        assert h.deadline_unix_ms >= placed_deadline + (EXTENDS - 1) * TTL_MS * MARGIN
        out = await h.commit(150_000)
    assert (out.committed_uecu, out.released_uecu, out.late, out.overage_uecu) == (
        150_000,
        250_000,
        False,
        0,
    )
    extends = h.keepalive_extends
    assert h.sequence == extends >= EXTENDS
    assert rpcs(sidecar, "Extend", "OK") == extends  # every one landed, none refused
    b = sound(await client.balance(ORG))
    assert (b.committed_uecu, b.late_committed_uecu, b.expired_uecu, b.held_uecu) == (
        150_000,
        0,
        0,
        0,
    )
    assert b.committed_from_holds_uecu == 150_000 and b.available_uecu == 850_000


async def test_keepalive_stops_when_the_block_ends(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    async with client.hold(
        org=ORG, amount_uecu=1_000, job_type="gepa", ttl_ms=TTL_MS, keepalive_margin=MARGIN
    ) as h:
        await until(lambda: h.keepalive_extends >= 1)
        keeper = h.keeper
        assert keeper is not None and not keeper.done()
    assert keeper.done() and h.state is HoldState.RELEASED
    with pytest.raises(RuntimeError):
        async with client.hold(
            org=ORG, amount_uecu=1_000, job_type="gepa", ttl_ms=TTL_MS, keepalive_margin=MARGIN
        ) as h2:
            raising = h2.keeper
            raise RuntimeError("the step failed")
    assert raising is not None and raising.done() and h2.state is HoldState.RELEASED
    b = sound(await client.balance(ORG))
    assert (b.held_uecu, b.released_uecu, b.expired_uecu) == (0, 2_000, 0)


async def test_without_keepalive_the_hold_expires(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    async with client.hold(
        org=ORG, amount_uecu=400_000, job_type="gepa", ttl_ms=TTL_MS, keepalive=False
    ) as h:
        assert h.keeper is None
        # The deadline passes (script clock stepped, no sleep): the sweep of the next call
        # expires the hold, and nothing kept it alive.
        sidecar.store.clock_offset_ms = TTL_MS + 1
        during = sound(await client.balance(ORG))
        assert (during.held_uecu, during.expired_holds, during.expired_uecu) == (0, 1, 400_000)
        out = await h.commit(150_000)
    assert out.late and out.committed_uecu == 150_000
    assert h.sequence == 0 and rpcs(sidecar, "Extend", "OK") == 0
    b = sound(await client.balance(ORG))
    assert (b.late_committed_uecu, b.committed_from_holds_uecu) == (150_000, 0)


async def test_caller_extends_and_keepalive_share_one_sequence(sidecar: SidecarServer) -> None:
    seen = Attempts()
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}", admin_token=ADMIN_TOKEN, interceptors=[seen]
    ) as c:
        await c.grant(ORG, 1_000, grant_id="seed")
        async with c.hold(
            org=ORG, amount_uecu=100, job_type="gepa", ttl_ms=1_000, keepalive_margin=0.9
        ) as h:
            # The caller heartbeats as fast as it can, each time with a TTL shorter than the
            # keep-alive's margin, so the keep-alive is due again at once: the two interleave,
            # drawing from the one counter under the one lock.
            while h.keepalive_extends < 5:
                await h.extend(ttl_ms=50)
            await h.commit(100)
    sent = [r.sequence for r in seen.of("Extend")]
    assert sent == list(range(1, len(sent) + 1)) and h.sequence == len(sent)
    assert rpcs(sidecar, "Extend", "OK") == len(sent)
    assert rpcs(sidecar, "Extend", "ABORTED") == 0  # never STALE_SEQUENCE
    assert h.keepalive_error is None


async def test_a_failed_keepalive_is_recorded_and_never_kills_the_block(
    client: AsyncQuotaClient, sidecar: SidecarServer
) -> None:
    async with client.hold(
        org=ORG, amount_uecu=500, job_type="gepa", ttl_ms=TTL_MS, keepalive_margin=MARGIN
    ) as h:
        # The hold goes away behind the handle's back: the next keep-alive extend is refused.
        await client.release(ORG, h.reservation_id)
        await until(lambda: h.keepalive_error is not None)
        error = h.keepalive_error
        assert isinstance(error, qc.FailedPrecondition) and error.reason == "HOLD_RELEASED"
        keeper = h.keeper
        await until(lambda: keeper is not None and keeper.done())  # stopped, not retrying
        assert keeper is not None and keeper.exception() is None
        assert (await client.balance(ORG)).released_uecu == 500  # the block carries on
    assert h.keepalive_extends == 0
    assert rpcs(sidecar, "Extend", "FAILED_PRECONDITION") == 1


async def test_keepalive_retries_unavailable_and_records_it(
    sidecar: SidecarServer, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 2

    async def drop_extends(name, n, continuation, details, request):
        if name == "Extend" and n <= failures:
            raise simulated(grpc.StatusCode.UNAVAILABLE)
        return await continuation(details, request)

    seen = Attempts(drop_extends)
    async with AsyncQuotaClient(
        f"127.0.0.1:{sidecar.port}",
        admin_token=ADMIN_TOKEN,
        retry=qc.RetryPolicy(attempts=1),
        interceptors=[seen],
    ) as c:
        await c.grant(ORG, 1_000, grant_id="seed")
        async with c.hold(
            org=ORG, amount_uecu=100, job_type="gepa", ttl_ms=TTL_MS, keepalive_margin=MARGIN
        ) as h:
            await until(lambda: h.keepalive_extends >= 1)
            assert isinstance(h.keepalive_error, qc.Unavailable)
            assert (await c.balance(ORG)).outstanding_holds == 1
            out = await h.commit(100)
    assert not out.late
    # The line docs/operations.md tells an operator to look for (EcuExpiredHoldSpike).
    retried = f"keep-alive could not extend hold {ORG}/{h.reservation_id} (retrying in "
    assert sum(r.getMessage().startswith(retried) for r in caplog.records) == failures
    # Each failed attempt took a new sequence (its outcome was unknown), none reused.
    assert [r.sequence for r in seen.of("Extend")][: failures + 1] == [1, 2, 3]


def test_keepalive_margin_is_validated() -> None:
    c = QuotaClient("127.0.0.1:1")
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="keepalive_margin"):
            c.hold(org=ORG, amount_uecu=1, job_type="gepa", keepalive_margin=bad)
    with pytest.raises(TypeError, match="keepalive"):
        c.hold(org=ORG, amount_uecu=1, job_type="gepa", keepalive="yes")
    assert c.hold(org=ORG, amount_uecu=1, job_type="gepa").keepalive_margin == (
        qc.DEFAULT_KEEPALIVE_MARGIN
    )


# -- the blocking client -----------------------------------------------------------------------


async def test_sync_keepalive_keeps_the_hold_alive_then_stops(sidecar: SidecarServer) -> None:
    target = f"127.0.0.1:{sidecar.port}"

    def worker() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with QuotaClient(target, admin_token=ADMIN_TOKEN) as c:
            c.grant(ORG, 1_000_000, grant_id="seed")
            with c.hold(
                org=ORG,
                amount_uecu=400_000,
                job_type="gepa",
                ttl_ms=TTL_MS,
                keepalive_margin=MARGIN,
            ) as h:
                until_sync(lambda: h.keepalive_extends >= EXTENDS)
                # The caller's own heartbeat meanwhile takes the next number, not a stale one.
                h.extend()
                seen["during"] = c.balance(ORG)
                seen["keeper"] = h.keeper
                seen["commit"] = h.commit(150_000)
            seen["alive_after"] = seen["keeper"].is_alive()
            seen["h"] = h
            seen["threads"] = [t.name for t in threading.enumerate()]
            seen["balance"] = c.balance(ORG)
        return seen

    seen = await asyncio.to_thread(worker)
    during, h = sound(seen["during"]), seen["h"]
    assert (during.held_uecu, during.outstanding_holds, during.expired_holds) == (400_000, 1, 0)
    out = seen["commit"]
    assert (out.committed_uecu, out.late) == (150_000, False)
    assert h.keepalive_error is None and h.sequence == h.keepalive_extends + 1
    assert rpcs(sidecar, "Extend", "OK") == h.sequence
    assert not seen["alive_after"] and f"ecu-keepalive-{h.reservation_id}" not in seen["threads"]
    b = sound(seen["balance"])
    assert (b.committed_uecu, b.expired_uecu, b.late_committed_uecu) == (150_000, 0, 0)


async def test_sync_without_keepalive_the_hold_expires(sidecar: SidecarServer) -> None:
    target = f"127.0.0.1:{sidecar.port}"
    placed = threading.Event()
    expired = threading.Event()

    def worker() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        with QuotaClient(target, admin_token=ADMIN_TOKEN) as c:
            c.grant(ORG, 1_000_000, grant_id="seed")
            with c.hold(
                org=ORG, amount_uecu=400_000, job_type="gepa", ttl_ms=TTL_MS, keepalive=False
            ) as h:
                seen["keeper"] = h.keeper
                placed.set()
                expired.wait(PATIENCE_S)
                seen["during"] = c.balance(ORG)
                seen["commit"] = h.commit(100_000)
            seen["sequence"] = h.sequence
        return seen

    job = asyncio.create_task(asyncio.to_thread(worker))
    await asyncio.to_thread(placed.wait, PATIENCE_S)
    sidecar.store.clock_offset_ms = TTL_MS + 1  # the deadline passes, no sleep
    expired.set()
    seen = await job
    assert seen["keeper"] is None and seen["sequence"] == 0
    during = sound(seen["during"])
    assert (during.held_uecu, during.expired_holds) == (0, 1)
    assert seen["commit"].late and rpcs(sidecar, "Extend", "OK") == 0
