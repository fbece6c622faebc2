"""Domain errors to gRPC status: the one table, and the google.rpc details each carries.

Every error carries an ``ErrorInfo`` (reason, domain ``ecu-sidecar``, metadata). Invalid input
adds a ``BadRequest`` naming the field; insufficient ECU adds a ``QuotaFailure`` whose subject
names the scope and whose description states requested and available µECU.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ecu_sidecar import errors
from ecu_sidecar.pricing.registry import NoRateCard, UnknownRateCardVersion

__all__ = ["DOMAIN", "STATUS_BY_ERROR", "code_for", "to_grpc_status", "to_rpc_status"]

DOMAIN = "ecu-sidecar"

#: The mapping. Every EcuError subclass appears here; tests check the table is complete.
STATUS_BY_ERROR: dict[type[errors.EcuError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UndecodableRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientEcu: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.HoldNotFound: grpc.StatusCode.NOT_FOUND,
    errors.HoldCommitted: grpc.StatusCode.FAILED_PRECONDITION,
    errors.HoldReleased: grpc.StatusCode.FAILED_PRECONDITION,
    errors.HoldExpired: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.StaleSequence: grpc.StatusCode.ABORTED,
    errors.BalanceLimit: grpc.StatusCode.OUT_OF_RANGE,
    errors.GrantAlreadyExpired: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RateCardMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.JobClosed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.JobScopeMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StepExceedsApproval: grpc.StatusCode.OUT_OF_RANGE,
    errors.QuoteStale: grpc.StatusCode.FAILED_PRECONDITION,
    errors.QuoteMismatch: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownRateCardVersion: grpc.StatusCode.FAILED_PRECONDITION,
    NoRateCard: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ReplicationUnconfirmed: grpc.StatusCode.UNAVAILABLE,
    errors.Rebuilding: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.AdminDisabled: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.OrganizationNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
}


def code_for(error: errors.EcuError) -> grpc.StatusCode:
    """The status code of a domain error (or of its nearest mapped base class, e.g. the
    ledger's GrantConflict is an IdempotencyConflict)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    raise KeyError(f"{type(error).__name__} has no gRPC status")


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(error: errors.EcuError) -> status_pb2.Status:
    """The google.rpc.Status of a domain error, details included."""
    code = code_for(error)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if isinstance(error, errors.InvalidArgument) and hasattr(error, "field"):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=error.description
                        )
                    ]
                )
            )
        )
    elif isinstance(error, errors.InsufficientEcu):
        meta = error.metadata
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=f"{meta.get('scope')}:{meta.get('scope_id')}",
                            description=(
                                f"requested {meta.get('requested')} uECU, "
                                f"available {meta.get('available')} uECU"
                            ),
                        )
                    ]
                )
            )
        )
    return status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )


def to_grpc_status(error: errors.EcuError) -> grpc.Status:
    """The grpc.Status (code, message, trailing metadata with details) for context.abort."""
    return rpc_status.to_status(to_rpc_status(error))
