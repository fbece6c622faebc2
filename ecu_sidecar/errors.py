"""Domain errors: one root type, one subclass per outcome a caller can act on.

Each error carries a machine-readable ``reason`` (the google.rpc ErrorInfo reason) and
``metadata``. The mapping to gRPC status codes lives in one table, in ecu_sidecar.status.
"""

from __future__ import annotations

__all__ = [
    "AccountNotFound",
    "AdminDisabled",
    "BalanceLimit",
    "EcuError",
    "GrantAlreadyExpired",
    "HoldCommitted",
    "HoldExpired",
    "HoldNotFound",
    "HoldReleased",
    "IdempotencyConflict",
    "InsufficientEcu",
    "InvalidArgument",
    "JobClosed",
    "JobNotFound",
    "JobScopeMismatch",
    "OrganizationNotAllowed",
    "Overloaded",
    "PermissionDenied",
    "QuoteMismatch",
    "QuoteStale",
    "RateCardMismatch",
    "Rebuilding",
    "ReplicationUnconfirmed",
    "StaleSequence",
    "StepExceedsApproval",
    "StoreUnavailable",
    "Unauthenticated",
    "UndecodableRequest",
]


class EcuError(Exception):
    """Root of every error the sidecar reports to a caller."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(EcuError):
    """A request field is malformed or out of range; nothing was changed."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}", field=field)
        self.field = field
        self.description = description


class UndecodableRequest(InvalidArgument):
    """The request body does not parse as the RPC's protobuf message (truncated or corrupt
    bytes, a string field that is not UTF-8); nothing was read from it, nothing was changed.

    The BadRequest violation names the whole body (field ``""``); the ErrorInfo metadata names
    the ``rpc`` and the ``message_type`` expected."""

    def __init__(self, rpc: str, message_type: str, cause: str) -> None:
        description = f"the request body is not a valid {message_type}: {cause}"
        EcuError.__init__(self, f"{rpc}: {description}", rpc=rpc, message_type=message_type)
        self.field = ""
        self.description = description


class InsufficientEcu(EcuError):
    """The organization (or a team/project cap) cannot cover the requested hold."""

    reason = "INSUFFICIENT_ECU"


class AccountNotFound(EcuError):
    """The organization has no ECU account (it was never granted anything)."""

    reason = "ACCOUNT_NOT_FOUND"


class HoldNotFound(EcuError):
    """No hold with that reservation id exists (never made, or its tombstone was purged)."""

    reason = "HOLD_NOT_FOUND"


class HoldCommitted(EcuError):
    """The hold was already committed; it cannot be released or extended."""

    reason = "HOLD_COMMITTED"


class HoldReleased(EcuError):
    """The hold was released; it cannot be committed or extended."""

    reason = "HOLD_RELEASED"


class HoldExpired(EcuError):
    """The hold's deadline passed; it cannot be extended."""

    reason = "HOLD_EXPIRED"


class IdempotencyConflict(EcuError):
    """A caller id was reused with different parameters."""

    reason = "IDEMPOTENCY_CONFLICT"


class StaleSequence(EcuError):
    """An extend carried a sequence number older than one already applied."""

    reason = "STALE_SEQUENCE"


class BalanceLimit(EcuError):
    """A grant would take an account past the largest total it may hold."""

    reason = "BALANCE_LIMIT"


class GrantAlreadyExpired(EcuError):
    """A grant's expiry is not after the current time."""

    reason = "GRANT_ALREADY_EXPIRED"


class RateCardMismatch(EcuError):
    """Usage was priced with another rate card version than the hold pinned."""

    reason = "RATE_CARD_MISMATCH"


class JobNotFound(EcuError):
    """No approved job with that id in the organization (never approved, approved for another
    organization, or purged after its retention)."""

    reason = "JOB_NOT_FOUND"


class JobClosed(EcuError):
    """The job was closed or abandoned: its steps and heartbeats are refused."""

    reason = "JOB_CLOSED"


class JobScopeMismatch(EcuError):
    """A step named another team or project than its job was approved for."""

    reason = "JOB_SCOPE_MISMATCH"


class StepExceedsApproval(EcuError):
    """One step needs more than its job may ever hold (approval plus extra max)."""

    reason = "STEP_EXCEEDS_APPROVAL"


class QuoteStale(EcuError):
    """The approved quote was priced with a rate card version that is no longer current: the
    metadata carries the current version and the job's total under it (a re-quote to show the
    user); nothing was held."""

    reason = "QUOTE_STALE"


class QuoteMismatch(EcuError):
    """The approved total is not what the job spec costs under the approved version."""

    reason = "QUOTE_MISMATCH"


class StoreUnavailable(EcuError):
    """Redis did not answer within the configured timeout, or refused the connection."""

    reason = "STORE_UNAVAILABLE"


class ReplicationUnconfirmed(StoreUnavailable):
    """The primary ran the write, but fewer replicas than ECU_REDIS_WAIT_REPLICAS acknowledged
    it within ECU_REDIS_WAIT_TIMEOUT_MS: it may be lost in a failover. The outcome is unknown;
    a retry with the same id is answered as a replay when the write survived."""

    reason = "REPLICATION_UNCONFIRMED"


class Rebuilding(StoreUnavailable):
    """The organization is being rebuilt from the ledger after Redis lost part of its history
    (a failover to a lagging replica): nothing changed; a retry with the same id after
    ``retry_after_ms`` is served."""

    reason = "REBUILDING"


class Overloaded(EcuError):
    """The sidecar is already answering ECU_MAX_CONCURRENT_RPCS calls: this one did nothing;
    a retry after ``retry_after_ms`` is served."""

    reason = "OVERLOADED"


class AdminDisabled(EcuError):
    """Admin RPCs are off because no admin token is configured."""

    reason = "ADMIN_DISABLED"


class Unauthenticated(EcuError):
    """An admin RPC arrived without a bearer token."""

    reason = "UNAUTHENTICATED"


class OrganizationNotAllowed(EcuError):
    """This sidecar is pinned (ECU_ALLOWED_ORGS) to organizations that do not include this one."""

    reason = "ORGANIZATION_NOT_ALLOWED"


class PermissionDenied(EcuError):
    """An admin RPC arrived with the wrong token."""

    reason = "PERMISSION_DENIED"


#: Script error reasons (returned by the Lua scripts) to the exception raised for them.
BY_REASON: dict[str, type[EcuError]] = {
    cls.reason: cls
    for cls in (
        InsufficientEcu,
        AccountNotFound,
        HoldNotFound,
        HoldCommitted,
        HoldReleased,
        HoldExpired,
        IdempotencyConflict,
        StaleSequence,
        BalanceLimit,
        GrantAlreadyExpired,
        RateCardMismatch,
        Rebuilding,
        JobNotFound,
        JobClosed,
        JobScopeMismatch,
        StepExceedsApproval,
    )
}
