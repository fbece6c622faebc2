"""The hold context managers: ``client.hold(...)`` places a hold on entry, keeps it alive while
the block runs, and settles it on exit.

An exception in the block, or leaving it without commit or release, releases the hold, except
after a commit whose outcome is unknown (retries exhausted): the commit may have landed, and
the worker may still retry it, so the hold is left to that retry or to its deadline.

While the block runs, the hold is kept alive: a background task (``AsyncHold``) or thread
(``Hold``) extends it whenever only ``keepalive_margin`` (a third by default) of its TTL is
left, so a hold expires only when its worker died (an expired hold's late commit is billed
only what is still available plus its overage bound). ``keepalive=False`` turns this off. A
failed keep-alive extend never interrupts the block: it is logged and kept in
``h.keepalive_error``. The renewal loop is client/keeper.py's, which jobs share.

The bookkeeping (state, deadlines, heartbeat sequence, what to do on exit) is ``_HoldBase``'s;
each flavour adds only its lock, its keeper and its calls.
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
from ecu_sidecar.client.errors import QuotaError, invalid
from ecu_sidecar.client.keeper import (
    DEFAULT_KEEPALIVE_MARGIN,
    AsyncKeeper,
    Lease,
    ThreadKeeper,
    check_switch,
)
from ecu_sidecar.client.requests import Call
from ecu_sidecar.client.retry import RETRYABLE_CODES
from ecu_sidecar.model import (
    CommitOutcome,
    ExtendOutcome,
    HoldState,
    ReleaseOutcome,
    ReserveOutcome,
    Usage,
)
from ecu_sidecar.pricing import Quote, UsageLine

if TYPE_CHECKING:
    from ecu_sidecar.client.aio import AsyncQuotaClient
    from ecu_sidecar.client.sync import QuotaClient

__all__ = ["DEFAULT_KEEPALIVE_MARGIN", "AsyncHold", "Hold"]

log = logging.getLogger(__name__)


class _HoldBase:
    """State and bookkeeping shared by AsyncHold and Hold; the flavours only make the calls.

    Every extend (the caller's ``extend()`` and the keep-alive's) is made under the hold's one
    lock, which also takes the next heartbeat sequence: the two never send numbers out of
    order (the sidecar would refuse the lower as STALE_SEQUENCE). Commit and release take the
    lock too, so a keep-alive extend never races the hold's settlement."""

    def __init__(
        self,
        reserve: Call[ReserveOutcome],
        *,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        request = reserve.request
        assert isinstance(request, pb.ReserveRequest)
        check_switch("keepalive", keepalive, "keepalive_margin", keepalive_margin)
        self._reserve_call = reserve
        self.reservation_id: str = request.reservation_id
        """The hold's reservation id (generated unless the caller chose one)."""
        self.organization: str = request.account.organization
        """The organization paying for the hold."""
        self.amount_uecu: int = request.amount_uecu
        """The amount held (a job's worst case once the hold is placed)."""
        self.quote: Quote | None = None
        """With ``job=``: the priced worst case, once the hold is placed."""
        self.rate_card_version = ""
        """With ``job=``: the rate card version the hold pinned; ``commit(usage_lines=...)``
        sends it."""
        self.deadline_unix_ms = 0
        """When the sidecar will expire the hold (pushed by ``extend`` and the keep-alive)."""
        self.available_uecu = 0
        """The organization's available balance right after the hold was placed."""
        self.state: HoldState | None = None
        """None before the hold is placed, then ACTIVE, COMMITTED, RELEASED or EXPIRED."""
        self.sequence = 0
        """The last heartbeat sequence sent by ``extend`` or the keep-alive (0 before the
        first)."""
        self.committed: CommitOutcome | None = None
        """The commit's answer once committed."""
        self.keepalive = keepalive
        """Whether the hold is extended in the background while the block runs."""
        self.keepalive_margin = keepalive_margin
        """The keep-alive extends when this fraction of the TTL is left before the deadline."""
        self._commit_in_doubt = False
        self._ttl_ms = request.ttl_ms
        """The hold's TTL: the one asked, else estimated when the hold is placed."""
        where = f"hold {self.organization}/{self.reservation_id}"
        self._lease = Lease(
            keepalive_margin,
            failing=f"keep-alive could not extend {where}",
            stopping=f"keep-alive of {where}",
            log=log,
        )

    @property
    def keepalive_extends(self) -> int:
        """Extends the keep-alive made that the sidecar accepted."""
        return self._lease.renewals

    @property
    def keepalive_error(self) -> BaseException | None:
        """The keep-alive's last failure (None while it never failed). UNAVAILABLE is retried
        before the deadline; any other failure (the hold is gone) stops the keep-alive."""
        return self._lease.error

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.organization}/{self.reservation_id} "
            f"{self.amount_uecu} uECU {self.state}>"
        )

    def _placed(self, out: ReserveOutcome, sent: float) -> None:
        (view,) = out.holds
        self.amount_uecu = view.amount_uecu
        self.quote = out.quotes[0] if out.quotes else None
        self.rate_card_version = view.rate_card_version
        self.deadline_unix_ms = view.deadline_unix_ms
        self.available_uecu = out.available_uecu
        self.state = view.state
        if not self._ttl_ms:
            # The sidecar's default TTL: read off the deadline against this host's clock (the
            # sidecar's Redis must agree with it within the margin; pass ttl_ms to be exact).
            self._ttl_ms = max(1, view.deadline_unix_ms - int(time.time() * 1000))
        self._covered(sent, 0)

    def _covered(self, sent: float, ttl_ms: int) -> None:
        """A hold placed or extended by a call sent at ``sent`` (monotonic) lives at least
        ``ttl_ms`` (0: its own TTL) from then: the sidecar's clock read the time after the
        call left, and an extend never shortens a deadline. Extend again before the margin."""
        self._lease.renewed(sent, ttl_ms or self._ttl_ms, self._ttl_ms)

    def _active(self) -> bool:
        return self.state is HoldState.ACTIVE

    def _commit_call(
        self, actual_uecu: int, usage: Usage | None, usage_lines: Sequence[Any] | None
    ) -> Call[CommitOutcome]:
        if usage_lines is None:
            return requests.commit(self.organization, self.reservation_id, actual_uecu, usage=usage)
        if not self.rate_card_version:
            raise invalid(
                "usage_lines",
                "this hold was reserved with an amount, not a job: it has no rate card version "
                "to price usage with; commit the actual amount instead",
            )
        return requests.commit(
            self.organization,
            self.reservation_id,
            actual_uecu,
            usage=usage,
            usage_lines=usage_lines,
            rate_card_version=self.rate_card_version,
        )

    def _committed(self, out: CommitOutcome) -> CommitOutcome:
        self.state, self.committed, self._commit_in_doubt = HoldState.COMMITTED, out, False
        return out

    def _commit_failed(self, error: QuotaError) -> None:
        # After retries ran out the commit may still have landed; releasing now would make the
        # caller's own retry of the commit fail, and the usage would never be billed.
        if error.code in RETRYABLE_CODES:
            self._commit_in_doubt = True

    def _release_call(self) -> Call[ReleaseOutcome]:
        return requests.release(self.organization, self.reservation_id)

    def _released(self, out: ReleaseOutcome) -> ReleaseOutcome:
        self.state = out.state
        return out

    def _extend_call(self, ttl_ms: int) -> Call[ExtendOutcome]:
        # Advance before sending (under the hold's lock): a number never reused for another
        # heartbeat, even when this one's outcome is unknown; retries inside the call layer
        # resend the same number.
        call = requests.extend(
            self.organization, self.reservation_id, sequence=self.sequence + 1, ttl_ms=ttl_ms
        )
        self.sequence += 1
        return call

    def _extended(self, out: ExtendOutcome, sent: float, ttl_ms: int) -> ExtendOutcome:
        self.deadline_unix_ms = out.deadline_unix_ms
        self._covered(sent, ttl_ms)
        return out

    def _must_release_on_exit(self) -> bool:
        return self.state is HoldState.ACTIVE and not self._commit_in_doubt

    def _release_failed_on_exit(self, error: QuotaError, block_error: BaseException | None) -> None:
        if block_error is None:
            raise error
        log.warning(
            "could not release hold %s/%s after %s: %s (it expires at its deadline)",
            self.organization,
            self.reservation_id,
            type(block_error).__name__,
            error,
        )

    @property
    def reserve_call(self) -> Call[ReserveOutcome]:
        """The Reserve this hold sends (built once: a retry resends the same reservation id)."""
        return self._reserve_call


class AsyncHold(_HoldBase):
    """A hold placed on entering ``async with client.hold(...)``, released unless committed,
    kept alive by a background task while the block runs (unless ``keepalive=False``)."""

    @property
    def keeper(self) -> asyncio.Task[None] | None:
        """The keep-alive task while it runs (None before the hold is placed, with
        ``keepalive=False``, and once the hold is settled)."""
        return self._keeper.task

    def __init__(
        self,
        client: AsyncQuotaClient,
        reserve: Call[ReserveOutcome],
        *,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        super().__init__(reserve, keepalive=keepalive, keepalive_margin=keepalive_margin)
        self._client = client
        self._lock = asyncio.Lock()
        self._keeper = AsyncKeeper(self._lease, self._lock, self._active, self._keepalive_extend)

    async def __aenter__(self) -> AsyncHold:
        sent = time.monotonic()
        self._placed(await self._client.call(self._reserve_call), sent)
        if self.keepalive and self._active():
            self._keeper.start(f"ecu-keepalive-{self.reservation_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._keeper.stop()
        if self._must_release_on_exit():
            try:
                await self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    async def _keepalive_extend(self) -> ExtendOutcome:
        return await self._extend_locked(0)

    async def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(await self._client.call(call), sent, ttl_ms)

    async def commit(
        self,
        actual_uecu: int = 0,
        *,
        usage: Usage | None = None,
        usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    ) -> CommitOutcome:
        """Settle the hold with what the step really cost, or with the ``usage_lines`` it used
        (a hold placed with ``job=``: priced by the sidecar with the hold's pinned rate card
        version). A replay answers the same."""
        call = self._commit_call(actual_uecu, usage, usage_lines)
        async with self._lock:
            try:
                return self._committed(await self._client.call(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    async def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        async with self._lock:
            return self._released(await self._client.call(self._release_call()))

    async def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        async with self._lock:
            return await self._extend_locked(ttl_ms)


class Hold(_HoldBase):
    """A hold placed on entering ``with client.hold(...)``, released unless committed, kept
    alive by a background thread while the block runs (unless ``keepalive=False``)."""

    @property
    def keeper(self) -> threading.Thread | None:
        """The keep-alive thread while it runs (None before the hold is placed, with
        ``keepalive=False``, and once the hold is settled)."""
        return self._keeper.thread

    def __init__(
        self,
        client: QuotaClient,
        reserve: Call[ReserveOutcome],
        *,
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> None:
        super().__init__(reserve, keepalive=keepalive, keepalive_margin=keepalive_margin)
        self._client = client
        self._lock = threading.Lock()
        self._keeper = ThreadKeeper(self._lease, self._lock, self._active, self._keepalive_extend)

    def __enter__(self) -> Hold:
        sent = time.monotonic()
        self._placed(self._client.call(self._reserve_call), sent)
        if self.keepalive and self._active():
            self._keeper.start(f"ecu-keepalive-{self.reservation_id}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._keeper.stop()
        if self._must_release_on_exit():
            try:
                self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    def _keepalive_extend(self) -> ExtendOutcome:
        return self._extend_locked(0)

    def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(self._client.call(call), sent, ttl_ms)

    def commit(
        self,
        actual_uecu: int = 0,
        *,
        usage: Usage | None = None,
        usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
    ) -> CommitOutcome:
        """Settle the hold with what the step really cost, or with the ``usage_lines`` it used
        (a hold placed with ``job=``: priced by the sidecar with the hold's pinned rate card
        version). A replay answers the same."""
        call = self._commit_call(actual_uecu, usage, usage_lines)
        with self._lock:
            try:
                return self._committed(self._client.call(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        with self._lock:
            return self._released(self._client.call(self._release_call()))

    def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        with self._lock:
            return self._extend_locked(ttl_ms)
