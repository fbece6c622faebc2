from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_TYPE_UNSPECIFIED: _ClassVar[JobType]
    JOB_TYPE_INFERENCE: _ClassVar[JobType]
    JOB_TYPE_JUDGE: _ClassVar[JobType]
    JOB_TYPE_GEPA: _ClassVar[JobType]
    JOB_TYPE_TRACE_EVAL: _ClassVar[JobType]
    JOB_TYPE_ENGINE: _ClassVar[JobType]

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_ACTIVE: _ClassVar[HoldState]
    HOLD_STATE_COMMITTED: _ClassVar[HoldState]
    HOLD_STATE_RELEASED: _ClassVar[HoldState]
    HOLD_STATE_EXPIRED: _ClassVar[HoldState]

class GrantKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANT_KIND_UNSPECIFIED: _ClassVar[GrantKind]
    GRANT_KIND_STARTER: _ClassVar[GrantKind]
    GRANT_KIND_TOP_UP: _ClassVar[GrantKind]
    GRANT_KIND_AUTO_TOP_UP: _ClassVar[GrantKind]
    GRANT_KIND_ENTERPRISE: _ClassVar[GrantKind]
    GRANT_KIND_ADJUSTMENT: _ClassVar[GrantKind]

class CapScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAP_SCOPE_UNSPECIFIED: _ClassVar[CapScope]
    CAP_SCOPE_TEAM: _ClassVar[CapScope]
    CAP_SCOPE_PROJECT: _ClassVar[CapScope]
JOB_TYPE_UNSPECIFIED: JobType
JOB_TYPE_INFERENCE: JobType
JOB_TYPE_JUDGE: JobType
JOB_TYPE_GEPA: JobType
JOB_TYPE_TRACE_EVAL: JobType
JOB_TYPE_ENGINE: JobType
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_ACTIVE: HoldState
HOLD_STATE_COMMITTED: HoldState
HOLD_STATE_RELEASED: HoldState
HOLD_STATE_EXPIRED: HoldState
GRANT_KIND_UNSPECIFIED: GrantKind
GRANT_KIND_STARTER: GrantKind
GRANT_KIND_TOP_UP: GrantKind
GRANT_KIND_AUTO_TOP_UP: GrantKind
GRANT_KIND_ENTERPRISE: GrantKind
GRANT_KIND_ADJUSTMENT: GrantKind
CAP_SCOPE_UNSPECIFIED: CapScope
CAP_SCOPE_TEAM: CapScope
CAP_SCOPE_PROJECT: CapScope

class Account(_message.Message):
    __slots__ = ("organization", "team", "project", "user")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    organization: str
    team: str
    project: str
    user: str
    def __init__(self, organization: _Optional[str] = ..., team: _Optional[str] = ..., project: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tokens_in", "tokens_out", "calls")
    TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_OUT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    tokens_in: int
    tokens_out: int
    calls: int
    def __init__(self, tokens_in: _Optional[int] = ..., tokens_out: _Optional[int] = ..., calls: _Optional[int] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("reservation_id", "organization", "amount_uecu", "deadline_unix_ms", "state")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    amount_uecu: int
    deadline_unix_ms: int
    state: HoldState
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ..., amount_uecu: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("reservation_id", "account", "amount_uecu", "job_type", "model", "ttl_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    account: Account
    amount_uecu: int
    job_type: JobType
    model: str
    ttl_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., amount_uecu: _Optional[int] = ..., job_type: _Optional[_Union[JobType, str]] = ..., model: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("hold", "available_uecu", "replayed")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    available_uecu: int
    replayed: bool
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "organization", "actual_uecu", "usage")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_UECU_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    actual_uecu: int
    usage: Usage
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ..., actual_uecu: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("reservation_id", "committed_uecu", "released_uecu", "overage_uecu", "unbilled_overage_uecu", "late", "available_uecu", "replayed")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UECU_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    UNBILLED_OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    committed_uecu: int
    released_uecu: int
    overage_uecu: int
    unbilled_overage_uecu: int
    late: bool
    available_uecu: int
    replayed: bool
    def __init__(self, reservation_id: _Optional[str] = ..., committed_uecu: _Optional[int] = ..., released_uecu: _Optional[int] = ..., overage_uecu: _Optional[int] = ..., unbilled_overage_uecu: _Optional[int] = ..., late: _Optional[bool] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id", "organization")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("reservation_id", "released_uecu", "state", "available_uecu", "replayed")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UECU_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    released_uecu: int
    state: HoldState
    available_uecu: int
    replayed: bool
    def __init__(self, reservation_id: _Optional[str] = ..., released_uecu: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("reservation_id", "organization", "ttl_ms", "sequence")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    ttl_ms: int
    sequence: int
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("reservation_id", "deadline_unix_ms", "replayed")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    deadline_unix_ms: int
    replayed: bool
    def __init__(self, reservation_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReserveItem(_message.Message):
    __slots__ = ("reservation_id", "amount_uecu", "job_type", "model", "ttl_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    amount_uecu: int
    job_type: JobType
    model: str
    ttl_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., amount_uecu: _Optional[int] = ..., job_type: _Optional[_Union[JobType, str]] = ..., model: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ReserveBatchRequest(_message.Message):
    __slots__ = ("account", "items")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    account: Account
    items: _containers.RepeatedCompositeFieldContainer[ReserveItem]
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., items: _Optional[_Iterable[_Union[ReserveItem, _Mapping]]] = ...) -> None: ...

class ReserveBatchResponse(_message.Message):
    __slots__ = ("holds", "available_uecu", "replayed")
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    available_uecu: int
    replayed: bool
    def __init__(self, holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class CommitItem(_message.Message):
    __slots__ = ("reservation_id", "actual_uecu", "usage")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_UECU_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual_uecu: int
    usage: Usage
    def __init__(self, reservation_id: _Optional[str] = ..., actual_uecu: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class CommitBatchRequest(_message.Message):
    __slots__ = ("organization", "items")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    organization: str
    items: _containers.RepeatedCompositeFieldContainer[CommitItem]
    def __init__(self, organization: _Optional[str] = ..., items: _Optional[_Iterable[_Union[CommitItem, _Mapping]]] = ...) -> None: ...

class CommitResult(_message.Message):
    __slots__ = ("code", "message", "reason", "commit")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    commit: CommitResponse
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., commit: _Optional[_Union[CommitResponse, _Mapping]] = ...) -> None: ...

class CommitBatchResponse(_message.Message):
    __slots__ = ("results", "available_uecu")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CommitResult]
    available_uecu: int
    def __init__(self, results: _Optional[_Iterable[_Union[CommitResult, _Mapping]]] = ..., available_uecu: _Optional[int] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("organization",)
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    organization: str
    def __init__(self, organization: _Optional[str] = ...) -> None: ...

class ScopeUsage(_message.Message):
    __slots__ = ("id", "has_cap", "cap_uecu", "held_uecu", "used_uecu", "available_uecu")
    ID_FIELD_NUMBER: _ClassVar[int]
    HAS_CAP_FIELD_NUMBER: _ClassVar[int]
    CAP_UECU_FIELD_NUMBER: _ClassVar[int]
    HELD_UECU_FIELD_NUMBER: _ClassVar[int]
    USED_UECU_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    id: str
    has_cap: bool
    cap_uecu: int
    held_uecu: int
    used_uecu: int
    available_uecu: int
    def __init__(self, id: _Optional[str] = ..., has_cap: _Optional[bool] = ..., cap_uecu: _Optional[int] = ..., held_uecu: _Optional[int] = ..., used_uecu: _Optional[int] = ..., available_uecu: _Optional[int] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("organization", "granted_uecu", "balance_uecu", "held_uecu", "available_uecu", "committed_uecu", "reserved_uecu", "committed_from_holds_uecu", "released_uecu", "expired_uecu", "overage_uecu", "unbilled_overage_uecu", "late_committed_uecu", "outstanding_holds", "expired_holds", "teams", "projects")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    GRANTED_UECU_FIELD_NUMBER: _ClassVar[int]
    BALANCE_UECU_FIELD_NUMBER: _ClassVar[int]
    HELD_UECU_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    RESERVED_UECU_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FROM_HOLDS_UECU_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UECU_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_UECU_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    UNBILLED_OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    LATE_COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_HOLDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_HOLDS_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    PROJECTS_FIELD_NUMBER: _ClassVar[int]
    organization: str
    granted_uecu: int
    balance_uecu: int
    held_uecu: int
    available_uecu: int
    committed_uecu: int
    reserved_uecu: int
    committed_from_holds_uecu: int
    released_uecu: int
    expired_uecu: int
    overage_uecu: int
    unbilled_overage_uecu: int
    late_committed_uecu: int
    outstanding_holds: int
    expired_holds: int
    teams: _containers.RepeatedCompositeFieldContainer[ScopeUsage]
    projects: _containers.RepeatedCompositeFieldContainer[ScopeUsage]
    def __init__(self, organization: _Optional[str] = ..., granted_uecu: _Optional[int] = ..., balance_uecu: _Optional[int] = ..., held_uecu: _Optional[int] = ..., available_uecu: _Optional[int] = ..., committed_uecu: _Optional[int] = ..., reserved_uecu: _Optional[int] = ..., committed_from_holds_uecu: _Optional[int] = ..., released_uecu: _Optional[int] = ..., expired_uecu: _Optional[int] = ..., overage_uecu: _Optional[int] = ..., unbilled_overage_uecu: _Optional[int] = ..., late_committed_uecu: _Optional[int] = ..., outstanding_holds: _Optional[int] = ..., expired_holds: _Optional[int] = ..., teams: _Optional[_Iterable[_Union[ScopeUsage, _Mapping]]] = ..., projects: _Optional[_Iterable[_Union[ScopeUsage, _Mapping]]] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("balance",)
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    balance: Balance
    def __init__(self, balance: _Optional[_Union[Balance, _Mapping]] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("grant_id", "organization", "amount_uecu", "kind", "expires_at_unix_ms")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    organization: str
    amount_uecu: int
    kind: GrantKind
    expires_at_unix_ms: int
    def __init__(self, grant_id: _Optional[str] = ..., organization: _Optional[str] = ..., amount_uecu: _Optional[int] = ..., kind: _Optional[_Union[GrantKind, str]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("grant_id", "balance_uecu", "available_uecu", "replayed")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_UECU_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    balance_uecu: int
    available_uecu: int
    replayed: bool
    def __init__(self, grant_id: _Optional[str] = ..., balance_uecu: _Optional[int] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SetCapRequest(_message.Message):
    __slots__ = ("organization", "scope", "id", "cap_uecu", "clear")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    CAP_UECU_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    organization: str
    scope: CapScope
    id: str
    cap_uecu: int
    clear: bool
    def __init__(self, organization: _Optional[str] = ..., scope: _Optional[_Union[CapScope, str]] = ..., id: _Optional[str] = ..., cap_uecu: _Optional[int] = ..., clear: _Optional[bool] = ...) -> None: ...

class SetCapResponse(_message.Message):
    __slots__ = ("usage",)
    USAGE_FIELD_NUMBER: _ClassVar[int]
    usage: ScopeUsage
    def __init__(self, usage: _Optional[_Union[ScopeUsage, _Mapping]] = ...) -> None: ...
