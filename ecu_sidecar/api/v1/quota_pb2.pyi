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

class UsageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_KIND_UNSPECIFIED: _ClassVar[UsageKind]
    USAGE_KIND_INFERENCE: _ClassVar[UsageKind]
    USAGE_KIND_JUDGE: _ClassVar[UsageKind]
    USAGE_KIND_GEPA_ITERATION: _ClassVar[UsageKind]
    USAGE_KIND_TRACE: _ClassVar[UsageKind]

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

class JobPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_POLICY_UNSPECIFIED: _ClassVar[JobPolicy]
    JOB_POLICY_REFUSE: _ClassVar[JobPolicy]
    JOB_POLICY_WALLET: _ClassVar[JobPolicy]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_OPEN: _ClassVar[JobState]
    JOB_STATE_CLOSED: _ClassVar[JobState]
    JOB_STATE_ABANDONED: _ClassVar[JobState]
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
USAGE_KIND_UNSPECIFIED: UsageKind
USAGE_KIND_INFERENCE: UsageKind
USAGE_KIND_JUDGE: UsageKind
USAGE_KIND_GEPA_ITERATION: UsageKind
USAGE_KIND_TRACE: UsageKind
GRANT_KIND_UNSPECIFIED: GrantKind
GRANT_KIND_STARTER: GrantKind
GRANT_KIND_TOP_UP: GrantKind
GRANT_KIND_AUTO_TOP_UP: GrantKind
GRANT_KIND_ENTERPRISE: GrantKind
GRANT_KIND_ADJUSTMENT: GrantKind
CAP_SCOPE_UNSPECIFIED: CapScope
CAP_SCOPE_TEAM: CapScope
CAP_SCOPE_PROJECT: CapScope
JOB_POLICY_UNSPECIFIED: JobPolicy
JOB_POLICY_REFUSE: JobPolicy
JOB_POLICY_WALLET: JobPolicy
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_OPEN: JobState
JOB_STATE_CLOSED: JobState
JOB_STATE_ABANDONED: JobState

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

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class InferenceSpec(_message.Message):
    __slots__ = ("model", "prompt_text", "messages", "prompt_tokens", "max_output_tokens", "samples", "byok")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYOK_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_text: str
    messages: ChatMessages
    prompt_tokens: int
    max_output_tokens: int
    samples: int
    byok: bool
    def __init__(self, model: _Optional[str] = ..., prompt_text: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., samples: _Optional[int] = ..., byok: _Optional[bool] = ...) -> None: ...

class JudgeSpec(_message.Message):
    __slots__ = ("judge_model", "calls", "prompt_text", "messages", "prompt_tokens_per_call", "max_output_tokens_per_call", "byok", "answer_max_tokens", "answer_of_item")
    JUDGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    BYOK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_OF_ITEM_FIELD_NUMBER: _ClassVar[int]
    judge_model: str
    calls: int
    prompt_text: str
    messages: ChatMessages
    prompt_tokens_per_call: int
    max_output_tokens_per_call: int
    byok: bool
    answer_max_tokens: int
    answer_of_item: int
    def __init__(self, judge_model: _Optional[str] = ..., calls: _Optional[int] = ..., prompt_text: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., prompt_tokens_per_call: _Optional[int] = ..., max_output_tokens_per_call: _Optional[int] = ..., byok: _Optional[bool] = ..., answer_max_tokens: _Optional[int] = ..., answer_of_item: _Optional[int] = ...) -> None: ...

class GepaStep(_message.Message):
    __slots__ = ("inference", "judge")
    INFERENCE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    inference: InferenceSpec
    judge: JudgeSpec
    def __init__(self, inference: _Optional[_Union[InferenceSpec, _Mapping]] = ..., judge: _Optional[_Union[JudgeSpec, _Mapping]] = ...) -> None: ...

class GepaSpec(_message.Message):
    __slots__ = ("iterations", "per_iteration", "prompt_growth_tokens_per_iteration")
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    PER_ITERATION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_GROWTH_TOKENS_PER_ITERATION_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    per_iteration: _containers.RepeatedCompositeFieldContainer[GepaStep]
    prompt_growth_tokens_per_iteration: int
    def __init__(self, iterations: _Optional[int] = ..., per_iteration: _Optional[_Iterable[_Union[GepaStep, _Mapping]]] = ..., prompt_growth_tokens_per_iteration: _Optional[int] = ...) -> None: ...

class TraceEvalSpec(_message.Message):
    __slots__ = ("traces", "judges")
    TRACES_FIELD_NUMBER: _ClassVar[int]
    JUDGES_FIELD_NUMBER: _ClassVar[int]
    traces: int
    judges: _containers.RepeatedCompositeFieldContainer[JudgeSpec]
    def __init__(self, traces: _Optional[int] = ..., judges: _Optional[_Iterable[_Union[JudgeSpec, _Mapping]]] = ...) -> None: ...

class JobItem(_message.Message):
    __slots__ = ("inference", "judge", "gepa", "trace_eval")
    INFERENCE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    GEPA_FIELD_NUMBER: _ClassVar[int]
    TRACE_EVAL_FIELD_NUMBER: _ClassVar[int]
    inference: InferenceSpec
    judge: JudgeSpec
    gepa: GepaSpec
    trace_eval: TraceEvalSpec
    def __init__(self, inference: _Optional[_Union[InferenceSpec, _Mapping]] = ..., judge: _Optional[_Union[JudgeSpec, _Mapping]] = ..., gepa: _Optional[_Union[GepaSpec, _Mapping]] = ..., trace_eval: _Optional[_Union[TraceEvalSpec, _Mapping]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[JobItem]
    def __init__(self, items: _Optional[_Iterable[_Union[JobItem, _Mapping]]] = ...) -> None: ...

class QuoteLine(_message.Message):
    __slots__ = ("description", "quantity", "unit", "rate_uecu", "per", "subtotal_uecu", "model", "job_type", "item", "byok", "negotiated", "gross_uecu", "discount_uecu")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    RATE_UECU_FIELD_NUMBER: _ClassVar[int]
    PER_FIELD_NUMBER: _ClassVar[int]
    SUBTOTAL_UECU_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    BYOK_FIELD_NUMBER: _ClassVar[int]
    NEGOTIATED_FIELD_NUMBER: _ClassVar[int]
    GROSS_UECU_FIELD_NUMBER: _ClassVar[int]
    DISCOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    description: str
    quantity: int
    unit: str
    rate_uecu: int
    per: int
    subtotal_uecu: int
    model: str
    job_type: JobType
    item: str
    byok: bool
    negotiated: bool
    gross_uecu: int
    discount_uecu: int
    def __init__(self, description: _Optional[str] = ..., quantity: _Optional[int] = ..., unit: _Optional[str] = ..., rate_uecu: _Optional[int] = ..., per: _Optional[int] = ..., subtotal_uecu: _Optional[int] = ..., model: _Optional[str] = ..., job_type: _Optional[_Union[JobType, str]] = ..., item: _Optional[str] = ..., byok: _Optional[bool] = ..., negotiated: _Optional[bool] = ..., gross_uecu: _Optional[int] = ..., discount_uecu: _Optional[int] = ...) -> None: ...

class Quote(_message.Message):
    __slots__ = ("total_uecu", "lines", "rate_card_version")
    TOTAL_UECU_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    RATE_CARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    total_uecu: int
    lines: _containers.RepeatedCompositeFieldContainer[QuoteLine]
    rate_card_version: str
    def __init__(self, total_uecu: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[QuoteLine, _Mapping]]] = ..., rate_card_version: _Optional[str] = ...) -> None: ...

class UsageLine(_message.Message):
    __slots__ = ("kind", "model", "tokens_in", "tokens_out", "calls", "byok")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_OUT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    BYOK_FIELD_NUMBER: _ClassVar[int]
    kind: UsageKind
    model: str
    tokens_in: int
    tokens_out: int
    calls: int
    byok: bool
    def __init__(self, kind: _Optional[_Union[UsageKind, str]] = ..., model: _Optional[str] = ..., tokens_in: _Optional[int] = ..., tokens_out: _Optional[int] = ..., calls: _Optional[int] = ..., byok: _Optional[bool] = ...) -> None: ...

class PreviewRequest(_message.Message):
    __slots__ = ("account", "job")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    account: Account
    job: JobSpec
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class PreviewResponse(_message.Message):
    __slots__ = ("quote", "covered", "available_uecu", "available_after_uecu", "expected")
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    COVERED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_AFTER_UECU_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    quote: Quote
    covered: bool
    available_uecu: int
    available_after_uecu: int
    expected: ExpectedCost
    def __init__(self, quote: _Optional[_Union[Quote, _Mapping]] = ..., covered: _Optional[bool] = ..., available_uecu: _Optional[int] = ..., available_after_uecu: _Optional[int] = ..., expected: _Optional[_Union[ExpectedCost, _Mapping]] = ...) -> None: ...

class ExpectedCost(_message.Message):
    __slots__ = ("total_uecu", "jobs", "committed_uecu", "approved_uecu", "job_type")
    TOTAL_UECU_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    APPROVED_UECU_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    total_uecu: int
    jobs: int
    committed_uecu: int
    approved_uecu: int
    job_type: JobType
    def __init__(self, total_uecu: _Optional[int] = ..., jobs: _Optional[int] = ..., committed_uecu: _Optional[int] = ..., approved_uecu: _Optional[int] = ..., job_type: _Optional[_Union[JobType, str]] = ...) -> None: ...

class GetRateCardRequest(_message.Message):
    __slots__ = ("organization",)
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    organization: str
    def __init__(self, organization: _Optional[str] = ...) -> None: ...

class ModelRate(_message.Message):
    __slots__ = ("model", "input_uecu_per_mtok", "output_uecu_per_mtok", "encoding", "context_window", "max_output_tokens", "estimate_factor_percent", "chat_only")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_UECU_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_UECU_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FACTOR_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CHAT_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_uecu_per_mtok: int
    output_uecu_per_mtok: int
    encoding: str
    context_window: int
    max_output_tokens: int
    estimate_factor_percent: int
    chat_only: bool
    def __init__(self, model: _Optional[str] = ..., input_uecu_per_mtok: _Optional[int] = ..., output_uecu_per_mtok: _Optional[int] = ..., encoding: _Optional[str] = ..., context_window: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., estimate_factor_percent: _Optional[int] = ..., chat_only: _Optional[bool] = ...) -> None: ...

class GetRateCardResponse(_message.Message):
    __slots__ = ("version", "models", "engine_call_uecu", "judge_call_uecu", "gepa_iteration_uecu", "trace_uecu", "organizations_with_terms", "versions", "byok_engine_call_uecu")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_CALL_UECU_FIELD_NUMBER: _ClassVar[int]
    JUDGE_CALL_UECU_FIELD_NUMBER: _ClassVar[int]
    GEPA_ITERATION_UECU_FIELD_NUMBER: _ClassVar[int]
    TRACE_UECU_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATIONS_WITH_TERMS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BYOK_ENGINE_CALL_UECU_FIELD_NUMBER: _ClassVar[int]
    version: str
    models: _containers.RepeatedCompositeFieldContainer[ModelRate]
    engine_call_uecu: int
    judge_call_uecu: int
    gepa_iteration_uecu: int
    trace_uecu: int
    organizations_with_terms: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.RepeatedScalarFieldContainer[str]
    byok_engine_call_uecu: int
    def __init__(self, version: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelRate, _Mapping]]] = ..., engine_call_uecu: _Optional[int] = ..., judge_call_uecu: _Optional[int] = ..., gepa_iteration_uecu: _Optional[int] = ..., trace_uecu: _Optional[int] = ..., organizations_with_terms: _Optional[_Iterable[str]] = ..., versions: _Optional[_Iterable[str]] = ..., byok_engine_call_uecu: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("reservation_id", "account", "amount_uecu", "job_type", "model", "ttl_ms", "job", "job_id")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    account: Account
    amount_uecu: int
    job_type: JobType
    model: str
    ttl_ms: int
    job: JobSpec
    job_id: str
    def __init__(self, reservation_id: _Optional[str] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., amount_uecu: _Optional[int] = ..., job_type: _Optional[_Union[JobType, str]] = ..., model: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("hold", "available_uecu", "replayed", "quote", "degraded", "job_remaining_uecu")
    HOLD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    JOB_REMAINING_UECU_FIELD_NUMBER: _ClassVar[int]
    hold: Hold
    available_uecu: int
    replayed: bool
    quote: Quote
    degraded: bool
    job_remaining_uecu: int
    def __init__(self, hold: _Optional[_Union[Hold, _Mapping]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ..., quote: _Optional[_Union[Quote, _Mapping]] = ..., degraded: _Optional[bool] = ..., job_remaining_uecu: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "organization", "actual_uecu", "usage", "usage_lines", "rate_card_version")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_UECU_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_LINES_FIELD_NUMBER: _ClassVar[int]
    RATE_CARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    actual_uecu: int
    usage: Usage
    usage_lines: _containers.RepeatedCompositeFieldContainer[UsageLine]
    rate_card_version: str
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ..., actual_uecu: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., usage_lines: _Optional[_Iterable[_Union[UsageLine, _Mapping]]] = ..., rate_card_version: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("reservation_id", "committed_uecu", "released_uecu", "overage_uecu", "unbilled_overage_uecu", "late", "available_uecu", "replayed", "quote", "degraded")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UECU_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    UNBILLED_OVERAGE_UECU_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    committed_uecu: int
    released_uecu: int
    overage_uecu: int
    unbilled_overage_uecu: int
    late: bool
    available_uecu: int
    replayed: bool
    quote: Quote
    degraded: bool
    def __init__(self, reservation_id: _Optional[str] = ..., committed_uecu: _Optional[int] = ..., released_uecu: _Optional[int] = ..., overage_uecu: _Optional[int] = ..., unbilled_overage_uecu: _Optional[int] = ..., late: _Optional[bool] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ..., quote: _Optional[_Union[Quote, _Mapping]] = ..., degraded: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id", "organization")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    organization: str
    def __init__(self, reservation_id: _Optional[str] = ..., organization: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("reservation_id", "released_uecu", "state", "available_uecu", "replayed", "degraded")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASED_UECU_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    released_uecu: int
    state: HoldState
    available_uecu: int
    replayed: bool
    degraded: bool
    def __init__(self, reservation_id: _Optional[str] = ..., released_uecu: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ..., degraded: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("reservation_id", "amount_uecu", "job_type", "model", "ttl_ms", "job")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    amount_uecu: int
    job_type: JobType
    model: str
    ttl_ms: int
    job: JobSpec
    def __init__(self, reservation_id: _Optional[str] = ..., amount_uecu: _Optional[int] = ..., job_type: _Optional[_Union[JobType, str]] = ..., model: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class ReserveBatchRequest(_message.Message):
    __slots__ = ("account", "items", "job_id")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    account: Account
    items: _containers.RepeatedCompositeFieldContainer[ReserveItem]
    job_id: str
    def __init__(self, account: _Optional[_Union[Account, _Mapping]] = ..., items: _Optional[_Iterable[_Union[ReserveItem, _Mapping]]] = ..., job_id: _Optional[str] = ...) -> None: ...

class ReserveBatchResponse(_message.Message):
    __slots__ = ("holds", "available_uecu", "replayed", "quotes", "job_remaining_uecu")
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    QUOTES_FIELD_NUMBER: _ClassVar[int]
    JOB_REMAINING_UECU_FIELD_NUMBER: _ClassVar[int]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    available_uecu: int
    replayed: bool
    quotes: _containers.RepeatedCompositeFieldContainer[Quote]
    job_remaining_uecu: int
    def __init__(self, holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ..., quotes: _Optional[_Iterable[_Union[Quote, _Mapping]]] = ..., job_remaining_uecu: _Optional[int] = ...) -> None: ...

class CommitItem(_message.Message):
    __slots__ = ("reservation_id", "actual_uecu", "usage", "usage_lines", "rate_card_version")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_UECU_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_LINES_FIELD_NUMBER: _ClassVar[int]
    RATE_CARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    actual_uecu: int
    usage: Usage
    usage_lines: _containers.RepeatedCompositeFieldContainer[UsageLine]
    rate_card_version: str
    def __init__(self, reservation_id: _Optional[str] = ..., actual_uecu: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., usage_lines: _Optional[_Iterable[_Union[UsageLine, _Mapping]]] = ..., rate_card_version: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("organization", "granted_uecu", "balance_uecu", "held_uecu", "available_uecu", "committed_uecu", "reserved_uecu", "committed_from_holds_uecu", "released_uecu", "expired_uecu", "overage_uecu", "unbilled_overage_uecu", "late_committed_uecu", "outstanding_holds", "expired_holds", "teams", "projects", "expired_grants_uecu", "orphan_committed_uecu", "carried_committed_uecu", "repaired_uecu", "has_auto_topup", "auto_topup_threshold_uecu", "auto_topup_amount_uecu", "late_unbilled_uecu")
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
    EXPIRED_GRANTS_UECU_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    CARRIED_COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_UECU_FIELD_NUMBER: _ClassVar[int]
    HAS_AUTO_TOPUP_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOPUP_THRESHOLD_UECU_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOPUP_AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    LATE_UNBILLED_UECU_FIELD_NUMBER: _ClassVar[int]
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
    expired_grants_uecu: int
    orphan_committed_uecu: int
    carried_committed_uecu: int
    repaired_uecu: int
    has_auto_topup: bool
    auto_topup_threshold_uecu: int
    auto_topup_amount_uecu: int
    late_unbilled_uecu: int
    def __init__(self, organization: _Optional[str] = ..., granted_uecu: _Optional[int] = ..., balance_uecu: _Optional[int] = ..., held_uecu: _Optional[int] = ..., available_uecu: _Optional[int] = ..., committed_uecu: _Optional[int] = ..., reserved_uecu: _Optional[int] = ..., committed_from_holds_uecu: _Optional[int] = ..., released_uecu: _Optional[int] = ..., expired_uecu: _Optional[int] = ..., overage_uecu: _Optional[int] = ..., unbilled_overage_uecu: _Optional[int] = ..., late_committed_uecu: _Optional[int] = ..., outstanding_holds: _Optional[int] = ..., expired_holds: _Optional[int] = ..., teams: _Optional[_Iterable[_Union[ScopeUsage, _Mapping]]] = ..., projects: _Optional[_Iterable[_Union[ScopeUsage, _Mapping]]] = ..., expired_grants_uecu: _Optional[int] = ..., orphan_committed_uecu: _Optional[int] = ..., carried_committed_uecu: _Optional[int] = ..., repaired_uecu: _Optional[int] = ..., has_auto_topup: _Optional[bool] = ..., auto_topup_threshold_uecu: _Optional[int] = ..., auto_topup_amount_uecu: _Optional[int] = ..., late_unbilled_uecu: _Optional[int] = ...) -> None: ...

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

class SetAutoTopUpRequest(_message.Message):
    __slots__ = ("organization", "threshold_uecu", "amount_uecu", "disable")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_UECU_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_UECU_FIELD_NUMBER: _ClassVar[int]
    DISABLE_FIELD_NUMBER: _ClassVar[int]
    organization: str
    threshold_uecu: int
    amount_uecu: int
    disable: bool
    def __init__(self, organization: _Optional[str] = ..., threshold_uecu: _Optional[int] = ..., amount_uecu: _Optional[int] = ..., disable: _Optional[bool] = ...) -> None: ...

class SetAutoTopUpResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "organization", "state", "approved_uecu", "drawn_uecu", "committed_uecu", "held_uecu", "remaining_uecu", "extra_uecu", "extra_max_uecu", "steps", "steps_committed", "steps_ended", "policy", "team", "project", "user", "job_type", "rate_card_version", "ttl_ms", "deadline_unix_ms", "opened_at_unix_ms", "ended_at_unix_ms", "returned_uecu")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVED_UECU_FIELD_NUMBER: _ClassVar[int]
    DRAWN_UECU_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UECU_FIELD_NUMBER: _ClassVar[int]
    HELD_UECU_FIELD_NUMBER: _ClassVar[int]
    REMAINING_UECU_FIELD_NUMBER: _ClassVar[int]
    EXTRA_UECU_FIELD_NUMBER: _ClassVar[int]
    EXTRA_MAX_UECU_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    STEPS_ENDED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    RATE_CARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RETURNED_UECU_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    organization: str
    state: JobState
    approved_uecu: int
    drawn_uecu: int
    committed_uecu: int
    held_uecu: int
    remaining_uecu: int
    extra_uecu: int
    extra_max_uecu: int
    steps: int
    steps_committed: int
    steps_ended: int
    policy: JobPolicy
    team: str
    project: str
    user: str
    job_type: JobType
    rate_card_version: str
    ttl_ms: int
    deadline_unix_ms: int
    opened_at_unix_ms: int
    ended_at_unix_ms: int
    returned_uecu: int
    def __init__(self, job_id: _Optional[str] = ..., organization: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., approved_uecu: _Optional[int] = ..., drawn_uecu: _Optional[int] = ..., committed_uecu: _Optional[int] = ..., held_uecu: _Optional[int] = ..., remaining_uecu: _Optional[int] = ..., extra_uecu: _Optional[int] = ..., extra_max_uecu: _Optional[int] = ..., steps: _Optional[int] = ..., steps_committed: _Optional[int] = ..., steps_ended: _Optional[int] = ..., policy: _Optional[_Union[JobPolicy, str]] = ..., team: _Optional[str] = ..., project: _Optional[str] = ..., user: _Optional[str] = ..., job_type: _Optional[_Union[JobType, str]] = ..., rate_card_version: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., opened_at_unix_ms: _Optional[int] = ..., ended_at_unix_ms: _Optional[int] = ..., returned_uecu: _Optional[int] = ...) -> None: ...

class ApproveJobRequest(_message.Message):
    __slots__ = ("job_id", "account", "job", "approved_total_uecu", "rate_card_version", "job_type", "policy", "ttl_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    APPROVED_TOTAL_UECU_FIELD_NUMBER: _ClassVar[int]
    RATE_CARD_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_TYPE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    account: Account
    job: JobSpec
    approved_total_uecu: int
    rate_card_version: str
    job_type: JobType
    policy: JobPolicy
    ttl_ms: int
    def __init__(self, job_id: _Optional[str] = ..., account: _Optional[_Union[Account, _Mapping]] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., approved_total_uecu: _Optional[int] = ..., rate_card_version: _Optional[str] = ..., job_type: _Optional[_Union[JobType, str]] = ..., policy: _Optional[_Union[JobPolicy, str]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class JobResponse(_message.Message):
    __slots__ = ("job", "available_uecu", "replayed")
    JOB_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UECU_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    job: Job
    available_uecu: int
    replayed: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., available_uecu: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("organization", "job_id")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    organization: str
    job_id: str
    def __init__(self, organization: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class HeartbeatJobRequest(_message.Message):
    __slots__ = ("organization", "job_id")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    organization: str
    job_id: str
    def __init__(self, organization: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class CloseJobRequest(_message.Message):
    __slots__ = ("organization", "job_id")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    organization: str
    job_id: str
    def __init__(self, organization: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...
