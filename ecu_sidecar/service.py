"""The gRPC service: protobuf in, engine call, protobuf out. Nothing else lives here.

Every handler runs inside ``_handle``, which times the call, counts it, and turns a domain
error into its gRPC status (ecu_sidecar.status) with google.rpc details. A request whose bytes
do not parse reaches its handler as an ``Undecodable`` (``tolerant_deserializer``, which the
server installs for every method) and is refused there like any other invalid request.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ecu_sidecar import errors
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.convert import (
    account_from_pb,
    balance_to_pb,
    cap_scope_from_pb,
    commit_item_from_pb,
    commit_to_pb,
    expected_to_pb,
    grant_kind_from_pb,
    hold_state_to_pb,
    hold_to_pb,
    job_approval_from_pb,
    job_from_pb,
    job_view_to_pb,
    quote_to_pb,
    reserve_item_from_pb,
    scope_to_pb,
)
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.jobs import JobView
from ecu_sidecar.metrics import Metrics
from ecu_sidecar.model import CommitOutcome
from ecu_sidecar.pricing import NoRateCard
from ecu_sidecar.status import code_for, to_grpc_status
from ecu_sidecar.validation import check_org

__all__ = ["QuotaService", "Undecodable", "tolerant_deserializer"]

log = logging.getLogger(__name__)

Resp = TypeVar("Resp")


#: RPCs that change state: each success is logged once at DEBUG.
_STATE_CHANGES = frozenset(
    {"Reserve", "ReserveBatch", "Commit", "CommitBatch", "Release", "Extend", "Grant", "SetCap",
     "SetAutoTopUp", "ApproveJob", "HeartbeatJob", "CloseJob"}
)  # fmt: skip
#: The pause an OVERLOADED answer suggests before a retry.
_OVERLOADED_RETRY_MS = 50
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=-]")
_MAX_LOGGED_IDS = 20


def _request_id(context: Any) -> str:
    """The caller's ``x-request-id`` metadata (sanitized, at most 128 characters), or ''."""
    metadata = getattr(context, "invocation_metadata", None)
    for key, value in (metadata() if metadata else None) or ():
        if key == "x-request-id":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            return _UNSAFE.sub("_", text[:128])
    return ""


def _log_fields(request: Any, context: Any, response: Any = None) -> dict[str, Any]:
    """What a log line of this RPC carries: request id, organization, reservation or grant
    ids, and the amounts of the outcome. Never metadata other than x-request-id (the
    authorization header carries the admin token)."""
    out: dict[str, Any] = {"request_id": _request_id(context)}
    account = getattr(request, "account", None)
    out["organization"] = (
        account.organization if account is not None else getattr(request, "organization", "")
    )
    if getattr(request, "reservation_id", ""):
        out["reservation_id"] = request.reservation_id
    items = getattr(request, "items", None)
    if items:
        out["reservation_ids"] = [it.reservation_id for it in items[:_MAX_LOGGED_IDS]]
        out["items"] = len(items)
    if getattr(request, "grant_id", ""):
        out["grant_id"] = request.grant_id
    if getattr(request, "job_id", ""):
        out["job_id"] = request.job_id
    if response is not None:
        hold = getattr(response, "hold", None)
        if hold is not None and hold.reservation_id:
            out["reservation_id"] = hold.reservation_id  # generated ids are logged too
            out["amount_uecu"] = hold.amount_uecu
        for name in ("committed_uecu", "released_uecu", "overage_uecu", "deadline_unix_ms"):
            if getattr(response, name, 0):
                out[name] = getattr(response, name)
        if getattr(response, "replayed", False):
            out["replayed"] = True
    return out


class Undecodable:
    """What a handler receives instead of a request whose bytes did not parse as its message
    (see tolerant_deserializer): ``_handle`` answers it with its INVALID_ARGUMENT error."""

    __slots__ = ("error",)

    def __init__(self, error: errors.UndecodableRequest) -> None:
        self.error = error


def tolerant_deserializer(
    rpc: str, message_type: str, parse: Callable[[bytes], Any]
) -> Callable[[bytes], Any]:
    """``parse`` (a generated ``FromString``), returning an Undecodable where it raises.

    grpc.aio answers a raising request deserializer itself, before any handler runs: UNKNOWN,
    no details, uncounted, and a traceback logged at ERROR for every bad payload. Handing the
    failure to the handler instead makes it one more counted INVALID_ARGUMENT."""
    prefix = f"Error parsing message with type '{message_type}': "

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError; whatever fails to parse, the bytes are at fault
            cause = str(exc).removeprefix(prefix) or type(exc).__name__
            cause = cause[:1].lower() + cause[1:]
            return Undecodable(errors.UndecodableRequest(rpc, message_type, cause))

    return deserialize


def _handle(
    method: str,
) -> Callable[[Callable[..., Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    """Time and count the RPC; answer domain errors with their status and details; log each
    state change (and each refusal) once at DEBUG with the request and reservation ids."""

    def wrap(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(
            self: QuotaService, request: Any, context: grpc.aio.ServicerContext
        ) -> Resp:
            start = time.perf_counter()
            code = "OK"
            admitted = False
            try:
                if type(request) is Undecodable:
                    raise request.error
                if self.max_concurrent and self.in_flight >= self.max_concurrent:
                    raise errors.Overloaded(
                        f"the sidecar is answering {self.in_flight} calls "
                        f"(ECU_MAX_CONCURRENT_RPCS); nothing was done, retry",
                        retry_after_ms=_OVERLOADED_RETRY_MS,
                    )
                self.in_flight += 1
                admitted = True
                response = await fn(self, request, context)
                if method in _STATE_CHANGES and log.isEnabledFor(logging.DEBUG):
                    log.debug("%s ok", method, extra=_log_fields(request, context, response))
                return response
            except errors.EcuError as exc:
                code = code_for(exc).name
                self.metrics.errors.labels(method, exc.reason).inc()
                if isinstance(exc, errors.InsufficientEcu):
                    self.metrics.rejected_insufficient(exc.metadata.get("scope", ""))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s refused: %s %s",
                        method,
                        exc.reason,
                        exc.message,
                        extra={**_log_fields(request, context), "code": code},
                    )
                status = to_grpc_status(exc)
                # Counted before the abort: it sends the status, so the caller may see the
                # refusal before this coroutine runs again.
                self.metrics.rpc_done(method, code, time.perf_counter() - start)
                code = ""
                await context.abort(status.code, status.details, status.trailing_metadata)
            except grpc.aio.AbortError:
                raise
            except Exception:
                self.metrics.errors.labels(method, "INTERNAL").inc()
                log.exception("%s failed unexpectedly", method)
                self.metrics.rpc_done(method, "INTERNAL", time.perf_counter() - start)
                code = ""
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see sidecar logs")
            finally:
                if admitted:
                    self.in_flight -= 1
                if code:  # an answer (or a cancellation): not counted yet
                    self.metrics.rpc_done(method, code, time.perf_counter() - start)
            raise AssertionError("unreachable")  # pragma: no cover

        return handler

    return wrap


class QuotaService(quota_pb2_grpc.QuotaServicer):
    """ecu_sidecar.api.v1.Quota on top of a QuotaEngine."""

    def __init__(
        self,
        engine: QuotaEngine,
        metrics: Metrics,
        admin_token: str = "",
        max_concurrent: int = 0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._admin_token = admin_token.encode()
        self.max_concurrent = max_concurrent
        """ECU_MAX_CONCURRENT_RPCS (0: unbounded)."""
        self.in_flight = 0
        """Calls being worked on now."""

    @staticmethod
    def _bearer(context: grpc.aio.ServicerContext) -> bytes:
        """The bearer token of the call's authorization metadata (b"" when none)."""
        supplied = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                if text.startswith("Bearer "):
                    supplied = text[len("Bearer ") :].encode()
        return supplied

    def _is_admin(self, context: grpc.aio.ServicerContext) -> bool:
        supplied = self._bearer(context)
        return bool(self._admin_token and supplied) and hmac.compare_digest(
            supplied, self._admin_token
        )

    def _require_admin(self, context: grpc.aio.ServicerContext) -> None:
        if not self._admin_token:
            raise errors.AdminDisabled("admin RPCs are disabled: no ECU_ADMIN_TOKEN is configured")
        supplied = self._bearer(context)
        if not supplied:
            raise errors.Unauthenticated(
                "admin RPCs need 'authorization: Bearer <admin token>' metadata"
            )
        if not hmac.compare_digest(supplied, self._admin_token):
            raise errors.PermissionDenied("the admin token does not match")

    @_handle("Reserve")
    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        account = account_from_pb(request.account)
        item = reserve_item_from_pb(request)
        out = await self.engine.reserve(account, [item], job_id=request.job_id)
        quote = out.quotes[0] if out.quotes else None
        if out.degraded and not out.replayed:
            self.metrics.degraded_grants.inc()
            self.metrics.degraded_uecu.inc(out.holds[0].amount_uecu)
        return pb.ReserveResponse(
            hold=hold_to_pb(account.organization, out.holds[0]),
            available_uecu=out.available_uecu,
            replayed=out.replayed,
            quote=quote_to_pb(quote) if quote else None,
            degraded=out.degraded,
            job_remaining_uecu=out.job_room_uecu or 0,
        )

    @_handle("ReserveBatch")
    async def ReserveBatch(
        self, request: pb.ReserveBatchRequest, context: Any
    ) -> pb.ReserveBatchResponse:
        account = account_from_pb(request.account)
        items = [reserve_item_from_pb(it) for it in request.items]
        out = await self.engine.reserve(account, items, batch=True, job_id=request.job_id)
        org = account.organization
        return pb.ReserveBatchResponse(
            holds=[hold_to_pb(org, h) for h in out.holds],
            available_uecu=out.available_uecu,
            replayed=out.replayed,
            quotes=[quote_to_pb(q) if q else pb.Quote() for q in out.quotes],
            job_remaining_uecu=out.job_room_uecu or 0,
        )

    @_handle("Commit")
    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        (out,) = await self.engine.commit(request.organization, [commit_item_from_pb(request)])
        if out.error is not None:
            raise out.error
        return commit_to_pb(out)

    @_handle("CommitBatch")
    async def CommitBatch(
        self, request: pb.CommitBatchRequest, context: Any
    ) -> pb.CommitBatchResponse:
        items = [commit_item_from_pb(it) for it in request.items]
        batch = await self.engine.commit_batch(request.organization, items)
        return pb.CommitBatchResponse(
            results=[self._commit_result(o) for o in batch.outcomes],
            available_uecu=batch.available_uecu,
        )

    def _commit_result(self, o: CommitOutcome) -> pb.CommitResult:
        """One item's result in a CommitBatch answer: its outcome, or its error (counted)."""
        if not isinstance(o.error, errors.EcuError):
            return pb.CommitResult(commit=commit_to_pb(o))
        self.metrics.errors.labels("CommitBatch.item", o.error.reason).inc()
        return pb.CommitResult(
            code=code_for(o.error).value[0],
            message=o.error.message,
            reason=o.error.reason,
            commit=pb.CommitResponse(reservation_id=o.reservation_id),
        )

    @_handle("Release")
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        out = await self.engine.release(request.organization, request.reservation_id)
        return pb.ReleaseResponse(
            reservation_id=out.reservation_id,
            released_uecu=out.released_uecu,
            state=hold_state_to_pb(out.state),
            available_uecu=out.available_uecu,
            replayed=out.replayed,
            degraded=out.degraded,
        )

    @_handle("Extend")
    async def Extend(self, request: pb.ExtendRequest, context: Any) -> pb.ExtendResponse:
        out = await self.engine.extend(
            request.organization, request.reservation_id, request.ttl_ms, request.sequence
        )
        return pb.ExtendResponse(
            reservation_id=out.reservation_id,
            deadline_unix_ms=out.deadline_unix_ms,
            replayed=out.replayed,
        )

    @_handle("GetBalance")
    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Any
    ) -> pb.GetBalanceResponse:
        b = await self.engine.balance(request.organization)
        return pb.GetBalanceResponse(balance=balance_to_pb(b))

    @_handle("Grant")
    async def Grant(self, request: pb.GrantRequest, context: Any) -> pb.GrantResponse:
        self._require_admin(context)
        kind = grant_kind_from_pb(request.kind)
        out = await self.engine.grant(
            request.organization,
            request.grant_id,
            request.amount_uecu,
            kind,
            request.expires_at_unix_ms,
        )
        return pb.GrantResponse(
            grant_id=out.grant_id,
            balance_uecu=out.balance_uecu,
            available_uecu=out.available_uecu,
            replayed=out.replayed,
        )

    @_handle("SetCap")
    async def SetCap(self, request: pb.SetCapRequest, context: Any) -> pb.SetCapResponse:
        self._require_admin(context)
        scope = cap_scope_from_pb(request.scope)
        cap = None if request.clear else request.cap_uecu
        out = await self.engine.set_cap(request.organization, scope, request.id, cap)
        return pb.SetCapResponse(usage=scope_to_pb(out))

    @_handle("SetAutoTopUp")
    async def SetAutoTopUp(
        self, request: pb.SetAutoTopUpRequest, context: Any
    ) -> pb.SetAutoTopUpResponse:
        self._require_admin(context)
        threshold = None if request.disable else request.threshold_uecu
        await self.engine.set_auto_topup(request.organization, threshold, request.amount_uecu)
        return pb.SetAutoTopUpResponse()

    @_handle("Preview")
    async def Preview(self, request: pb.PreviewRequest, context: Any) -> pb.PreviewResponse:
        account = account_from_pb(request.account)
        quote, available, accuracy = await self.engine.preview(account, job_from_pb(request.job))
        total = quote.total_uecu
        return pb.PreviewResponse(
            quote=quote_to_pb(quote),
            covered=available is not None and available >= total,
            available_uecu=available or 0,
            available_after_uecu=(available or 0) - total,
            expected=expected_to_pb(total, accuracy) if accuracy else None,
        )

    @_handle("GetRateCard")
    async def GetRateCard(
        self, request: pb.GetRateCardRequest, context: Any
    ) -> pb.GetRateCardResponse:
        rates = self.engine.rates
        if rates is None:
            raise NoRateCard("no rate card is configured (set ECU_RATE_CARD_FILE)")
        card = rates.current
        # Which organizations negotiated terms is the platform's business, not a worker's: a
        # caller without the admin token learns only about the organization it names.
        with_terms = sorted(card.organizations)
        if not self._is_admin(context):
            org = request.organization
            if org:
                check_org("organization", org, self.engine.settings.allowed_org_set)
            with_terms = [org] if org and org in card.organizations else []
        return pb.GetRateCardResponse(
            version=card.version,
            models=[
                pb.ModelRate(
                    model=m.name,
                    input_uecu_per_mtok=m.input_uecu_per_mtok,
                    output_uecu_per_mtok=m.output_uecu_per_mtok,
                    encoding=m.encoding,
                    context_window=m.context_window,
                    max_output_tokens=m.max_output_tokens,
                    estimate_factor_percent=m.estimate_factor_percent,
                    chat_only=m.chat_only,
                )
                for m in sorted(card.models.values(), key=lambda m: m.name)
            ],
            engine_call_uecu=card.fees.engine_call_uecu,
            judge_call_uecu=card.fees.judge_call_uecu,
            gepa_iteration_uecu=card.fees.gepa_iteration_uecu,
            trace_uecu=card.fees.trace_uecu,
            byok_engine_call_uecu=card.fees.engine_call_uecu
            if card.fees.byok_engine_call_uecu is None
            else card.fees.byok_engine_call_uecu,
            organizations_with_terms=with_terms,
            versions=list(rates.versions()),
        )

    # -- approved jobs: worker RPCs, like Reserve ------------------------------------------------

    @staticmethod
    def _job_response(org: str, view: JobView) -> pb.JobResponse:
        return pb.JobResponse(
            job=job_view_to_pb(org, view),
            available_uecu=view.available_uecu,
            replayed=view.replayed,
        )

    @_handle("ApproveJob")
    async def ApproveJob(self, request: pb.ApproveJobRequest, context: Any) -> pb.JobResponse:
        account = account_from_pb(request.account)
        view = await self.engine.approve_job(account, job_approval_from_pb(request))
        return self._job_response(account.organization, view)

    @_handle("GetJob")
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.JobResponse:
        view = await self.engine.job(request.organization, request.job_id, "get")
        return self._job_response(request.organization, view)

    @_handle("HeartbeatJob")
    async def HeartbeatJob(self, request: pb.HeartbeatJobRequest, context: Any) -> pb.JobResponse:
        view = await self.engine.job(request.organization, request.job_id, "touch")
        return self._job_response(request.organization, view)

    @_handle("CloseJob")
    async def CloseJob(self, request: pb.CloseJobRequest, context: Any) -> pb.JobResponse:
        view = await self.engine.job(request.organization, request.job_id, "close")
        return self._job_response(request.organization, view)
