"""The preview: the worst case of a job spec, itemized per spec item, every sample, call,
iteration and trace counted with its max output tokens.

Prompts are counted offline (``tokens``) and scaled by the model's estimate factor unless the
spec gives a token count. Error paths name the spec field (``job.items[0].inference.model``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import JobType
from ecu_sidecar.pricing import tokens
from ecu_sidecar.pricing.card import ModelRates, RateCard
from ecu_sidecar.pricing.lines import Line, Pricer, Quote, Unit, ceil_div, check_total
from ecu_sidecar.pricing.spec import (
    GepaSpec,
    InferenceSpec,
    JobSpec,
    JudgeSpec,
    TraceEvalSpec,
    check_list,
    flag,
    known_model,
)
from ecu_sidecar.pricing.tokens import ChatMessage
from ecu_sidecar.validation import MAX_COUNT, check_count, check_optional_id

__all__ = ["preview"]

# ------------------------------------------------------------------------------ the preview


def preview(card: RateCard, organization: str, job: JobSpec, *, field: str = "job") -> Quote:
    """The worst case of a job: every sample, call, iteration and trace, max output tokens used.

    ``field`` prefixes the error paths (``job.items[0].inference.model``).
    """
    organization = check_optional_id("organization", organization)
    pricer = Pricer(card, card.terms(organization))
    items = check_list(job, f"{field}.items")
    siblings = _Siblings(items, f"{field}.items")
    lines: list[Line] = []
    for index, item in enumerate(items):
        path = f"{field}.items[{index}]"
        item_lines = _preview_item(pricer, item, path, siblings)
        check_total(path, sum(line.subtotal_uecu for line in item_lines), "this item's worst case")
        lines.extend(item_lines)
    total = sum(line.subtotal_uecu for line in lines)
    check_total(field, total, "the job's worst case")
    return Quote(total_uecu=total, lines=tuple(lines), rate_card_version=card.version)


@dataclass(frozen=True, slots=True)
class _Siblings:
    """The list a judge's ``answer_of_item`` indexes: the job's items, or a GEPA iteration's."""

    items: Sequence[object]
    path: str


def _preview_item(pricer: Pricer, item: object, path: str, siblings: _Siblings) -> list[Line]:
    if isinstance(item, InferenceSpec):
        return _inference(pricer, item, f"{path}.inference", 1, JobType.INFERENCE, "inference")
    if isinstance(item, JudgeSpec):
        return _judge(pricer, item, f"{path}.judge", 1, JobType.JUDGE, "judge", siblings)
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
    pricer: Pricer,
    spec: InferenceSpec,
    path: str,
    repeat: int,
    job_type: JobType,
    label: str,
    growth: int = 0,
) -> list[Line]:
    """``repeat`` rounds of the spec's samples; with ``growth``, round i's prompt is
    i × growth tokens longer (a GEPA iteration's)."""
    byok = flag(spec.byok, f"{path}.byok")
    model = known_model(pricer.card, spec.model, f"{path}.model", byok=byok)
    prompt = _prompt(
        model,
        path,
        ("prompt_text", spec.prompt_text),
        ("messages", spec.messages),
        ("prompt_tokens", spec.prompt_tokens),
    )
    max_out = _max_output(model, spec.max_output_tokens, f"{path}.max_output_tokens")
    samples = _positive(spec.samples, f"{path}.samples")
    calls = samples * repeat
    sent = f"{prompt} in"
    if growth:
        sent += f" + {growth} per iteration up to {max(prompt, model.context_window)}"
    return pricer.model_calls(
        model=model,
        tokens_in=samples * _grown(prompt, growth, repeat, model.context_window),
        tokens_out=max_out * calls,
        calls=calls,
        byok=byok,
        judge=False,
        job_type=job_type,
        label=f"{label} {model.name} ({calls} calls × {sent}, {max_out} max out)",
        item=path,
    )


def _grown(prompt: int, growth: int, rounds: int, window: int) -> int:
    """Σ over rounds i = 1..rounds of ``prompt + i × growth``, each at most the context window
    (the provider refuses more; an estimate above it stays as estimated)."""
    if not growth:
        return prompt * rounds
    cap = max(prompt, window)
    below = min(rounds, (cap - prompt) // growth)  # rounds whose prompt is under the cap
    return below * prompt + growth * below * (below + 1) // 2 + (rounds - below) * cap


def _judge(
    pricer: Pricer,
    spec: JudgeSpec,
    path: str,
    repeat: int,
    job_type: JobType,
    label: str,
    siblings: _Siblings | None,
) -> list[Line]:
    byok = flag(spec.byok, f"{path}.byok")
    model = known_model(pricer.card, spec.judge_model, f"{path}.judge_model", byok=byok)
    prompt = _prompt(
        model,
        path,
        ("prompt_text", spec.prompt_text),
        ("messages", spec.messages),
        ("prompt_tokens_per_call", spec.prompt_tokens_per_call),
    )
    answer = _answer(pricer, spec, path, model, siblings)
    # A call reads no more than the judge's context window: its provider refuses the rest.
    per_call = min(prompt + answer, max(prompt, model.context_window))
    max_out = _max_output(
        model, spec.max_output_tokens_per_call, f"{path}.max_output_tokens_per_call"
    )
    calls = _positive(spec.calls, f"{path}.calls") * repeat
    read = f"{prompt} in + {answer} answer" if answer else f"{prompt} in"
    if per_call < prompt + answer:
        read += f", at most {per_call}"
    return pricer.model_calls(
        model=model,
        tokens_in=per_call * calls,
        tokens_out=max_out * calls,
        calls=calls,
        byok=byok,
        judge=True,
        job_type=job_type,
        label=f"{label} {model.name} ({calls} calls × {read}, {max_out} max out)",
        item=path,
    )


def _answer(
    pricer: Pricer, spec: JudgeSpec, path: str, judge: ModelRates, siblings: _Siblings | None
) -> int:
    """The answer tokens one judge call reads on top of its prompt, in the judge's tokens."""
    writer = None
    if spec.answer_of_item is None:
        bound = check_count(f"{path}.answer_max_tokens", spec.answer_max_tokens)  # type: ignore[arg-type]
    elif spec.answer_max_tokens:
        raise InvalidArgument(
            f"{path}.answer", "give at most one of answer_max_tokens, answer_of_item, got both"
        )
    else:
        writer, bound = _answered(pricer, spec.answer_of_item, f"{path}.answer_of_item", siblings)
    if writer is not None and writer.name == judge.name:
        return bound
    # Written in another model's tokens: read through the judge's tokenizer, an estimate.
    return ceil_div(bound * judge.estimate_factor_percent, 100)


def _answered(
    pricer: Pricer, of: object, field: str, siblings: _Siblings | None
) -> tuple[ModelRates, int]:
    """The model and the output bound of the inference item whose answer a judge reads."""
    if siblings is None:
        raise InvalidArgument(
            field,
            "the judges of a trace evaluation read traces, not an item's answer: count the "
            "trace in the prompt, or give answer_max_tokens",
        )
    if isinstance(of, bool) or not isinstance(of, int):
        raise InvalidArgument(field, f"must be an integer, got {type(of).__name__}")
    last = len(siblings.items) - 1
    if not 0 <= of <= last:
        raise InvalidArgument(
            field,
            f"must be the index of an inference item of {siblings.path} (0 to {last}), got {of}",
        )
    target, here = siblings.items[of], f"{siblings.path}[{of}]"
    if not isinstance(target, InferenceSpec):
        raise InvalidArgument(
            field, f"must name an inference item: {here} is {_kind(target)}, not an inference"
        )
    byok = flag(target.byok, f"{here}.inference.byok")
    model = known_model(pricer.card, target.model, f"{here}.inference.model", byok=byok)
    return model, _max_output(
        model, target.max_output_tokens, f"{here}.inference.max_output_tokens"
    )


_KINDS: dict[type, str] = {
    JudgeSpec: "a judge run",
    GepaSpec: "a GEPA optimization",
    TraceEvalSpec: "a trace evaluation",
}


def _kind(item: object) -> str:
    if item is None:
        return "an empty item"
    return _KINDS.get(type(item), f"a {type(item).__name__}")


def _gepa(pricer: Pricer, spec: GepaSpec, path: str) -> list[Line]:
    iterations = _positive(spec.iterations, f"{path}.iterations")
    inner = check_list(spec.per_iteration, f"{path}.per_iteration")
    growth = check_count(
        f"{path}.prompt_growth_tokens_per_iteration",
        spec.prompt_growth_tokens_per_iteration,  # type: ignore[arg-type]
    )
    label = f"GEPA × {iterations} iterations"
    lines = pricer.fee_line(
        "gepa_iteration_uecu",
        f"{label}: iteration fee",
        iterations,
        Unit.ITERATION,
        JobType.GEPA,
        path,
    )
    siblings = _Siblings(inner, f"{path}.per_iteration")
    for index, item in enumerate(inner):
        here = f"{path}.per_iteration[{index}]"
        if isinstance(item, InferenceSpec):
            lines += _inference(
                pricer,
                item,
                f"{here}.inference",
                iterations,
                JobType.GEPA,
                f"{label}, inference",
                growth,
            )
        elif isinstance(item, JudgeSpec):
            lines += _judge(
                pricer,
                item,
                f"{here}.judge",
                iterations,
                JobType.GEPA,
                f"{label}, judge",
                siblings,
            )
        elif item is None:
            raise InvalidArgument(here, "exactly one of inference, judge is required")
        else:
            raise InvalidArgument(
                here, f"must be an InferenceSpec or JudgeSpec, got {type(item).__name__}"
            )
    return lines


def _trace_eval(pricer: Pricer, spec: TraceEvalSpec, path: str) -> list[Line]:
    traces = _positive(spec.traces, f"{path}.traces")
    judges = check_list(spec.judges, f"{path}.judges")
    label = f"trace evaluation × {traces} traces"
    lines = pricer.fee_line(
        "trace_uecu", f"{label}: trace fee", traces, Unit.TRACE, JobType.TRACE_EVAL, path
    )
    for index, judge in enumerate(judges):
        here = f"{path}.judges[{index}]"
        if not isinstance(judge, JudgeSpec):
            raise InvalidArgument(here, f"must be a JudgeSpec, got {type(judge).__name__}")
        lines += _judge(pricer, judge, here, traces, JobType.TRACE_EVAL, f"{label}, judge", None)
    return lines


def _positive(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_COUNT:
        raise InvalidArgument(field, f"must be between 1 and {MAX_COUNT}, got {value}")
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
        if model.chat_only:
            # Sent, and billed, as the one user message a chat API takes it as.
            counted = tokens.count_messages([ChatMessage("user", value)], model.encoding)
        else:
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
    return ceil_div(counted * model.estimate_factor_percent, 100)


def _messages(value: object, field: str) -> list[ChatMessage]:
    items = check_list(value, field)
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
