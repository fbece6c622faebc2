"""What the pricer takes: job spec items (the worst case to preview) and usage lines (what a
job really used), and the checks of their shape that the preview and usage pricing share.

Spec errors raise ``InvalidArgument`` with field paths like ``job.items[1].judge.calls``.
An unknown model is refused, never priced as zero, unless it runs on the customer's own key.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.pricing.card import ModelRates, RateCard
from ecu_sidecar.pricing.ratecard import MAX_CONTEXT_TOKENS
from ecu_sidecar.pricing.tokens import ChatMessage
from ecu_sidecar.validation import check_model

__all__ = [
    "MAX_LIST_ITEMS",
    "GepaSpec",
    "InferenceSpec",
    "JobItem",
    "JobSpec",
    "JudgeSpec",
    "Message",
    "TraceEvalSpec",
    "UsageKind",
    "UsageLine",
    "check_list",
    "flag",
    "known_model",
    "unlisted_byok_model",
]

#: Most items in one list of a spec (job items, GEPA per-iteration items, trace judges, usage).
MAX_LIST_ITEMS = 10_000

Message = ChatMessage | Mapping[str, str]


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
    per-call prompt (the rubric). A judge of a candidate's answer reads that answer on top of
    it: ``answer_of_item`` or ``answer_max_tokens`` bounds it. In a TraceEvalSpec, ``calls``
    are the calls per trace.
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
    answer_max_tokens: int = 0
    """Each call also reads a candidate's answer of up to this many tokens (0: none)."""
    answer_of_item: int | None = None
    """Each call also reads the answer of this inference item of the same list (the job's
    items, or the GEPA iteration's ``per_iteration``): up to that item's output bound. At most
    one of this and ``answer_max_tokens``."""


@dataclass(frozen=True, slots=True)
class GepaSpec:
    """A GEPA optimization: ``iterations`` × (the iteration fee + the per-iteration calls)."""

    iterations: int
    per_iteration: Sequence[InferenceSpec | JudgeSpec]
    prompt_growth_tokens_per_iteration: int = 0
    """Tokens each iteration's reflection may append to the candidate prompt: iteration i
    (1 to ``iterations``) sends each per-iteration inference prompt + i × this, at most the
    model's context window. Judges' prompts (their rubric) do not grow."""


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


# ------------------------------------------------------- checks shared by preview and usage


def check_list(value: object, field: str, *, allow_empty: bool = False) -> Sequence[object]:
    """A list of at most MAX_LIST_ITEMS items (at least one unless ``allow_empty``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgument(field, f"must be a list, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidArgument(field, "must have at least one item")
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidArgument(field, f"must have at most {MAX_LIST_ITEMS} items, got {len(value)}")
    return value


def known_model(card: RateCard, name: object, field: str, *, byok: bool = False) -> ModelRates:
    """The rates of a model the card lists, or under BYOK of any well-formed model name
    (``unlisted_byok_model``); any other name is refused, never priced."""
    if not isinstance(name, str):
        raise InvalidArgument(field, f"must be a string, got {type(name).__name__}")
    check_model(field, name, required=True)
    model = card.model(name)
    if model is not None:
        return model
    if byok:
        return unlisted_byok_model(card, name)
    raise InvalidArgument(
        field,
        f"unknown model {name!r}: rate card {card.version} has no rates for it (an unknown "
        "model is never priced; a model on the customer's own provider key needs byok = true)",
    )


def unlisted_byok_model(card: RateCard, name: str) -> ModelRates:
    """A BYOK model the card does not list: its tokens cost 0 (the customer's key pays the
    provider) and only the platform's fees are billed, so no card needs to list every customer
    model. Its limits are the card's ceilings (its provider enforces its own); its prompts are
    estimated with one of the card's encodings, for the volume the breakdown shows."""
    return ModelRates(
        name=name,
        input_uecu_per_mtok=0,
        output_uecu_per_mtok=0,
        encoding=min(card.encodings()),
        context_window=MAX_CONTEXT_TOKENS,
        max_output_tokens=MAX_CONTEXT_TOKENS,
    )


def flag(value: object, field: str) -> bool:
    """A boolean, and only a boolean."""
    if not isinstance(value, bool):
        raise InvalidArgument(field, f"must be true or false, got {type(value).__name__}")
    return value
