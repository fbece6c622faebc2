"""The client's errors: one root, ``QuotaError``, and one subclass per status a worker acts on.

Each is read from the gRPC status and its google.rpc details (ErrorInfo for the reason and its
metadata, BadRequest for the offending field). Errors the client finds itself, before anything
is sent, are shaped like the sidecar's own (``invalid``).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "Conflict",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InsufficientEcu",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QuotaError",
    "Unavailable",
    "code_of",
    "error_for",
    "error_from_rpc",
    "invalid",
]


class QuotaError(Exception):
    """Root of every error the client raises: a gRPC status with its google.rpc details."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        """The gRPC status code."""
        self.reason = reason or code.name
        """The google.rpc ErrorInfo reason (e.g. INSUFFICIENT_ECU); the code's name if none."""
        self.metadata: dict[str, str] = dict(metadata or {})
        """The ErrorInfo metadata (e.g. requested/available for INSUFFICIENT_ECU)."""
        self.attempts = attempts
        """How many attempts were made before giving up."""
        self._field = field

    def __str__(self) -> str:
        if self.reason == self.code.name:
            return f"{self.code.name}: {self.message}"
        return f"{self.code.name} {self.reason}: {self.message}"


class InvalidArgument(QuotaError):
    """A request value is malformed or out of range; nothing was changed."""

    @property
    def field(self) -> str:
        """The offending request field (proto path, e.g. ``items[2].amount_uecu``)."""
        return self._field or self.metadata.get("field", "")


class InsufficientEcu(QuotaError):
    """RESOURCE_EXHAUSTED: the organization, or a team/project cap, cannot cover the hold."""

    def _int(self, key: str) -> int | None:
        value = self.metadata.get(key)
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def available_uecu(self) -> int | None:
        """What the limiting scope had available."""
        return self._int("available")

    @property
    def requested_uecu(self) -> int | None:
        """What the refused request asked for."""
        return self._int("requested")


class NotFound(QuotaError):
    """NOT_FOUND: no such organization account, hold or job (JOB_NOT_FOUND)."""


class FailedPrecondition(QuotaError):
    """FAILED_PRECONDITION: the hold is committed, released or expired; or the rate card
    version named is not loaded (RATE_CARD_VERSION_UNKNOWN) or not the hold's
    (RATE_CARD_MISMATCH); or no rate card is configured (RATE_CARD_UNAVAILABLE); or the job
    ended (JOB_CLOSED), a step named another team or project (JOB_SCOPE_MISMATCH), or the
    approved quote's rate card is no longer current (QUOTE_STALE: ``metadata`` carries the
    re-quote, ``total_uecu`` under ``rate_card_version``)."""


class Conflict(QuotaError):
    """ALREADY_EXISTS or ABORTED: a caller id reused with other parameters, a stale sequence."""


class OutOfRange(QuotaError):
    """OUT_OF_RANGE: a grant would take an account past its largest total, or one step needs
    more than its job may ever hold (STEP_EXCEEDS_APPROVAL)."""


class PermissionDenied(QuotaError):
    """PERMISSION_DENIED or UNAUTHENTICATED: admin RPCs without the right token."""


class Unavailable(QuotaError):
    """UNAVAILABLE: the sidecar (or its store) could not answer; retried before raising."""


class DeadlineExceeded(Unavailable):
    """DEADLINE_EXCEEDED: no answer within the per-call deadline; retried before raising."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[QuotaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InsufficientEcu,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_for(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    field: str = "",
    attempts: int = 1,
) -> QuotaError:
    """The error of ``code``'s class (``QuotaError`` itself for a code without one)."""
    cls = _ERROR_BY_CODE.get(code, QuotaError)
    return cls(message, code=code, reason=reason, metadata=metadata, field=field, attempts=attempts)


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    """A failed RPC's status code (UNKNOWN when it carries none)."""
    # grpc.aio's AioRpcError is no grpc.Call, but both carry code(), details() and metadata.
    code = getattr(exc, "code", None)
    return code() if callable(code) else grpc.StatusCode.UNKNOWN


def error_from_rpc(exc: grpc.RpcError, attempts: int = 1) -> QuotaError:
    """The client error for a failed RPC, reason and metadata read from its status details."""
    code = code_of(exc)
    details = getattr(exc, "details", None)
    message = (details() if callable(details) else "") or ""
    reason, metadata, field = "", {}, ""
    try:
        status = rpc_status.from_call(exc)
    except (AttributeError, ValueError):  # not a call, or details contradicting the code
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
    return error_for(code, message, reason, metadata, field, attempts)


def invalid(field: str, description: str) -> InvalidArgument:
    """A client-side InvalidArgument, shaped like the sidecar's own."""
    return InvalidArgument(
        f"{field}: {description}",
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason="INVALID_ARGUMENT",
        metadata={"field": field},
        field=field,
    )
