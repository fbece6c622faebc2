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
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

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
)
from ecu_sidecar.client.hold import DEFAULT_KEEPALIVE_MARGIN, AsyncHold, Hold
from ecu_sidecar.client.requests import Call, PreviewOutcome, RateCardInfo, new_caller_id
from ecu_sidecar.client.retry import RETRYABLE_CODES, RetryPolicy, give_up, retry_after
from ecu_sidecar.model import ReserveOutcome
from ecu_sidecar.pricing import UsageLine

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
