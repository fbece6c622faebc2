"""The keeper holds and jobs share (ecu_sidecar/client/keeper.py), on its own: a lease whose
renewals answer from a script, in both flavours.

What the hold's keep-alive and the job's heartbeat do against a real sidecar is in
tests/test_client_keepalive.py and tests/test_jobs.py; here each outcome of a renewal is chosen:
a retryable failure is recorded and retried, any other failure is recorded and stops the keeper
by itself, and stopping it (also from inside a renewal) ends it cleanly. Wall-clock time passes
(the keeper sleeps until a renewal is due) but is never timed: the tests wait for outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest

from ecu_sidecar.client import FailedPrecondition, Unavailable
from ecu_sidecar.client.keeper import AsyncKeeper, Lease, ThreadKeeper, check_switch
from tests.conftest import wait_until, wait_until_sync

#: The lease's ttl: a renewal is due 20 ms after the last (margin 0.5), a retry 5 ms after a miss.
TTL_MS = 40
DOWN = Unavailable("the sidecar is restarting", code=grpc.StatusCode.UNAVAILABLE)
GONE = FailedPrecondition(
    "job j ended", code=grpc.StatusCode.FAILED_PRECONDITION, reason="JOB_CLOSED"
)
#: Two misses, two renewals, then the lease is gone: the keeper's whole life.
SCRIPT = [DOWN, DOWN, None, None, GONE]


class Owner:
    """A lease's owner whose renewals answer from a script (an error to raise, or None: renewed)."""

    def __init__(self, script: list[Exception | None]) -> None:
        log = logging.getLogger("tests.keeper")
        self.lease = Lease(
            0.5, failing="could not renew thing t", stopping="renewal of thing t", log=log
        )
        self.lease.renewed(time.monotonic(), TTL_MS, TTL_MS)
        self.script = list(script)
        self.renew_calls = 0
        self.alive = True

    def renew(self) -> None:
        self.renew_calls += 1
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        self.lease.renewed(time.monotonic(), TTL_MS, TTL_MS)

    async def renew_async(self) -> None:
        self.renew()


def assert_lived_the_script(owner: Owner, caplog: pytest.LogCaptureFixture) -> None:
    assert (owner.renew_calls, owner.lease.renewals, owner.lease.error) == (5, 2, GONE)
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 2 and all(m.startswith("could not renew thing t (") for m in retried)
    assert caplog.records[-1].getMessage() == f"renewal of thing t stopped: {GONE}"


async def test_async_keeper_retries_a_miss_and_stops_when_the_lease_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Owner(SCRIPT)
    keeper = AsyncKeeper(owner.lease, asyncio.Lock(), lambda: owner.alive, owner.renew_async)
    with caplog.at_level(logging.WARNING, "tests.keeper"):
        keeper.start("keeper-under-test")
        task = keeper.task
        assert task is not None and task.get_name() == "keeper-under-test"
        await wait_until(task.done, "the keeper stopping by itself")
    assert task.exception() is None  # ended, not crashed: the error is recorded, not raised
    assert_lived_the_script(owner, caplog)
    await keeper.stop()  # after it ended by itself: nothing to do
    assert keeper.task is None


async def test_async_keeper_renews_nothing_once_its_owner_is_no_longer_alive() -> None:
    owner = Owner([])
    owner.alive = False  # settled before the first renewal came due
    keeper = AsyncKeeper(owner.lease, asyncio.Lock(), lambda: owner.alive, owner.renew_async)
    keeper.start("keeper-under-test")
    task = keeper.task
    assert task is not None
    await wait_until(task.done, "the keeper seeing its owner settled")
    assert (owner.renew_calls, owner.lease.renewals, owner.lease.error) == (0, 0, None)


async def test_async_keeper_stop_cancels_it_while_it_renews() -> None:
    owner = Owner([])  # renews for ever
    lock = asyncio.Lock()
    keeper = AsyncKeeper(owner.lease, lock, lambda: owner.alive, owner.renew_async)
    keeper.start("keeper-under-test")
    task = keeper.task
    assert task is not None
    await wait_until(lambda: owner.lease.renewals >= 2, "two renewals")
    await keeper.stop()
    assert keeper.task is None and task.cancelled() and not lock.locked()
    assert owner.lease.error is None


def test_thread_keeper_retries_a_miss_and_stops_when_the_lease_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Owner(SCRIPT)
    keeper = ThreadKeeper(owner.lease, threading.Lock(), lambda: owner.alive, owner.renew)
    with caplog.at_level(logging.WARNING, "tests.keeper"):
        keeper.start("keeper-under-test")
        thread = keeper.thread
        assert thread is not None and thread.daemon and thread.name == "keeper-under-test"
        wait_until_sync(lambda: not thread.is_alive(), "the keeper stopping by itself")
    assert_lived_the_script(owner, caplog)
    keeper.stop()
    assert keeper.thread is None


def test_thread_keeper_stops_cleanly_also_from_inside_a_renewal() -> None:
    owner = Owner([])
    lock = threading.Lock()

    def renew_then_stop() -> None:  # e.g. a renewal whose outcome settles its owner
        owner.renew()
        keeper.stop()  # from the keeper's own thread: must not join itself

    keeper = ThreadKeeper(owner.lease, lock, lambda: owner.alive, renew_then_stop)
    keeper.start("keeper-under-test")
    thread = keeper.thread
    assert thread is not None
    wait_until_sync(lambda: not thread.is_alive(), "the keeper ending after its own stop")
    assert (owner.renew_calls, owner.lease.renewals, keeper.thread) == (1, 1, None)
    assert not lock.locked()


def test_thread_keeper_stop_waits_for_it() -> None:
    owner = Owner([])
    keeper = ThreadKeeper(owner.lease, threading.Lock(), lambda: owner.alive, owner.renew)
    keeper.start("keeper-under-test")
    thread = keeper.thread
    assert thread is not None
    wait_until_sync(lambda: owner.lease.renewals >= 2, "two renewals")
    keeper.stop()
    assert not thread.is_alive() and keeper.thread is None
    calls = owner.renew_calls
    keeper.stop()  # twice: nothing more
    assert owner.renew_calls == calls


@pytest.mark.parametrize("margin", [0, 1, 1.5, -0.1, True])
def test_a_margin_is_a_fraction_of_the_ttl(margin: float) -> None:
    with pytest.raises(ValueError, match=r"^beat_margin must be a fraction of the TTL"):
        check_switch("beat", True, "beat_margin", margin)


def test_the_switch_is_a_bool() -> None:
    with pytest.raises(TypeError, match=r"^beat must be True or False, got 'yes'"):
        check_switch("beat", "yes", "beat_margin", 0.5)
    check_switch("beat", False, "beat_margin", 0.5)  # accepted
