"""Previews and usage prices, checked against figures derived here from the rate card values.

Every expected figure below is computed from the example card's rates with the documented
rules (each line ceil(quantity × rate / per), then ceil(line × (100 − discount) / 100) for
lines whose rate is not negotiated); nothing is a pasted number.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import MAX_REQUEST_UECU, JobType
from ecu_sidecar.pricing import (
    ChatMessage,
    GepaSpec,
    InferenceSpec,
    JudgeSpec,
    Quote,
    RateCard,
    TraceEvalSpec,
    Unit,
    UsageKind,
    UsageLine,
    load_rate_card,
    preview,
    price_usage,
    tokens,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "ratecards" / "example.toml"
CARD = load_rate_card(EXAMPLE)
MTOK = 1_000_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tokens_cost(quantity: int, rate_per_mtok: int) -> int:
    return ceil_div(quantity * rate_per_mtok, MTOK)


def discounted(amount: int, percent: int) -> int:
    return ceil_div(amount * (100 - percent), 100)


def calls_cost(model: str, prompt: int, max_out: int, calls: int, *, judge: bool) -> int:
    """List price of ``calls`` model calls, each ``prompt`` tokens in and ``max_out`` out."""
    m = CARD.models[model]
    total = tokens_cost(prompt * calls, m.input_uecu_per_mtok)
    total += tokens_cost(max_out * calls, m.output_uecu_per_mtok)
    total += calls * CARD.fees.engine_call_uecu
    if judge:
        total += calls * CARD.fees.judge_call_uecu
    return total


def as_user_message(text: str, encoding: str) -> int:
    """Tokens of ``text`` sent as one chat user message, as every model of the example card is
    (chat_only): priming 3, framing 3, the role, the content (OpenAI's cookbook count)."""
    enc = tokens.get_encoding(encoding)
    return 3 + 3 + len(enc.encode_ordinary("user")) + len(enc.encode_ordinary(text))


def check_consistent(quote: Quote) -> None:
    assert quote.rate_card_version == CARD.version
    assert quote.total_uecu == sum(line.subtotal_uecu for line in quote.lines)
    for line in quote.lines:
        assert line.gross_uecu == ceil_div(line.quantity * line.rate_uecu, line.per)
        assert line.subtotal_uecu == line.gross_uecu - line.discount_uecu
        assert line.per == (MTOK if line.unit is Unit.TOKEN else 1)


# ------------------------------------------------------------------------------ job types


def test_inference_with_a_known_token_count() -> None:
    spec = InferenceSpec("gpt-4o", prompt_tokens=1_234, max_output_tokens=500, samples=3)
    quote = preview(CARD, "", [spec])
    check_consistent(quote)
    assert quote.total_uecu == calls_cost("gpt-4o", 1_234, 500, 3, judge=False)
    assert [(line.unit, line.quantity) for line in quote.lines] == [
        (Unit.TOKEN, 1_234 * 3),
        (Unit.TOKEN, 500 * 3),
        (Unit.CALL, 3),
    ]
    assert {line.job_type for line in quote.lines} == {JobType.INFERENCE}
    assert {line.item for line in quote.lines} == {"job.items[0].inference"}


def test_inference_defaults_to_the_models_max_output() -> None:
    quote = preview(CARD, "", [InferenceSpec("gpt-4o-mini", prompt_tokens=10)])
    m = CARD.models["gpt-4o-mini"]
    assert quote.total_uecu == calls_cost("gpt-4o-mini", 10, m.max_output_tokens, 1, judge=False)


def test_inference_from_text_uses_the_encoding_and_safety_factor() -> None:
    text = "Summarize the following evaluation transcript. " * 40
    model = "anthropic/claude-sonnet-4"
    m = CARD.models[model]
    assert m.chat_only
    raw = as_user_message(text, m.encoding)
    priced = ceil_div(raw * m.estimate_factor_percent, 100)
    assert priced > raw  # the card gives this non-OpenAI model a factor above 100
    quote = preview(CARD, "", [InferenceSpec(model, prompt_text=text, max_output_tokens=2_000)])
    assert quote.lines[0].quantity == priced
    assert quote.total_uecu == calls_cost(model, priced, 2_000, 1, judge=False)


def test_inference_from_chat_messages() -> None:
    messages = [
        ChatMessage("system", "You grade answers."),
        {"role": "user", "content": "Is 2 + 2 = 4?", "name": "grader"},
    ]
    enc = tokens.get_encoding(CARD.models["gpt-4o"].encoding)

    def n(text: str) -> int:
        return len(enc.encode_ordinary(text))

    expected_prompt = 3 + (3 + n("system") + n("You grade answers."))
    expected_prompt += 3 + n("user") + n("Is 2 + 2 = 4?") + n("grader") + 1
    quote = preview(
        CARD, "", [InferenceSpec("gpt-4o", messages=messages, max_output_tokens=100, samples=2)]
    )
    assert quote.lines[0].quantity == expected_prompt * 2
    assert quote.total_uecu == calls_cost("gpt-4o", expected_prompt, 100, 2, judge=False)


def test_judge_run() -> None:
    spec = JudgeSpec(
        "gpt-4o-mini", calls=7, prompt_tokens_per_call=900, max_output_tokens_per_call=200
    )
    quote = preview(CARD, "", [spec])
    check_consistent(quote)
    assert quote.total_uecu == calls_cost("gpt-4o-mini", 900, 200, 7, judge=True)
    judge_fee = [line for line in quote.lines if line.description.endswith("judge fee per call")]
    assert [(x.quantity, x.rate_uecu) for x in judge_fee] == [(7, CARD.fees.judge_call_uecu)]
    assert quote.lines[0].item == "job.items[0].judge"


def test_gepa() -> None:
    spec = GepaSpec(
        iterations=4,
        per_iteration=[
            InferenceSpec("gpt-4.1", prompt_tokens=1_000, max_output_tokens=300, samples=2),
            JudgeSpec(
                "gpt-4o-mini", calls=3, prompt_tokens_per_call=400, max_output_tokens_per_call=50
            ),
        ],
    )
    quote = preview(CARD, "", [spec])
    check_consistent(quote)
    expected = 4 * CARD.fees.gepa_iteration_uecu
    expected += calls_cost("gpt-4.1", 1_000, 300, 4 * 2, judge=False)
    expected += calls_cost("gpt-4o-mini", 400, 50, 4 * 3, judge=True)
    assert quote.total_uecu == expected
    assert {line.job_type for line in quote.lines} == {JobType.GEPA}
    assert quote.lines[0].unit is Unit.ITERATION
    assert quote.lines[1].item == "job.items[0].gepa.per_iteration[0].inference"


def test_trace_evaluation() -> None:
    rubric = "Score the trace from 1 to 5 for faithfulness. Answer with the digit only."
    llama = "meta-llama/llama-3.1-70b-instruct"
    spec = TraceEvalSpec(
        traces=250,
        judges=[
            JudgeSpec(
                "gpt-4o", calls=2, prompt_tokens_per_call=3_000, max_output_tokens_per_call=5
            ),
            JudgeSpec(llama, prompt_text=rubric, max_output_tokens_per_call=5),
        ],
    )
    quote = preview(CARD, "", [spec])
    check_consistent(quote)
    m = CARD.models[llama]
    rubric_tokens = ceil_div(
        as_user_message(rubric, m.encoding) * m.estimate_factor_percent,
        100,
    )
    expected = 250 * CARD.fees.trace_uecu
    expected += calls_cost("gpt-4o", 3_000, 5, 250 * 2, judge=True)
    expected += calls_cost(llama, rubric_tokens, 5, 250, judge=True)
    assert quote.total_uecu == expected
    assert {line.job_type for line in quote.lines} == {JobType.TRACE_EVAL}
    assert quote.lines[-1].item == "job.items[0].trace_eval.judges[1]"


def test_a_job_is_the_sum_of_its_items() -> None:
    items = [
        InferenceSpec("gpt-4o", prompt_tokens=100, samples=2),
        JudgeSpec("gpt-4o-mini", calls=3, prompt_tokens_per_call=10),
        GepaSpec(2, [InferenceSpec("gpt-4-turbo", prompt_tokens=5)]),
        TraceEvalSpec(3, [JudgeSpec("gpt-4o", prompt_tokens_per_call=7)]),
    ]
    whole = preview(CARD, "acme", items)
    check_consistent(whole)
    assert whole.total_uecu == sum(preview(CARD, "acme", [item]).total_uecu for item in items)
    assert whole.lines[-1].item == "job.items[3].trace_eval.judges[0]"


def test_byok_bills_only_the_engine_fee() -> None:
    spec = InferenceSpec(
        "gpt-4o", prompt_tokens=50_000, max_output_tokens=4_000, samples=5, byok=True
    )
    quote = preview(CARD, "", [spec])
    check_consistent(quote)
    assert quote.total_uecu == 5 * CARD.fees.engine_call_uecu
    token_lines = [line for line in quote.lines if line.unit is Unit.TOKEN]
    assert [(x.quantity, x.rate_uecu, x.subtotal_uecu, x.byok) for x in token_lines] == [
        (50_000 * 5, 0, 0, True),
        (4_000 * 5, 0, 0, True),
    ]
    judge = JudgeSpec("gpt-4o", calls=4, prompt_tokens_per_call=10, byok=True)
    assert preview(CARD, "", [judge]).total_uecu == 4 * (
        CARD.fees.engine_call_uecu + CARD.fees.judge_call_uecu
    )


# --------------------------------------------------------------------------- enterprise terms

JOB = [
    InferenceSpec("gpt-4o", prompt_tokens=10_001, max_output_tokens=777, samples=3),
    InferenceSpec("gpt-4o-mini", prompt_tokens=333, max_output_tokens=99),
    GepaSpec(2, [JudgeSpec("gpt-4o", prompt_tokens_per_call=5, max_output_tokens_per_call=3)]),
]


def list_lines() -> list[tuple[str, int, int, str]]:
    """(model or fee, quantity, list rate, per) of every line of JOB, in order."""
    f = CARD.fees
    out = []
    for model, prompt, max_out, calls in (("gpt-4o", 10_001, 777, 3), ("gpt-4o-mini", 333, 99, 1)):
        m = CARD.models[model]
        out += [
            (f"{model}:input", prompt * calls, m.input_uecu_per_mtok, MTOK),
            (f"{model}:output", max_out * calls, m.output_uecu_per_mtok, MTOK),
            ("engine", calls, f.engine_call_uecu, 1),
        ]
    m = CARD.models["gpt-4o"]
    out += [
        ("gepa", 2, f.gepa_iteration_uecu, 1),
        ("gpt-4o:input", 5 * 2, m.input_uecu_per_mtok, MTOK),
        ("gpt-4o:output", 3 * 2, m.output_uecu_per_mtok, MTOK),
        ("engine", 2, f.engine_call_uecu, 1),
        ("judge", 2, f.judge_call_uecu, 1),
    ]
    return out


def test_volume_discount_applies_per_line() -> None:
    percent = CARD.organizations["acme"].discount_percent
    assert percent > 0
    quote = preview(CARD, "acme", JOB)
    check_consistent(quote)
    expected = [discounted(ceil_div(q * rate, per), percent) for _, q, rate, per in list_lines()]
    assert [line.subtotal_uecu for line in quote.lines] == expected
    assert quote.total_uecu == sum(expected)
    assert quote.total_uecu < preview(CARD, "", JOB).total_uecu


def test_negotiated_rates_replace_list_rates() -> None:
    terms = CARD.organizations["globex"]
    assert terms.discount_percent == 0
    override = terms.models["gpt-4o"]
    negotiated = {
        "gpt-4o:input": override.input_uecu_per_mtok,
        "gpt-4o:output": override.output_uecu_per_mtok,
        "engine": terms.fees.engine_call_uecu,
    }
    quote = preview(CARD, "globex", JOB)
    check_consistent(quote)
    expected = [ceil_div(q * negotiated.get(key, rate), per) for key, q, rate, per in list_lines()]
    assert [line.subtotal_uecu for line in quote.lines] == expected
    assert [line.negotiated for line in quote.lines] == [
        key in negotiated for key, *_ in list_lines()
    ]


def test_discount_does_not_reduce_negotiated_rates() -> None:
    terms = CARD.organizations["initech"]
    negotiated_out = terms.models["gpt-4o-mini"].output_uecu_per_mtok
    quote = preview(CARD, "initech", JOB)
    check_consistent(quote)
    expected = []
    for key, q, rate, per in list_lines():
        if key == "gpt-4o-mini:output":
            expected.append(ceil_div(q * negotiated_out, per))  # final: no discount on top
        else:
            expected.append(discounted(ceil_div(q * rate, per), terms.discount_percent))
    assert [line.subtotal_uecu for line in quote.lines] == expected


def test_an_organization_without_terms_pays_list_price() -> None:
    assert preview(CARD, "someone-else", JOB) == preview(CARD, "", JOB)


# ----------------------------------------------------------------------------- invalid specs

HUGE = 2**40
INVALID = [
    ([], "", "job.items", "at least one item"),
    ("gpt-4o", "", "job.items", "must be a list"),
    ([object()], "", "job.items[0]", "must be an InferenceSpec"),
    (
        [InferenceSpec("gpt-5", prompt_tokens=1)],
        "",
        "job.items[0].inference.model",
        "unknown model 'gpt-5'",
    ),
    ([InferenceSpec("", prompt_tokens=1)], "", "job.items[0].inference.model", "is required"),
    (
        [InferenceSpec("gpt 4o", prompt_tokens=1)],
        "",
        "job.items[0].inference.model",
        "may contain only",
    ),
    (
        [
            InferenceSpec("gpt-4o", prompt_tokens=1),
            JudgeSpec("gpt-4o", calls=0, prompt_tokens_per_call=1),
        ],
        "",
        "job.items[1].judge.calls",
        "between 1 and",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1), JudgeSpec("judge-x", prompt_tokens_per_call=1)],
        "",
        "job.items[1].judge.judge_model",
        "unknown model 'judge-x'",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, samples=0)],
        "",
        "job.items[0].inference.samples",
        "between 1",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, samples=True)],
        "",
        "job.items[0].inference.samples",
        "integer",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=-1)],
        "",
        "job.items[0].inference.prompt_tokens",
        "between 0",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1.5)],
        "",
        "job.items[0].inference.prompt_tokens",
        "integer",
    ),
    ([InferenceSpec("gpt-4o")], "", "job.items[0].inference.prompt", "exactly one of"),
    (
        [InferenceSpec("gpt-4o", prompt_text="hi", prompt_tokens=3)],
        "",
        "job.items[0].inference.prompt",
        "got prompt_text, prompt_tokens",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=128_001)],
        "",
        "job.items[0].inference.prompt_tokens",
        "over gpt-4o's context window of 128000",
    ),
    (
        [InferenceSpec("gpt-4-turbo", prompt_text="word " * 130_000)],
        "",
        "job.items[0].inference.prompt_text",
        "context window",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, max_output_tokens=16_385)],
        "",
        "job.items[0].inference.max_output_tokens",
        "at most gpt-4o's max_output_tokens (16384)",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, max_output_tokens=-1)],
        "",
        "job.items[0].inference.max_output_tokens",
        "between 0",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, byok=1)],
        "",
        "job.items[0].inference.byok",
        "true or false",
    ),
    ([InferenceSpec("gpt-4o", messages=[])], "", "job.items[0].inference.messages", "at least one"),
    (
        [InferenceSpec("gpt-4o", messages=[{"content": "x"}])],
        "",
        "job.items[0].inference.messages[0].role",
        "is required",
    ),
    (
        [InferenceSpec("gpt-4o", messages=[{"role": "user", "text": "x"}])],
        "",
        "job.items[0].inference.messages[0].text",
        "unknown key",
    ),
    (
        [InferenceSpec("gpt-4o", messages=[{"role": "user", "content": 5}])],
        "",
        "job.items[0].inference.messages[0].content",
        "must be a string",
    ),
    (
        [InferenceSpec("gpt-4o", messages=["hi"])],
        "",
        "job.items[0].inference.messages[0]",
        "ChatMessage",
    ),
    (
        [GepaSpec(0, [InferenceSpec("gpt-4o", prompt_tokens=1)])],
        "",
        "job.items[0].gepa.iterations",
        "between 1",
    ),
    ([GepaSpec(2, [])], "", "job.items[0].gepa.per_iteration", "at least one"),
    (
        [GepaSpec(2, [TraceEvalSpec(1, [JudgeSpec("gpt-4o", prompt_tokens_per_call=1)])])],
        "",
        "job.items[0].gepa.per_iteration[0]",
        "InferenceSpec or JudgeSpec",
    ),
    (
        [
            GepaSpec(
                2, [JudgeSpec("gpt-4o", prompt_tokens_per_call=1, max_output_tokens_per_call=10**6)]
            )
        ],
        "",
        "job.items[0].gepa.per_iteration[0].judge.max_output_tokens_per_call",
        "at most",
    ),
    (
        [TraceEvalSpec(0, [JudgeSpec("gpt-4o", prompt_tokens_per_call=1)])],
        "",
        "job.items[0].trace_eval.traces",
        "between 1",
    ),
    ([TraceEvalSpec(5, [])], "", "job.items[0].trace_eval.judges", "at least one"),
    (
        [TraceEvalSpec(5, [JudgeSpec("gpt-4o", calls=0, prompt_tokens_per_call=1)])],
        "",
        "job.items[0].trace_eval.judges[0].calls",
        "between 1",
    ),
    (
        [TraceEvalSpec(5, [InferenceSpec("gpt-4o", prompt_tokens=1)])],
        "",
        "job.items[0].trace_eval.judges[0]",
        "must be a JudgeSpec",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=100_000, samples=HUGE)],
        "",
        "job.items[0]",
        f"over the {MAX_REQUEST_UECU} uECU one request may move",
    ),
    (
        [InferenceSpec("gpt-4o", prompt_tokens=1, samples=10**9)] * 300,
        "",
        "job",
        "the job's worst case",
    ),
    ([InferenceSpec("gpt-4o", prompt_tokens=1)], "acme corp", "organization", "may contain only"),
]


@pytest.mark.parametrize(("job", "org", "field", "words"), INVALID)
def test_invalid_spec_names_the_field(job, org: str, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        preview(CARD, org, job)
    assert caught.value.field == field
    assert words in caught.value.description


def test_field_prefix_is_configurable() -> None:
    with pytest.raises(InvalidArgument) as caught:
        preview(CARD, "", [InferenceSpec("nope", prompt_tokens=1)], field="request.job")
    assert caught.value.field == "request.job.items[0].inference.model"


def test_preview_of_a_100k_token_prompt_completes() -> None:
    text = " ".join(f"token{i % 997}" for i in range(60_000))
    model = CARD.models["gpt-4.1"]
    raw = as_user_message(text, model.encoding)
    assert raw >= 100_000
    quote = preview(CARD, "", [InferenceSpec("gpt-4.1", prompt_text=text)])
    assert quote.lines[0].quantity == raw


# ------------------------------------------------------------------------------------- usage


def test_usage_price_is_the_sum_of_its_breakdown() -> None:
    usage = [
        UsageLine(UsageKind.INFERENCE, "gpt-4o", tokens_in=12_345, tokens_out=678, calls=2),
        UsageLine("judge", "gpt-4o-mini", tokens_in=900, tokens_out=30, calls=3),
        UsageLine("gepa_iteration", calls=4),
        UsageLine("trace", calls=10),
        UsageLine("inference", "gpt-4o", tokens_in=5, tokens_out=5, calls=1, byok=True),
    ]
    quote = price_usage(CARD, "", usage)
    check_consistent(quote)
    f = CARD.fees
    expected = calls_cost("gpt-4o", 0, 0, 2, judge=False)
    m = CARD.models["gpt-4o"]
    expected += tokens_cost(12_345, m.input_uecu_per_mtok) + tokens_cost(
        678, m.output_uecu_per_mtok
    )
    mini = CARD.models["gpt-4o-mini"]
    expected += tokens_cost(900, mini.input_uecu_per_mtok) + tokens_cost(
        30, mini.output_uecu_per_mtok
    )
    expected += 3 * (f.engine_call_uecu + f.judge_call_uecu)
    expected += 4 * f.gepa_iteration_uecu + 10 * f.trace_uecu
    expected += f.engine_call_uecu  # the BYOK call: tokens free, engine fee billed
    assert quote.total_uecu == expected
    assert [line.item for line in quote.lines][-3:] == ["usage[4]"] * 3


def test_worst_case_usage_prices_exactly_at_the_preview() -> None:
    spec = JudgeSpec(
        "gpt-4o", calls=3, prompt_tokens_per_call=1_111, max_output_tokens_per_call=222
    )
    usage = [UsageLine("judge", "gpt-4o", tokens_in=3 * 1_111, tokens_out=3 * 222, calls=3)]
    for org in ("", "acme", "globex", "initech"):
        assert price_usage(CARD, org, usage).total_uecu == preview(CARD, org, [spec]).total_uecu


def test_usage_is_aggregated_before_rounding() -> None:
    # 1 token of gpt-4o-mini input costs a fraction of a uECU: each alone would round up to 1.
    one = UsageLine("inference", "gpt-4o-mini", tokens_in=1, calls=0)
    rate = CARD.models["gpt-4o-mini"].input_uecu_per_mtok
    quote = price_usage(CARD, "", [one] * 100)
    assert quote.lines[0].quantity == 100
    assert quote.total_uecu == tokens_cost(100, rate) < 100


def test_empty_usage_prices_at_zero() -> None:
    assert price_usage(CARD, "", []).total_uecu == 0


USAGE_INVALID = [
    (
        [UsageLine("inference", "gpt-5", tokens_in=1, calls=1)],
        "usage[0].model",
        "unknown model 'gpt-5'",
    ),
    ([UsageLine("judge", "", calls=1)], "usage[0].model", "is required"),
    (
        [UsageLine("training", "gpt-4o")],
        "usage[0].kind",
        "must be one of USAGE_KIND_INFERENCE, USAGE_KIND_JUDGE",
    ),
    ([UsageLine("inference", "gpt-4o", tokens_in=-1)], "usage[0].tokens_in", "between 0"),
    ([UsageLine("inference", "gpt-4o", tokens_out=1.0)], "usage[0].tokens_out", "integer"),
    ([UsageLine("inference", "gpt-4o", calls=True)], "usage[0].calls", "integer"),
    ([UsageLine("inference", "gpt-4o", byok="no")], "usage[0].byok", "true or false"),
    (
        [UsageLine("trace", calls=1), UsageLine("gepa_iteration", "gpt-4o", calls=1)],
        "usage[1].model",
        "must be empty",
    ),
    ([UsageLine("gepa_iteration", tokens_in=5, calls=1)], "usage[0].tokens_in", "must be 0"),
    ([UsageLine("trace", calls=2**52)], "usage", "over the"),
    (["gpt-4o"], "usage[0]", "must be a UsageLine"),
]


@pytest.mark.parametrize(("usage", "field", "words"), USAGE_INVALID)
def test_invalid_usage_names_the_field(usage, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        price_usage(CARD, "", usage)
    assert caught.value.field == field
    assert words in caught.value.description


# ---------------------------------------------------------------- preview bounds every usage

MODELS = sorted(CARD.models)
ORGS = ["", "acme", "globex", "initech"]


@st.composite
def inference_specs(draw: st.DrawFn) -> InferenceSpec:
    name = draw(st.sampled_from(MODELS))
    m = CARD.models[name]
    return InferenceSpec(
        name,
        prompt_tokens=draw(st.integers(0, min(m.context_window, 200_000))),
        max_output_tokens=draw(st.integers(0, m.max_output_tokens)),
        samples=draw(st.integers(1, 4)),
        byok=draw(st.booleans()),
    )


@st.composite
def judge_specs(draw: st.DrawFn) -> JudgeSpec:
    name = draw(st.sampled_from(MODELS))
    m = CARD.models[name]
    return JudgeSpec(
        name,
        calls=draw(st.integers(1, 4)),
        prompt_tokens_per_call=draw(st.integers(0, min(m.context_window, 200_000))),
        max_output_tokens_per_call=draw(st.integers(0, m.max_output_tokens)),
        byok=draw(st.booleans()),
    )


calls_specs = st.one_of(inference_specs(), judge_specs())
job_items = st.one_of(
    inference_specs(),
    judge_specs(),
    st.builds(GepaSpec, st.integers(1, 6), st.lists(calls_specs, min_size=1, max_size=3)),
    st.builds(TraceEvalSpec, st.integers(1, 30), st.lists(judge_specs(), min_size=1, max_size=3)),
)


def leaves(card: RateCard, item, repeat: int = 1):
    """(kind, model, byok, most tokens in, most tokens out, most calls) a job item can use."""
    if isinstance(item, InferenceSpec):
        m = card.models[item.model]
        calls = item.samples * repeat
        out = item.max_output_tokens or m.max_output_tokens
        yield ("inference", item.model, item.byok, item.prompt_tokens * calls, out * calls, calls)
    elif isinstance(item, JudgeSpec):
        m = card.models[item.judge_model]
        calls = item.calls * repeat
        out = item.max_output_tokens_per_call or m.max_output_tokens
        yield (
            "judge",
            item.judge_model,
            item.byok,
            item.prompt_tokens_per_call * calls,
            out * calls,
            calls,
        )
    elif isinstance(item, GepaSpec):
        yield ("gepa_iteration", "", False, 0, 0, item.iterations * repeat)
        for inner in item.per_iteration:
            yield from leaves(card, inner, item.iterations * repeat)
    else:
        yield ("trace", "", False, 0, 0, item.traces * repeat)
        for judge in item.judges:
            yield from leaves(card, judge, item.traces * repeat)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    job=st.lists(job_items, min_size=1, max_size=4),
    org=st.sampled_from(ORGS),
    data=st.data(),
)
def test_preview_bounds_the_price_of_any_usage_of_the_job(job, org: str, data) -> None:
    worst = preview(CARD, org, job)
    usage: list[UsageLine] = []
    for kind, model, byok, most_in, most_out, most_calls in (
        leaf for item in job for leaf in leaves(CARD, item)
    ):
        bounds = (most_in, most_out, most_calls)
        if data.draw(st.booleans()):  # the worst case itself: every bound reached
            used = list(bounds)
        else:
            used = [data.draw(st.integers(0, most)) for most in bounds]
        pieces = data.draw(st.integers(1, 3))  # report the same usage in several lines
        for piece in range(pieces):
            share = [value // pieces + (value % pieces if piece == 0 else 0) for value in used]
            usage.append(UsageLine(kind, model, share[0], share[1], share[2], byok))
    random.Random(data.draw(st.integers(0, 2**32))).shuffle(usage)
    priced = price_usage(CARD, org, usage)
    assert priced.total_uecu == sum(line.subtotal_uecu for line in priced.lines)
    assert priced.total_uecu <= worst.total_uecu


def test_a_count_that_cannot_travel_as_int64_is_refused_even_at_a_zero_rate() -> None:
    """BYOK token lines cost 0, so no money limit bounds their quantity: the count itself is
    refused, naming the item, instead of overflowing the int64 it is sent back in."""
    from ecu_sidecar.errors import InvalidArgument
    from ecu_sidecar.pricing import InferenceSpec, load_rate_card, preview
    from tests.conftest import EXAMPLE_RATE_CARD

    card = load_rate_card(EXAMPLE_RATE_CARD)
    spec = InferenceSpec("gpt-4o", prompt_tokens=100_000, samples=2**50, byok=True)
    with pytest.raises(InvalidArgument) as ei:
        preview(card, "acme", [spec])
    assert ei.value.field == "job.items[0].inference"
    assert "int64" in ei.value.description
