"""The approved-job context managers: ``client.job(...)`` approves a job on entry, lets workers
draw its steps, keeps it alive while the block runs, and closes it on exit.

Entering approves (ApproveJob; idempotent on the job id, so entering again after a crash
answers the job as it stands). Inside, ``job.hold(...)`` and ``job.reserve(...)`` are the
client's own ``hold`` and ``reserve`` drawing from the job's room instead of the wallet (other
processes draw with ``job_id=`` on their own client). While the block runs, a background task
(``AsyncJob``) or thread (``Job``) heartbeats the job whenever only ``heartbeat_margin`` (a
third by default) of its abandonment ttl is left, so the job ends by itself only when its
owner died. Leaving the block, normally or by an exception, closes the job: what it did not
bill returns to the wallet at once, and ``job.view`` is the final job (``job.accuracy``:
committed ÷ approved, how pessimistic the preview was). A failed heartbeat never interrupts
the block: it is logged and kept in ``job.heartbeat_error``. The heartbeat is the keeper a
hold's keep-alive uses (client/keeper.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.client import requests
from ecu_sidecar.client.errors import QuotaError
from ecu_sidecar.client.hold import AsyncHold, Hold
from ecu_sidecar.client.keeper import (
    DEFAULT_KEEPALIVE_MARGIN,
    AsyncKeeper,
    Lease,
    ThreadKeeper,
    check_switch,
)
from ecu_sidecar.client.requests import Call
from ecu_sidecar.jobs import JobState, JobView
from ecu_sidecar.model import JobType, ReserveItem, ReserveOutcome

if TYPE_CHECKING:
    from ecu_sidecar.client.aio import AsyncQuotaClient
    from ecu_sidecar.client.sync import QuotaClient

__all__ = ["AsyncJob", "Job"]

log = logging.getLogger(__name__)

Spec = pb.JobSpec | Mapping[str, Any] | None


class _JobBase:
    """State and bookkeeping shared by AsyncJob and Job; the flavours only make the calls.

    Heartbeats (the background one and ``heartbeat()``) and ``close()`` are made under the job's
    one lock, so a heartbeat never races the close."""

    def __init__(
        self,
        approve: Call[JobView],
        *,
        heartbeat: bool = True,
        heartbeat_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        request = approve.request
        assert isinstance(request, pb.ApproveJobRequest)
        check_switch("heartbeat", heartbeat, "heartbeat_margin", heartbeat_margin)
        self._approve_call = approve
        self._account = request.account
        self.job_id: str = request.job_id
        """The job's id (generated unless the caller chose one)."""
        self.organization: str = request.account.organization
        """The organization paying for the job."""
        self.view: JobView | None = None
        """The job as the last answer showed it (approve, heartbeat, refresh, close): after the
        block, the final job."""
        self.heartbeat = heartbeat
        """Whether the job is heartbeaten in the background while the block runs."""
        self.heartbeat_margin = heartbeat_margin
        """The heartbeat is sent when this fraction of the ttl is left before the deadline."""
        where = f"job {self.organization}/{self.job_id}"
        self._lease = Lease(
            heartbeat_margin,
            failing=f"could not heartbeat {where}",
            stopping=f"heartbeat of {where}",
            log=log,
        )

    @property
    def heartbeats(self) -> int:
        """Heartbeats the background made that the sidecar accepted."""
        return self._lease.renewals

    @property
    def heartbeat_error(self) -> BaseException | None:
        """The background heartbeat's last failure (None while it never failed). UNAVAILABLE
        is retried before the deadline; any other failure (the job ended) stops it."""
        return self._lease.error

    def __repr__(self) -> str:
        state = self.view.state.name if self.view else "not approved"
        return f"<{type(self).__name__} {self.organization}/{self.job_id} {state}>"

    @property
    def accuracy(self) -> float | None:
        """Committed ÷ approved so far (final after the block): how pessimistic the preview
        was. A ratio for display, never money."""
        return self.view.accuracy if self.view else None

    @property
    def is_open(self) -> bool:
        """Whether the job was open at its last answer."""
        return self.view is not None and self.view.state is JobState.OPEN

    def _seen(self, view: JobView, sent: float | None = None) -> JobView:
        """Record an answer; one to an approval or heartbeat sent at ``sent`` (monotonic)
        keeps the job alive a ttl from then: heartbeat again before the margin."""
        self.view = view
        if sent is not None:
            self._lease.renewed(sent, view.ttl_ms, view.ttl_ms)
        return view

    def _step(
        self,
        amount_uecu: int,
        job_type: JobType | str | None,
        model: str,
        ttl_ms: int,
        reservation_id: str | None,
        job: Spec,
    ) -> Call[ReserveOutcome]:
        a = self._account
        return requests.reserve(
            self.organization,
            amount_uecu,
            job_type=job_type,
            model=model,
            team=a.team,
            project=a.project,
            user=a.user,
            ttl_ms=ttl_ms,
            reservation_id=reservation_id,
            job=job,
            job_id=self.job_id,
        )

    def _steps(self, items: Sequence[ReserveItem]) -> Call[ReserveOutcome]:
        a = self._account
        return requests.reserve_batch(
            self.organization,
            items,
            team=a.team,
            project=a.project,
            user=a.user,
            job_id=self.job_id,
        )

    def _get_job(self) -> Call[JobView]:
        return requests.get_job(self.organization, self.job_id)

    def _heartbeat_job(self) -> Call[JobView]:
        return requests.heartbeat_job(self.organization, self.job_id)

    def _close_job(self) -> Call[JobView]:
        return requests.close_job(self.organization, self.job_id)

    def _close_failed_on_exit(self, error: QuotaError, block_error: BaseException | None) -> None:
        if block_error is None:
            raise error
        log.warning(
            "could not close job %s/%s after %s: %s (it ends by itself after its ttl)",
            self.organization,
            self.job_id,
            type(block_error).__name__,
            error,
        )


class AsyncJob(_JobBase):
    """A job approved on entering ``async with client.job(...)``, heartbeaten by a background
    task while the block runs (unless ``heartbeat=False``), closed on exit."""

    def __init__(
        self,
        client: AsyncQuotaClient,
        approve: Call[JobView],
        *,
        heartbeat: bool = True,
        heartbeat_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        super().__init__(approve, heartbeat=heartbeat, heartbeat_margin=heartbeat_margin)
        self._client = client
        self._lock = asyncio.Lock()
        self._keeper = AsyncKeeper(
            self._lease, self._lock, lambda: self.is_open, self._heartbeat_locked
        )

    @property
    def keeper(self) -> asyncio.Task[None] | None:
        """The heartbeat task while it runs (None before the job is approved, with
        ``heartbeat=False``, and once the block ended)."""
        return self._keeper.task

    async def __aenter__(self) -> AsyncJob:
        sent = time.monotonic()
        self._seen(await self._client.call(self._approve_call), sent)
        if self.heartbeat and self.is_open:
            self._keeper.start(f"ecu-job-{self.job_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._keeper.stop()
        if self.is_open:
            try:
                await self.close()
            except QuotaError as error:
                self._close_failed_on_exit(error, exc)

    async def _heartbeat_locked(self) -> JobView:
        sent = time.monotonic()
        return self._seen(await self._client.call(self._heartbeat_job()), sent)

    def hold(
        self,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: Spec = None,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> AsyncHold:
        """``client.hold(...)`` for a step of this job: drawn from its room, on its account."""
        call = self._step(amount_uecu, job_type, model, ttl_ms, reservation_id, job)
        return AsyncHold(self._client, call, keepalive=keepalive, keepalive_margin=keepalive_margin)

    async def reserve(
        self,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: Spec = None,
    ) -> ReserveOutcome:
        """``client.reserve(...)`` for a step of this job (``job_room_uecu``: its room after)."""
        call = self._step(amount_uecu, job_type, model, ttl_ms, reservation_id, job)
        return await self._client.call(call)

    async def reserve_batch(self, items: Sequence[ReserveItem]) -> ReserveOutcome:
        """``client.reserve_batch(...)`` for steps of this job, all or none."""
        return await self._client.call(self._steps(items))

    async def refresh(self) -> JobView:
        """The job as it stands now (GetJob)."""
        return self._seen(await self._client.call(self._get_job()))

    async def heartbeat_now(self) -> JobView:
        """Heartbeat the job now: it ends by itself only a ttl from now."""
        async with self._lock:
            return await self._heartbeat_locked()

    async def close(self) -> JobView:
        """Close the job now: its room and its steps still held return to the wallet (those
        steps are released). Closing again answers the same (a replay)."""
        async with self._lock:
            return self._seen(await self._client.call(self._close_job()))


class Job(_JobBase):
    """A job approved on entering ``with client.job(...)``, heartbeaten by a background thread
    while the block runs (unless ``heartbeat=False``), closed on exit."""

    def __init__(
        self,
        client: QuotaClient,
        approve: Call[JobView],
        *,
        heartbeat: bool = True,
        heartbeat_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        super().__init__(approve, heartbeat=heartbeat, heartbeat_margin=heartbeat_margin)
        self._client = client
        self._lock = threading.Lock()
        self._keeper = ThreadKeeper(
            self._lease, self._lock, lambda: self.is_open, self._heartbeat_locked
        )

    @property
    def keeper(self) -> threading.Thread | None:
        """The heartbeat thread while it runs (None before the job is approved, with
        ``heartbeat=False``, and once the block ended)."""
        return self._keeper.thread

    def __enter__(self) -> Job:
        sent = time.monotonic()
        self._seen(self._client.call(self._approve_call), sent)
        if self.heartbeat and self.is_open:
            self._keeper.start(f"ecu-job-{self.job_id}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._keeper.stop()
        if self.is_open:
            try:
                self.close()
            except QuotaError as error:
                self._close_failed_on_exit(error, exc)

    def _heartbeat_locked(self) -> JobView:
        sent = time.monotonic()
        return self._seen(self._client.call(self._heartbeat_job()), sent)

    def hold(
        self,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: Spec = None,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> Hold:
        """``client.hold(...)`` for a step of this job: drawn from its room, on its account."""
        call = self._step(amount_uecu, job_type, model, ttl_ms, reservation_id, job)
        return Hold(self._client, call, keepalive=keepalive, keepalive_margin=keepalive_margin)

    def reserve(
        self,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: Spec = None,
    ) -> ReserveOutcome:
        """``client.reserve(...)`` for a step of this job (``job_room_uecu``: its room after)."""
        return self._client.call(
            self._step(amount_uecu, job_type, model, ttl_ms, reservation_id, job)
        )

    def reserve_batch(self, items: Sequence[ReserveItem]) -> ReserveOutcome:
        """``client.reserve_batch(...)`` for steps of this job, all or none."""
        return self._client.call(self._steps(items))

    def refresh(self) -> JobView:
        """The job as it stands now (GetJob)."""
        return self._seen(self._client.call(self._get_job()))

    def heartbeat_now(self) -> JobView:
        """Heartbeat the job now: it ends by itself only a ttl from now."""
        with self._lock:
            return self._heartbeat_locked()

    def close(self) -> JobView:
        """Close the job now: its room and its steps still held return to the wallet (those
        steps are released). Closing again answers the same (a replay)."""
        with self._lock:
            return self._seen(self._client.call(self._close_job()))
