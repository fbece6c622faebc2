"""The Python client evaluation workers use to talk to the sidecar, async and sync.

Both flavours share everything but the wire call: each public method is generated from one
request builder below (``_reserve``, ``_commit`` ...) that validates plain Python values and
returns a ``Call`` (RPC name, request message, response converter). ``AsyncQuotaClient`` and
``QuotaClient`` each add only the call layer: per-attempt deadline, admin metadata, retries.

Retries: only UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times with jittered
backoff, and only because every mutating call is idempotent by its caller id: a request is
built once, so a retry resends the same reservation id, grant id or extend sequence and the
sidecar answers it from its record instead of charging twice. Retries after the first attempt
wait (within their deadline) for the connection to come back rather than failing fast again.

The star is ``hold``::

    async with client.hold(org="acme", amount_uecu=400_000, job_type="inference",
                           model="gpt-4o") as h:
        ...                                   # the step; h.extend() heartbeats long runs
        await h.commit(actual_uecu, usage=Usage(tokens_in=10))

An exception in the block, or leaving it without commit or release, releases the hold, except
after a commit whose outcome is unknown (retries exhausted): the commit may have landed, and
the worker may still retry it, so the hold is left to that retry or to its deadline.

While the block runs, the hold is kept alive: a background task (async) or thread (sync)
extends it whenever only ``keepalive_margin`` (a third by default) of its TTL is left, so a
hold expires only when its worker died (an expired hold's late commit is billed only what is
still available plus its overage bound). ``keepalive=False`` turns this off. A failed
keep-alive extend never interrupts the block: it is logged and kept in ``h.keepalive_error``.

Workers never compute money: give ``job=`` (a ``pb.JobSpec`` or its proto JSON form as a dict)
instead of an amount and the sidecar holds the job's worst case, pinned to its rate card
version; then commit what was used as ``usage_lines`` and the sidecar prices it with that same
version, which the hold sends by itself::

    job = {"items": [{"inference": {"model": "gpt-4o", "promptText": prompt,
                                    "maxOutputTokens": 500}}]}
    print((await client.preview("acme", job)).quote.total_uecu)   # what the user approves
    async with client.hold(org="acme", job=job) as h:
        ...
        await h.commit(usage_lines=[UsageLine("inference", "gpt-4o", tokens_in=812,
                                              tokens_out=240, calls=1)])
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.client import requests
from ecu_sidecar.client.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientEcu,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaError,
    Unavailable,
    error_from_rpc,
    invalid,
)
from ecu_sidecar.client.requests import Call, PreviewOutcome, RateCardInfo, new_caller_id
from ecu_sidecar.client.retry import RETRYABLE_CODES, RetryPolicy, give_up, retry_after
from ecu_sidecar.model import (
    CommitOutcome,
    ExtendOutcome,
    HoldState,
    ReleaseOutcome,
    ReserveOutcome,
    Usage,
)
from ecu_sidecar.pricing import Quote, UsageLine

__all__ = [
    "DEFAULT_KEEPALIVE_MARGIN",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "RETRYABLE_CODES",
    "AsyncHold",
    "AsyncQuotaClient",
    "Conflict",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Hold",
    "InsufficientEcu",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreviewOutcome",
    "QuotaClient",
    "QuotaError",
    "RateCardInfo",
    "RetryPolicy",
    "Unavailable",
    "UsageLine",
    "error_from_rpc",
    "new_caller_id",
]

log = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the sidecar listens by default (ECU_LISTEN's default)."""

DEFAULT_TIMEOUT_S = 2.0
"""Deadline of one attempt of one RPC."""

DEFAULT_KEEPALIVE_MARGIN = 1 / 3
"""``hold()`` extends its hold when this fraction of the hold's TTL is left before the deadline."""

#: Shortest pause of the keep-alive between two attempts (a TTL of a few ms must not spin).
_KEEPALIVE_MIN_WAIT_S = 0.005

#: Reconnect quickly: the sidecar is on localhost, and a worker that started before it (or
#: outlived a restart) should not wait gRPC's default 1-120 s reconnect backoff.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)

T = TypeVar("T")
H = TypeVar("H")
P = ParamSpec("P")


def _method_signature(build: Callable[..., Any], returns: Any) -> inspect.Signature:
    """The builder's signature with ``self`` in front and the converted return type."""
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    return sig.replace(parameters=[this, *sig.parameters.values()], return_annotation=returns)


def _result_annotation(build: Callable[..., Any]) -> Any:
    """``T`` of a builder's ``Call[T]`` annotation (a string: annotations are postponed)."""
    ann = inspect.signature(build).return_annotation
    if isinstance(ann, str) and ann.startswith("Call[") and ann.endswith("]"):
        return ann[len("Call[") : -1]
    return inspect.Signature.empty


def _expose(build: Callable[..., Any], method: Callable[..., Any], returns: Any) -> None:
    """Give a generated method the builder's public name, docstring and signature."""
    method.__name__ = build.__name__.lstrip("_")
    method.__qualname__ = method.__name__
    method.__doc__ = build.__doc__
    method.__signature__ = _method_signature(build, returns)  # type: ignore[attr-defined]


def _async_rpc(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncQuotaClient, P], Coroutine[Any, Any, T]]:
    """An AsyncQuotaClient method: build the call, then await it through the call layer."""

    async def method(self: AsyncQuotaClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._invoke(build(*args, **kwargs))

    _expose(build, method, _result_annotation(build))
    return method


def _sync_rpc(build: Callable[P, Call[T]]) -> Callable[Concatenate[QuotaClient, P], T]:
    """A QuotaClient method: build the call, then make it through the call layer."""

    def method(self: QuotaClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._invoke(build(*args, **kwargs))

    _expose(build, method, _result_annotation(build))
    return method


# -- holds -------------------------------------------------------------------------------------


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
        if not isinstance(keepalive, bool):
            raise TypeError(f"keepalive must be True or False, got {keepalive!r}")
        if isinstance(keepalive_margin, bool) or not 0 < keepalive_margin < 1:
            raise ValueError(
                f"keepalive_margin must be a fraction of the TTL between 0 and 1 (exclusive), "
                f"got {keepalive_margin!r}"
            )
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
        self.keepalive_extends = 0
        """Extends the keep-alive made that the sidecar accepted."""
        self.keepalive_error: BaseException | None = None
        """The keep-alive's last failure (None while it never failed). UNAVAILABLE is retried
        before the deadline; any other failure (the hold is gone) stops the keep-alive."""
        self._commit_in_doubt = False
        self._ttl_ms = request.ttl_ms
        """The hold's TTL: the one asked, else estimated when the hold is placed."""
        self._extend_due = 0.0
        """time.monotonic() at which the keep-alive extends next."""

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
        ttl_s = (ttl_ms or self._ttl_ms) / 1000
        self._extend_due = sent + ttl_s - self.keepalive_margin * (self._ttl_ms / 1000)

    def _keepalive_wait_s(self) -> float:
        return max(self._extend_due - time.monotonic(), _KEEPALIVE_MIN_WAIT_S)

    def _keepalive_failed(self, error: BaseException) -> bool:
        """Record a failed keep-alive extend; True when the keep-alive should try again."""
        self.keepalive_error = error
        if isinstance(error, QuotaError) and error.code in RETRYABLE_CODES:
            # The hold may still be alive: try again well before the deadline.
            retry_s = max(self.keepalive_margin * self._ttl_ms / 4000, _KEEPALIVE_MIN_WAIT_S)
            self._extend_due = time.monotonic() + retry_s
            log.warning(
                "keep-alive could not extend hold %s/%s (retrying in %.3fs): %s",
                self.organization,
                self.reservation_id,
                retry_s,
                error,
            )
            return True
        log.warning(
            "keep-alive of hold %s/%s stopped: %s",
            self.organization,
            self.reservation_id,
            error,
        )
        return False

    def _keepalive_due(self) -> bool:
        """Whether the keep-alive (holding the lock) should extend now."""
        return self.state is HoldState.ACTIVE and time.monotonic() >= self._extend_due

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


class AsyncHold(_HoldBase):
    """A hold placed on entering ``async with client.hold(...)``, released unless committed,
    kept alive by a background task while the block runs (unless ``keepalive=False``)."""

    def __init__(
        self, client: AsyncQuotaClient, reserve: Call[ReserveOutcome], **keepalive: Any
    ) -> None:
        super().__init__(reserve, **keepalive)
        self._client = client
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncHold:
        sent = time.monotonic()
        self._placed(await self._client._invoke(self._reserve_call), sent)
        if self.keepalive and self.state is HoldState.ACTIVE:
            self._keeper = asyncio.create_task(
                self._keep_alive(), name=f"ecu-keepalive-{self.reservation_id}"
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_keepalive()
        if self._must_release_on_exit():
            try:
                await self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_wait_s())
            async with self._lock:
                if self.state is not HoldState.ACTIVE:
                    return
                if not self._keepalive_due():  # the caller extended meanwhile
                    continue
                try:
                    await self._extend_locked(0)
                except Exception as error:  # never into the block: recorded, logged
                    if not self._keepalive_failed(error):
                        return
                else:
                    self.keepalive_extends += 1

    async def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait([keeper])

    async def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(await self._client._invoke(call), sent, ttl_ms)

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
                return self._committed(await self._client._invoke(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    async def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        async with self._lock:
            return self._released(await self._client._invoke(self._release_call()))

    async def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        async with self._lock:
            return await self._extend_locked(ttl_ms)


class Hold(_HoldBase):
    """A hold placed on entering ``with client.hold(...)``, released unless committed, kept
    alive by a background thread while the block runs (unless ``keepalive=False``)."""

    def __init__(
        self, client: QuotaClient, reserve: Call[ReserveOutcome], **keepalive: Any
    ) -> None:
        super().__init__(reserve, **keepalive)
        self._client = client
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def __enter__(self) -> Hold:
        sent = time.monotonic()
        self._placed(self._client._invoke(self._reserve_call), sent)
        if self.keepalive and self.state is HoldState.ACTIVE:
            self._stop.clear()
            self._keeper = threading.Thread(
                target=self._keep_alive, name=f"ecu-keepalive-{self.reservation_id}", daemon=True
            )
            self._keeper.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_keepalive()
        if self._must_release_on_exit():
            try:
                self.release()
            except QuotaError as error:
                self._release_failed_on_exit(error, exc)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self._keepalive_wait_s()):
            with self._lock:
                if self._stop.is_set() or self.state is not HoldState.ACTIVE:
                    return
                if not self._keepalive_due():  # the caller extended meanwhile
                    continue
                try:
                    self._extend_locked(0)
                except Exception as error:  # never into the block: recorded, logged
                    if not self._keepalive_failed(error):
                        return
                else:
                    self.keepalive_extends += 1

    def _stop_keepalive(self) -> None:
        keeper, self._keeper = self._keeper, None
        self._stop.set()
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join()  # at most one extend in flight, bounded by the call's retries

    def _extend_locked(self, ttl_ms: int) -> ExtendOutcome:
        call = self._extend_call(ttl_ms)
        sent = time.monotonic()
        return self._extended(self._client._invoke(call), sent, ttl_ms)

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
                return self._committed(self._client._invoke(call))
            except QuotaError as error:
                self._commit_failed(error)
                raise

    def release(self) -> ReleaseOutcome:
        """Void the hold now; its amount returns to available."""
        with self._lock:
            return self._released(self._client._invoke(self._release_call()))

    def extend(self, ttl_ms: int = 0) -> ExtendOutcome:
        """Heartbeat: push the deadline to now + ttl_ms (0: the hold's original TTL)."""
        with self._lock:
            return self._extend_locked(ttl_ms)


_KEEPALIVE_PARAMETERS = (
    inspect.Parameter("keepalive", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool"),
    inspect.Parameter(
        "keepalive_margin",
        inspect.Parameter.KEYWORD_ONLY,
        default=DEFAULT_KEEPALIVE_MARGIN,
        annotation="float",
    ),
)


def _hold_method(
    build: Callable[P, Call[ReserveOutcome]], hold_cls: Callable[..., H]
) -> Callable[Concatenate[Any, P], H]:
    """A ``hold`` method: builds the reservation (fixing its id) without placing it yet; the
    reservation's arguments plus ``keepalive`` and ``keepalive_margin``."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> H:
        keepalive = {k: kwargs.pop(k) for k in ("keepalive", "keepalive_margin") if k in kwargs}
        return hold_cls(self, build(*args, **kwargs), **keepalive)

    _expose(build, method, getattr(hold_cls, "__name__", inspect.Signature.empty))
    sig: inspect.Signature = method.__signature__  # type: ignore[attr-defined]
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), *_KEEPALIVE_PARAMETERS]
    )
    method.__name__ = method.__qualname__ = "hold"
    method.__doc__ = (
        "A context manager placing the hold on entry; released on exception or unless "
        "committed. While the block runs the hold is extended whenever ``keepalive_margin`` "
        f"(default {DEFAULT_KEEPALIVE_MARGIN:.3g}) of its TTL is left; ``keepalive=False`` "
        "turns that off."
    )
    return method


# -- clients -----------------------------------------------------------------------------------


class _ClientBase:
    """Connection settings shared by both flavours."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ) -> None:
        """Settings only; the channel opens on the first call. Interceptors of the flavour."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        """The sidecar's host:port."""
        self.timeout_s = timeout_s
        """Deadline of each attempt of each call."""
        self.retry = retry or RetryPolicy()
        """Which failures are retried, how often and after what pause."""
        self._admin_token = admin_token or ""
        self._options = [*_CHANNEL_OPTIONS, *channel_options]
        self._interceptors = list(interceptors)

    def _metadata(self, call: Call[Any]) -> tuple[tuple[str, str], ...] | None:
        if call.admin and self._admin_token:
            return (("authorization", f"Bearer {self._admin_token}"),)
        return None


class AsyncQuotaClient(_ClientBase):
    """The asyncio client (grpc.aio); use as ``async with AsyncQuotaClient(...) as client``."""

    _channel: grpc.aio.Channel | None = None
    _stub: quota_pb2_grpc.QuotaStub | None = None

    def _get_stub(self) -> quota_pb2_grpc.QuotaStub:
        # Opened lazily: a grpc.aio channel belongs to the running event loop.
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=self._options, interceptors=self._interceptors or None
            )
            self._stub = quota_pb2_grpc.QuotaStub(self._channel)
        return self._stub

    async def _invoke(self, call: Call[T]) -> T:
        rpc = getattr(self._get_stub(), call.method)
        metadata = self._metadata(call)
        failures: list[grpc.RpcError] = []
        since = 0.0
        while True:
            try:
                response = await rpc(
                    call.request,
                    timeout=self.timeout_s,
                    metadata=metadata,
                    wait_for_ready=bool(failures),
                )
            except grpc.RpcError as exc:
                if not failures:
                    since = time.monotonic()
                failures.append(exc)
                if not retry_after(self.retry, call.method, failures, since):
                    raise give_up(failures) from exc
                await asyncio.sleep(self.retry.backoff_s(len(failures)))
                continue
            return call.convert(response)

    async def close(self) -> None:
        """Close the channel (in-flight calls are cancelled)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncQuotaClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    reserve = _async_rpc(requests.reserve)
    reserve_batch = _async_rpc(requests.reserve_batch)
    commit = _async_rpc(requests.commit)
    commit_batch = _async_rpc(requests.commit_batch)
    release = _async_rpc(requests.release)
    extend = _async_rpc(requests.extend)
    balance = _async_rpc(requests.balance)
    grant = _async_rpc(requests.grant)
    set_cap = _async_rpc(requests.set_cap)
    set_auto_topup = _async_rpc(requests.set_auto_topup)
    preview = _async_rpc(requests.preview)
    rate_card = _async_rpc(requests.rate_card)
    hold = _hold_method(requests.reserve, AsyncHold)


class QuotaClient(_ClientBase):
    """The blocking client (grpc channel); use as ``with QuotaClient(...) as client``."""

    _channel: grpc.Channel | None = None
    _stub: quota_pb2_grpc.QuotaStub | None = None
    _opening = threading.Lock()  # threads may share a client; open one channel, not several

    def _get_stub(self) -> quota_pb2_grpc.QuotaStub:
        with self._opening:
            if self._stub is None:
                self._channel = grpc.insecure_channel(self.target, options=self._options)
                channel = grpc.intercept_channel(self._channel, *self._interceptors)
                self._stub = quota_pb2_grpc.QuotaStub(channel)
            return self._stub

    def _invoke(self, call: Call[T]) -> T:
        rpc = getattr(self._get_stub(), call.method)
        metadata = self._metadata(call)
        failures: list[grpc.RpcError] = []
        since = 0.0
        while True:
            try:
                response = rpc(
                    call.request,
                    timeout=self.timeout_s,
                    metadata=metadata,
                    wait_for_ready=bool(failures),
                )
            except grpc.RpcError as exc:
                if not failures:
                    since = time.monotonic()
                failures.append(exc)
                if not retry_after(self.retry, call.method, failures, since):
                    raise give_up(failures) from exc
                time.sleep(self.retry.backoff_s(len(failures)))
                continue
            return call.convert(response)

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    reserve = _sync_rpc(requests.reserve)
    reserve_batch = _sync_rpc(requests.reserve_batch)
    commit = _sync_rpc(requests.commit)
    commit_batch = _sync_rpc(requests.commit_batch)
    release = _sync_rpc(requests.release)
    extend = _sync_rpc(requests.extend)
    balance = _sync_rpc(requests.balance)
    grant = _sync_rpc(requests.grant)
    set_cap = _sync_rpc(requests.set_cap)
    set_auto_topup = _sync_rpc(requests.set_auto_topup)
    preview = _sync_rpc(requests.preview)
    rate_card = _sync_rpc(requests.rate_card)
    hold = _hold_method(requests.reserve, Hold)
