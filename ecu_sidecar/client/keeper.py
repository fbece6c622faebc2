"""What keeps a hold or a job alive while its block runs: the renewal both context managers
share, in either flavour.

A *lease* (a hold's deadline, renewed by Extend; a job's abandonment ttl, renewed by
HeartbeatJob) is renewed in the background whenever only ``margin`` (a third by default) of its
ttl is left: by a task (``AsyncKeeper``) or a daemon thread (``ThreadKeeper``). Each renewal is
made under its owner's one lock, which the owner's own calls (commit, release, close, an
explicit extend or heartbeat) take too: the background never races them, and it renews nothing
once the owner is no longer alive. A failed renewal never reaches the block: ``Lease.failed``
records and logs it; a retryable failure (UNAVAILABLE: the lease may still be alive) is tried
again well before the deadline, any other (the hold or the job is gone) stops the keeper.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from ecu_sidecar.client.errors import QuotaError
from ecu_sidecar.client.retry import RETRYABLE_CODES

__all__ = ["DEFAULT_KEEPALIVE_MARGIN", "AsyncKeeper", "Lease", "ThreadKeeper", "check_switch"]

DEFAULT_KEEPALIVE_MARGIN = 1 / 3
"""A hold or a job is renewed when this fraction of its ttl is left before the deadline."""

#: Shortest pause between two attempts (a ttl of a few ms must not spin).
_MIN_WAIT_S = 0.005


def check_switch(name: str, on: object, margin_name: str, margin: float) -> None:
    """Refuse a keeper switch that is not a bool, or a margin that is not a fraction."""
    if not isinstance(on, bool):
        raise TypeError(f"{name} must be True or False, got {on!r}")
    if isinstance(margin, bool) or not 0 < margin < 1:
        raise ValueError(
            f"{margin_name} must be a fraction of the TTL between 0 and 1 (exclusive), "
            f"got {margin!r}"
        )


class Lease:
    """When the next background renewal is due, and what the renewals came to: the bookkeeping,
    free of any flavour. Its owner reports every renewal (its own and the background's) to
    ``renewed``; only the keeper counts ``renewals`` and records ``error``."""

    def __init__(self, margin: float, *, failing: str, stopping: str, log: logging.Logger) -> None:
        self.margin = margin
        """Renew when this fraction of the ttl is left before the deadline."""
        self.renewals = 0
        """Background renewals the sidecar accepted."""
        self.error: BaseException | None = None
        """The background's last failure (None while it never failed)."""
        self._failing = failing
        """Log text of a failure that is retried ("could not heartbeat job acme/j")."""
        self._stopping = stopping
        """Log text of a failure that stops the keeper ("heartbeat of job acme/j")."""
        self._log = log
        self._ttl_ms = 0
        self._due = 0.0
        """time.monotonic() at which the background renews next."""

    def renewed(self, sent: float, lives_ms: int, ttl_ms: int) -> None:
        """A renewal (or the placing) sent at ``sent`` (monotonic) keeps the lease alive at
        least ``lives_ms`` from then: the sidecar read its clock after the call left, and a
        renewal never shortens a deadline. Renew again a margin of ``ttl_ms`` before that."""
        self._ttl_ms = ttl_ms
        self._due = sent + lives_ms / 1000 - self.margin * ttl_ms / 1000

    def wait_s(self) -> float:
        """How long the keeper sleeps before it looks again."""
        return max(self._due - time.monotonic(), _MIN_WAIT_S)

    def due(self) -> bool:
        """Whether a renewal is due now (the owner may have renewed meanwhile)."""
        return time.monotonic() >= self._due

    def failed(self, error: BaseException) -> bool:
        """Record a failed background renewal; True when the keeper should try again."""
        self.error = error
        if isinstance(error, QuotaError) and error.code in RETRYABLE_CODES:
            retry_s = max(self.margin * self._ttl_ms / 4000, _MIN_WAIT_S)
            self._due = time.monotonic() + retry_s
            self._log.warning("%s (retrying in %.3fs): %s", self._failing, retry_s, error)
            return True
        self._log.warning("%s stopped: %s", self._stopping, error)
        return False


class AsyncKeeper:
    """Renews a lease in a background task, under the owner's lock, while ``alive()``."""

    def __init__(
        self,
        lease: Lease,
        lock: asyncio.Lock,
        alive: Callable[[], bool],
        renew: Callable[[], Awaitable[object]],
    ) -> None:
        self.lease = lease
        self.task: asyncio.Task[None] | None = None
        """The task while it runs (None before ``start`` and after ``stop``)."""
        self._lock = lock
        self._alive = alive
        self._renew = renew

    def start(self, name: str) -> None:
        """Start renewing in a task of that name."""
        self.task = asyncio.create_task(self._run(), name=name)

    async def stop(self) -> None:
        """Stop renewing; returns once the task ended (a renewal in flight is cancelled)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _run(self) -> None:
        lease = self.lease
        while True:
            await asyncio.sleep(lease.wait_s())
            async with self._lock:
                if not self._alive():
                    return
                if not lease.due():  # the owner renewed meanwhile
                    continue
                try:
                    await self._renew()
                except Exception as error:  # never into the block: recorded, logged
                    if not lease.failed(error):
                        return
                else:
                    lease.renewals += 1


class ThreadKeeper:
    """Renews a lease in a daemon thread, under the owner's lock, while ``alive()``."""

    def __init__(
        self,
        lease: Lease,
        lock: threading.Lock,
        alive: Callable[[], bool],
        renew: Callable[[], object],
    ) -> None:
        self.lease = lease
        self.thread: threading.Thread | None = None
        """The thread while it runs (None before ``start`` and after ``stop``)."""
        self._lock = lock
        self._alive = alive
        self._renew = renew
        self._stop = threading.Event()

    def start(self, name: str) -> None:
        """Start renewing in a thread of that name."""
        self._stop.clear()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop renewing; returns once the thread ended (unless called from it)."""
        thread, self.thread = self.thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # at most one renewal in flight, bounded by the call's retries

    def _run(self) -> None:
        lease = self.lease
        while not self._stop.wait(lease.wait_s()):
            with self._lock:
                if self._stop.is_set() or not self._alive():
                    return
                if not lease.due():  # the owner renewed meanwhile
                    continue
                try:
                    self._renew()
                except Exception as error:  # never into the block: recorded, logged
                    if not lease.failed(error):
                        return
                else:
                    lease.renewals += 1
