"""Pricing: the worst-case quote of a job spec, and the price of what a job really used.

Integer arithmetic only. Every line is ``ceil(quantity × rate / per)`` (per = 1,000,000 for
tokens, 1 for calls, iterations and traces), then the organization's discount if the line's
rate is not negotiated: ``ceil(gross × (100 − discount) / 100)``. Both steps round up and
both are monotone, so:

- a preview, itemized per job-spec item, is an upper bound of the exact cost of the job;
- usage is aggregated per (kind, model, BYOK) before rounding, and a sum of rounded-up lines is
  at least the rounded-up sum, so the price of any usage a job can produce is at most the job's
  preview (property-tested), and splitting usage into more lines never costs more.

Spec errors raise ``InvalidArgument`` with field paths like ``job.items[1].judge.calls``.
An unknown model is refused, never priced as zero.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import MAX_REQUEST_UECU, JobType
from ecu_sidecar.pricing import tokens
from ecu_sidecar.pricing.ratecard import ModelRates, OrganizationTerms, RateCard
from ecu_sidecar.pricing.tokens import ChatMessage
from ecu_sidecar.validation import MAX_COUNT, check_count, check_model, check_optional_id

__all__ = [
    "MAX_LIST_ITEMS",
    "PER_CALL",
    "PER_MTOK",
    "ChatMessage",
    "GepaSpec",
    "InferenceSpec",
    "JobItem",
    "JobSpec",
    "JudgeSpec",
    "Line",
    "Quote",
    "TraceEvalSpec",
    "Unit",
    "UsageKind",
    "UsageLine",
    "preview",
    "price_usage",
]

#: Token rates are per this many tokens.
PER_MTOK = 1_000_000
#: Fees are per one call, iteration or trace.
PER_CALL = 1
_INT64_MAX = 2**63 - 1
#: Most items in one list of a spec (job items, GEPA per-iteration items, trace judges, usage).
MAX_LIST_ITEMS = 10_000

Message = ChatMessage | Mapping[str, str]


class Unit(enum.StrEnum):
    """What a line's quantity counts."""

    TOKEN = "token"
    CALL = "call"
    ITERATION = "iteration"
    TRACE = "trace"


class UsageKind(enum.StrEnum):
    """What a usage line reports."""

    INFERENCE = "inference"
    """Model calls: tokens_in, tokens_out and calls (samples) of one model."""
    JUDGE = "judge"
    """Judge calls: tokens_in, tokens_out and calls of one judge model."""
    GEPA_ITERATION = "gepa_iteration"
    """GEPA iterations run, in ``calls``; their model calls are reported as inference/judge."""
    TRACE = "trace"
    """Traces evaluated, in ``calls``; their judge calls are reported as judge usage."""

    @property
    def wire_name(self) -> str:
        """The protobuf and JSON spelling (USAGE_KIND_INFERENCE), which error messages use."""
        return f"USAGE_KIND_{self.name}"


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    """Model inference: one prompt, ``samples`` calls, each up to ``max_output_tokens``.

    Exactly one of ``prompt_text``, ``messages`` and ``prompt_tokens`` gives the prompt.
    """

    model: str
    _: KW_ONLY
    prompt_text: str | None = None
    messages: Sequence[Message] | None = None
    prompt_tokens: int | None = None
    """A known prompt size, trusted as-is (no estimate factor)."""
    max_output_tokens: int = 0
    """Completion bound per call; 0 means the model's max_output_tokens."""
    samples: int = 1
    byok: bool = False
    """Runs on the customer's own provider key: token lines cost 0, the engine fee remains."""


@dataclass(frozen=True, slots=True)
class JudgeSpec:
    """An LLM judge run: ``calls`` calls of the judge model, each with the same prompt bound.

    Exactly one of ``prompt_tokens_per_call``, ``prompt_text`` and ``messages`` gives the
    per-call prompt. In a TraceEvalSpec, ``calls`` are the calls per trace.
    """

    judge_model: str
    _: KW_ONLY
    calls: int = 1
    prompt_tokens_per_call: int | None = None
    prompt_text: str | None = None
    messages: Sequence[Message] | None = None
    max_output_tokens_per_call: int = 0
    """Completion bound per call; 0 means the judge model's max_output_tokens."""
    byok: bool = False


@dataclass(frozen=True, slots=True)
class GepaSpec:
    """A GEPA optimization: ``iterations`` × (the iteration fee + the per-iteration calls)."""

    iterations: int
    per_iteration: Sequence[InferenceSpec | JudgeSpec]


@dataclass(frozen=True, slots=True)
class TraceEvalSpec:
    """A trace evaluation: ``traces`` × (the trace fee + every judge's calls per trace)."""

    traces: int
    judges: Sequence[JudgeSpec]


JobItem = InferenceSpec | JudgeSpec | GepaSpec | TraceEvalSpec
#: A job: one or more items, priced together.
JobSpec = Sequence[JobItem]


@dataclass(frozen=True, slots=True)
class UsageLine:
    """What a step really used, reported with its commit."""

    kind: UsageKind | str
    model: str = ""
    """Required for inference and judge; empty for gepa_iteration and trace."""
    tokens_in: int = 0
    tokens_out: int = 0
    calls: int = 0
    """Model calls (inference, judge), iterations (gepa_iteration) or traces (trace)."""
    byok: bool = False


@dataclass(frozen=True, slots=True)
class Line:
    """One priced line of a quote."""

    description: str
    quantity: int
    unit: Unit
    rate_uecu: int
    """µECU per ``per`` units after BYOK and negotiated rates (before the discount)."""
    per: int
    """1,000,000 for tokens, 1 for calls, iterations and traces."""
    subtotal_uecu: int
    """What the line costs: gross − discount."""
    model: str
    job_type: JobType
    item: str = ""
    """The spec item it prices (``job.items[0].gepa.per_iteration[1].judge``), or the first
    usage line of the aggregate it prices (``usage[3]``)."""
    byok: bool = False
    negotiated: bool = False
    """The rate is the organization's negotiated one: no discount applies."""
    gross_uecu: int = 0
    """ceil(quantity × rate / per)."""
    discount_uecu: int = 0


@dataclass(frozen=True, slots=True)
class Quote:
    """A priced job or usage: the total, its breakdown, and the card version that priced it."""

    total_uecu: int
    lines: tuple[Line, ...]
    rate_card_version: str


# ------------------------------------------------------------------------------- line pricing


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True, slots=True)
class _Pricer:
    card: RateCard
    terms: OrganizationTerms

    def line(
        self,
        *,
        description: str,
        quantity: int,
        unit: Unit,
        rate: int,
        per: int,
        negotiated: bool,
        model: str,
        job_type: JobType,
        item: str,
        byok: bool = False,
    ) -> Line:
        gross = _ceil_div(quantity * rate, per)
        if quantity > _INT64_MAX and gross <= MAX_REQUEST_UECU:
            # A zero rate lets any count pass the money limit: bound the count itself, which
            # travels as an int64. Non-zero rates are refused by the money limit first.
            raise InvalidArgument(item, f"{description}: {quantity} {unit}s do not fit in int64")
        discount = 0
        if not negotiated and self.terms.discount_percent:
            discount = gross - _ceil_div(gross * (100 - self.terms.discount_percent), 100)
        return Line(
            description=description,
            quantity=quantity,
            unit=unit,
            rate_uecu=rate,
            per=per,
            subtotal_uecu=gross - discount,
            model=model,
            job_type=job_type,
            item=item,
            byok=byok,
            negotiated=negotiated,
            gross_uecu=gross,
            discount_uecu=discount,
        )

    def token_rate(self, model: ModelRates, which: str, byok: bool) -> tuple[int, bool]:
        if byok:
            return 0, False
        override = self.terms.models.get(model.name)
        negotiated = None if override is None else getattr(override, which)
        if negotiated is not None:
            return negotiated, True
        return getattr(model, which), False

    def fee(self, key: str) -> tuple[int, bool]:
        negotiated = getattr(self.terms.fees, key)
        if negotiated is not None:
            return negotiated, True
        return getattr(self.card.fees, key), False

    def model_calls(
        self,
        *,
        model: ModelRates,
        tokens_in: int,
        tokens_out: int,
        calls: int,
        byok: bool,
        judge: bool,
        job_type: JobType,
        label: str,
        item: str,
    ) -> list[Line]:
        """Token lines (always shown, 0 under BYOK), then the engine (and judge) fee lines."""
        suffix = " (BYOK: 0, paid by the customer's key)" if byok else ""
        lines = []
        for which, quantity, what in (
            ("input_uecu_per_mtok", tokens_in, "input tokens"),
            ("output_uecu_per_mtok", tokens_out, "output tokens"),
        ):
            rate, negotiated = self.token_rate(model, which, byok)
            lines.append(
                self.line(
                    description=f"{label}: {what}{suffix}",
                    quantity=quantity,
                    unit=Unit.TOKEN,
                    rate=rate,
                    per=PER_MTOK,
                    negotiated=negotiated,
                    model=model.name,
                    job_type=job_type,
                    item=item,
                    byok=byok,
                )
            )
        fees = [("engine_call_uecu", "engine fee per call")]
        if judge:
            fees.append(("judge_call_uecu", "judge fee per call"))
        for key, what in fees:
            lines.extend(
                self.fee_line(key, f"{label}: {what}", calls, Unit.CALL, job_type, item, model.name)
            )
        return lines

    def fee_line(
        self,
        key: str,
        description: str,
        quantity: int,
        unit: Unit,
        job_type: JobType,
        item: str,
        model: str = "",
    ) -> list[Line]:
        """A platform fee line; omitted when the fee is 0."""
        rate, negotiated = self.fee(key)
        if rate == 0:
            return []
        return [
            self.line(
                description=description,
                quantity=quantity,
                unit=unit,
                rate=rate,
                per=PER_CALL,
                negotiated=negotiated,
                model=model,
                job_type=job_type,
                item=item,
            )
        ]


# ------------------------------------------------------------------------------ the preview


def preview(card: RateCard, organization: str, job: JobSpec, *, field: str = "job") -> Quote:
    """The worst case of a job: every sample, call, iteration and trace, max output tokens used.

    ``field`` prefixes the error paths (``job.items[0].inference.model``).
    """
    organization = check_optional_id("organization", organization)
    pricer = _Pricer(card, card.terms(organization))
    items = _check_list(job, f"{field}.items")
    lines: list[Line] = []
    for index, item in enumerate(items):
        path = f"{field}.items[{index}]"
        item_lines = _preview_item(pricer, item, path)
        _check_total(path, sum(line.subtotal_uecu for line in item_lines), "this item's worst case")
        lines.extend(item_lines)
    total = sum(line.subtotal_uecu for line in lines)
    _check_total(field, total, "the job's worst case")
    return Quote(total_uecu=total, lines=tuple(lines), rate_card_version=card.version)


def _preview_item(pricer: _Pricer, item: object, path: str) -> list[Line]:
    if isinstance(item, InferenceSpec):
        return _inference(pricer, item, f"{path}.inference", 1, JobType.INFERENCE, "inference")
    if isinstance(item, JudgeSpec):
        return _judge(pricer, item, f"{path}.judge", 1, JobType.JUDGE, "judge")
    if isinstance(item, GepaSpec):
        return _gepa(pricer, item, f"{path}.gepa")
    if isinstance(item, TraceEvalSpec):
        return _trace_eval(pricer, item, f"{path}.trace_eval")
    if item is None:
        raise InvalidArgument(path, "exactly one of inference, judge, gepa, trace_eval is required")
    raise InvalidArgument(
        path,
        f"must be an InferenceSpec, JudgeSpec, GepaSpec or TraceEvalSpec, "
        f"got {type(item).__name__}",
    )


def _inference(
    pricer: _Pricer, spec: InferenceSpec, path: str, repeat: int, job_type: JobType, label: str
) -> list[Line]:
    model = _known_model(pricer.card, spec.model, f"{path}.model")
    prompt = _prompt(
        model,
        path,
        ("prompt_text", spec.prompt_text),
        ("messages", spec.messages),
        ("prompt_tokens", spec.prompt_tokens),
    )
    max_out = _max_output(model, spec.max_output_tokens, f"{path}.max_output_tokens")
    samples = _positive(spec.samples, f"{path}.samples")
    byok = _flag(spec.byok, f"{path}.byok")
    calls = samples * repeat
    return pricer.model_calls(
        model=model,
        tokens_in=prompt * calls,
        tokens_out=max_out * calls,
        calls=calls,
        byok=byok,
        judge=False,
        job_type=job_type,
        label=f"{label} {model.name} ({calls} calls × {prompt} in, {max_out} max out)",
        item=path,
    )


def _judge(
    pricer: _Pricer, spec: JudgeSpec, path: str, repeat: int, job_type: JobType, label: str
) -> list[Line]:
    model = _known_model(pricer.card, spec.judge_model, f"{path}.judge_model")
    prompt = _prompt(
        model,
        path,
        ("prompt_text", spec.prompt_text),
        ("messages", spec.messages),
        ("prompt_tokens_per_call", spec.prompt_tokens_per_call),
    )
    max_out = _max_output(
        model, spec.max_output_tokens_per_call, f"{path}.max_output_tokens_per_call"
    )
    calls = _positive(spec.calls, f"{path}.calls") * repeat
    byok = _flag(spec.byok, f"{path}.byok")
    return pricer.model_calls(
        model=model,
        tokens_in=prompt * calls,
        tokens_out=max_out * calls,
        calls=calls,
        byok=byok,
        judge=True,
        job_type=job_type,
        label=f"{label} {model.name} ({calls} calls × {prompt} in, {max_out} max out)",
        item=path,
    )


def _gepa(pricer: _Pricer, spec: GepaSpec, path: str) -> list[Line]:
    iterations = _positive(spec.iterations, f"{path}.iterations")
    inner = _check_list(spec.per_iteration, f"{path}.per_iteration")
    label = f"GEPA × {iterations} iterations"
    lines = pricer.fee_line(
        "gepa_iteration_uecu",
        f"{label}: iteration fee",
        iterations,
        Unit.ITERATION,
        JobType.GEPA,
        path,
    )
    for index, item in enumerate(inner):
        here = f"{path}.per_iteration[{index}]"
        if isinstance(item, InferenceSpec):
            lines += _inference(
                pricer, item, f"{here}.inference", iterations, JobType.GEPA, f"{label}, inference"
            )
        elif isinstance(item, JudgeSpec):
            lines += _judge(
                pricer, item, f"{here}.judge", iterations, JobType.GEPA, f"{label}, judge"
            )
        elif item is None:
            raise InvalidArgument(here, "exactly one of inference, judge is required")
        else:
            raise InvalidArgument(
                here, f"must be an InferenceSpec or JudgeSpec, got {type(item).__name__}"
            )
    return lines


def _trace_eval(pricer: _Pricer, spec: TraceEvalSpec, path: str) -> list[Line]:
    traces = _positive(spec.traces, f"{path}.traces")
    judges = _check_list(spec.judges, f"{path}.judges")
    label = f"trace evaluation × {traces} traces"
    lines = pricer.fee_line(
        "trace_uecu", f"{label}: trace fee", traces, Unit.TRACE, JobType.TRACE_EVAL, path
    )
    for index, judge in enumerate(judges):
        here = f"{path}.judges[{index}]"
        if not isinstance(judge, JudgeSpec):
            raise InvalidArgument(here, f"must be a JudgeSpec, got {type(judge).__name__}")
        lines += _judge(pricer, judge, here, traces, JobType.TRACE_EVAL, f"{label}, judge")
    return lines


# ---------------------------------------------------------------------------- usage pricing


def price_usage(
    card: RateCard, organization: str, usage: Sequence[UsageLine], *, field: str = "usage"
) -> Quote:
    """The price of what a job used, with the same rates and rounding as its preview.

    Lines are aggregated per (kind, model, BYOK) before rounding. ``field`` prefixes the error
    paths (``usage[2].tokens_in``). An empty usage list prices at 0.
    """
    organization = check_optional_id("organization", organization)
    pricer = _Pricer(card, card.terms(organization))
    lines_in = _check_list(usage, field, allow_empty=True)
    groups: dict[tuple[UsageKind, str, bool], list[int]] = {}
    first: dict[tuple[UsageKind, str, bool], str] = {}
    for index, line in enumerate(lines_in):
        path = f"{field}[{index}]"
        key, counts = _usage_line(card, line, path)
        if key in groups:
            groups[key] = [a + b for a, b in zip(groups[key], counts, strict=True)]
        else:
            groups[key] = counts
            first[key] = path
    lines: list[Line] = []
    for (kind, model_name, byok), (tokens_in, tokens_out, calls) in groups.items():
        item = first[(kind, model_name, byok)]
        if kind is UsageKind.GEPA_ITERATION:
            lines += pricer.fee_line(
                "gepa_iteration_uecu",
                "GEPA: iteration fee",
                calls,
                Unit.ITERATION,
                JobType.GEPA,
                item,
            )
        elif kind is UsageKind.TRACE:
            lines += pricer.fee_line(
                "trace_uecu",
                "trace evaluation: trace fee",
                calls,
                Unit.TRACE,
                JobType.TRACE_EVAL,
                item,
            )
        else:
            judge = kind is UsageKind.JUDGE
            lines += pricer.model_calls(
                model=card.models[model_name],
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                calls=calls,
                byok=byok,
                judge=judge,
                job_type=JobType.JUDGE if judge else JobType.INFERENCE,
                label=f"{kind.value} {model_name} ({calls} calls)",
                item=item,
            )
    total = sum(line.subtotal_uecu for line in lines)
    _check_total(field, total, "the usage")
    return Quote(total_uecu=total, lines=tuple(lines), rate_card_version=card.version)


def _usage_line(
    card: RateCard, line: object, path: str
) -> tuple[tuple[UsageKind, str, bool], list[int]]:
    if not isinstance(line, UsageLine):
        raise InvalidArgument(path, f"must be a UsageLine, got {type(line).__name__}")
    try:
        kind = UsageKind(line.kind)
    except ValueError:
        raise InvalidArgument(
            f"{path}.kind",
            f"must be one of {', '.join(k.wire_name for k in UsageKind)}, got {line.kind}",
        ) from None
    tokens_in = check_count(f"{path}.tokens_in", line.tokens_in)
    tokens_out = check_count(f"{path}.tokens_out", line.tokens_out)
    calls = check_count(f"{path}.calls", line.calls)
    byok = _flag(line.byok, f"{path}.byok")
    if kind in (UsageKind.INFERENCE, UsageKind.JUDGE):
        model = _known_model(card, line.model, f"{path}.model").name
        return (kind, model, byok), [tokens_in, tokens_out, calls]
    if line.model:
        raise InvalidArgument(
            f"{path}.model",
            f"must be empty for {kind.wire_name} usage (report model calls as "
            f"{UsageKind.INFERENCE.wire_name} or {UsageKind.JUDGE.wire_name} usage)",
        )
    for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
        if value:
            raise InvalidArgument(
                f"{path}.{name}",
                f"must be 0 for {kind.wire_name} usage (report tokens as "
                f"{UsageKind.INFERENCE.wire_name} or {UsageKind.JUDGE.wire_name} usage)",
            )
    # BYOK has no effect on platform fees: fold it so such lines aggregate together.
    return (kind, "", False), [0, 0, calls]


# ------------------------------------------------------------------------------- validation


def _check_list(value: object, field: str, *, allow_empty: bool = False) -> Sequence[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgument(field, f"must be a list, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgument(field, "must have at least one item")
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidArgument(field, f"must have at most {MAX_LIST_ITEMS} items, got {len(value)}")
    return value


def _check_total(field: str, total: int, what: str) -> None:
    if total > MAX_REQUEST_UECU:
        raise InvalidArgument(
            field,
            f"{what} is {total} uECU, over the {MAX_REQUEST_UECU} uECU one request may move; "
            "split the job",
        )


def _known_model(card: RateCard, name: object, field: str) -> ModelRates:
    if not isinstance(name, str):
        raise InvalidArgument(field, f"must be a string, got {type(name).__name__}")
    check_model(field, name, required=True)
    model = card.model(name)
    if model is None:
        raise InvalidArgument(
            field,
            f"unknown model {name!r}: rate card {card.version} has no rates for it "
            "(an unknown model is never priced)",
        )
    return model


def _positive(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_COUNT:
        raise InvalidArgument(field, f"must be between 1 and {MAX_COUNT}, got {value}")
    return value


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, f"must be true or false, got {type(value).__name__}")
    return value


def _max_output(model: ModelRates, value: object, field: str) -> int:
    count = check_count(field, value)  # type: ignore[arg-type]
    if count == 0:
        return model.max_output_tokens
    if count > model.max_output_tokens:
        raise InvalidArgument(
            field,
            f"must be at most {model.name}'s max_output_tokens ({model.max_output_tokens}), "
            f"got {count}",
        )
    return count


def _prompt(model: ModelRates, path: str, *sources: tuple[str, object]) -> int:
    """The priced prompt tokens of one call, from exactly one of text, messages or a count."""
    given = [(name, value) for name, value in sources if value is not None]
    if len(given) != 1:
        names = ", ".join(name for name, _ in sources)
        found = f"got {', '.join(n for n, _ in given)}" if given else "got none"
        raise InvalidArgument(f"{path}.prompt", f"exactly one of {names} is required, {found}")
    name, value = given[0]
    field = f"{path}.{name}"
    if name == "prompt_text":
        if not isinstance(value, str):
            raise InvalidArgument(field, f"must be a string, got {type(value).__name__}")
        counted = tokens.count_text(value, model.encoding)
    elif name == "messages":
        counted = tokens.count_messages(_messages(value, field), model.encoding)
    else:
        counted = check_count(field, value)  # type: ignore[arg-type]
    if counted > model.context_window:
        raise InvalidArgument(
            field,
            f"the prompt is {counted} tokens, over {model.name}'s context window of "
            f"{model.context_window}",
        )
    if name == "prompt_tokens" or name == "prompt_tokens_per_call":
        return counted
    # Estimated: scale by the model's safety factor (for tokenizers that are not OpenAI's).
    return _ceil_div(counted * model.estimate_factor_percent, 100)


def _messages(value: object, field: str) -> list[ChatMessage]:
    items = _check_list(value, field)
    out = []
    for index, message in enumerate(items):
        here = f"{field}[{index}]"
        if isinstance(message, ChatMessage):
            role, content, name = message.role, message.content, message.name
        elif isinstance(message, Mapping):
            unknown = set(message) - {"role", "content", "name"}
            if unknown:
                raise InvalidArgument(
                    f"{here}.{sorted(unknown)[0]}", "unknown key (expected role, content, name)"
                )
            role = message.get("role", "")
            content = message.get("content", "")
            name = message.get("name", "")
        else:
            raise InvalidArgument(
                here, f"must be a ChatMessage or a mapping, got {type(message).__name__}"
            )
        for key, text in (("role", role), ("content", content), ("name", name)):
            if not isinstance(text, str):
                raise InvalidArgument(
                    f"{here}.{key}", f"must be a string, got {type(text).__name__}"
                )
        if not role:
            raise InvalidArgument(f"{here}.role", "is required")
        out.append(ChatMessage(role=role, content=content, name=name))
    return out
