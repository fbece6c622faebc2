"""The preview against what real evaluation workers do and report (issue 16).

Each test builds the usage a worker would report for a job — the provider's token counts, every
call, every answer as long as its bound allows — prices it, and checks that the job's preview
is at least that price: a judge reading the candidate's answer, GEPA prompts that grow,
chat-only models given a plain prompt, BYOK models the card does not list, the engine fee of
BYOK calls. Expected figures are derived from the card's values, never pasted.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.pricing import (
    ChatMessage,
    GepaSpec,
    InferenceSpec,
    JudgeSpec,
    RateCard,
    RateCardError,
    TraceEvalSpec,
    Unit,
    UsageLine,
    load_rate_card,
    parse_rate_card,
    preview,
    price_usage,
    tokens,
)

MTOK = 1_000_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def card_text(fees: str, organizations: str = "") -> str:
    """A small card: one public model, the given [fees] body, optional organization terms."""
    return f"""
version = "w1"
[fees]
judge_call_uecu = 1_000
gepa_iteration_uecu = 50_000
trace_uecu = 500
{fees}
[models.gpt-4o]
input_uecu_per_mtok = 2_500_000
output_uecu_per_mtok = 10_000_000
encoding = "o200k_base"
context_window = 128_000
max_output_tokens = 16_384
{organizations}
"""


# -- the engine fee of BYOK calls --------------------------------------------------------------

#: Public calls pay their tokens only; BYOK calls pay the platform's engine work.
SPLIT = parse_rate_card(card_text("engine_call_uecu = 0\nbyok_engine_call_uecu = 300"))


def test_byok_engine_work_is_billed_without_a_fee_on_public_calls() -> None:
    public = InferenceSpec("gpt-4o", prompt_tokens=1_000, max_output_tokens=100, samples=4)
    byok = InferenceSpec("gpt-4o", prompt_tokens=1_000, max_output_tokens=100, samples=4, byok=True)
    m = SPLIT.models["gpt-4o"]
    tokens = ceil_div(4_000 * m.input_uecu_per_mtok, MTOK) + ceil_div(
        400 * m.output_uecu_per_mtok, MTOK
    )
    assert preview(SPLIT, "", [public]).total_uecu == tokens
    assert [x.unit for x in preview(SPLIT, "", [public]).lines] == [Unit.TOKEN] * 2
    quote = preview(SPLIT, "", [byok])
    assert quote.total_uecu == 4 * 300
    (fee,) = [x for x in quote.lines if x.unit is Unit.CALL]
    assert (fee.quantity, fee.rate_uecu, fee.description.endswith("BYOK engine fee per call")) == (
        4,
        300,
        True,
    )
    # What the worker reports prices the same way, and within the preview.
    used = [
        UsageLine("inference", "gpt-4o", tokens_in=4_000, tokens_out=400, calls=4),
        UsageLine("inference", "gpt-4o", tokens_in=4_000, tokens_out=400, calls=4, byok=True),
    ]
    assert price_usage(SPLIT, "", used).total_uecu == tokens + 4 * 300
    assert price_usage(SPLIT, "", used).total_uecu <= preview(SPLIT, "", [public, byok]).total_uecu
    # A judge's own fee is not engine work: it stays as the card sets it.
    judge = JudgeSpec("gpt-4o", calls=2, prompt_tokens_per_call=10, byok=True)
    assert preview(SPLIT, "", [judge]).total_uecu == 2 * (300 + SPLIT.fees.judge_call_uecu)


def test_without_a_byok_engine_fee_byok_calls_pay_the_engine_fee_as_before() -> None:
    card = parse_rate_card(card_text("engine_call_uecu = 200"))
    assert card.fees.byok_engine_call_uecu is None
    spec = InferenceSpec("gpt-4o", prompt_tokens=10, max_output_tokens=10, samples=3, byok=True)
    assert preview(card, "", [spec]).total_uecu == 3 * 200


def test_an_organization_negotiates_the_byok_engine_fee_on_its_own() -> None:
    terms = """
[organizations.acme]
discount_percent = 10
[organizations.acme.fees]
byok_engine_call_uecu = 120
[organizations.globex.fees]
engine_call_uecu = 50
"""
    card = parse_rate_card(card_text("engine_call_uecu = 200", terms))
    spec = InferenceSpec("gpt-4o", prompt_tokens=10, max_output_tokens=10, samples=3, byok=True)
    (fee,) = [x for x in preview(card, "acme", [spec]).lines if x.unit is Unit.CALL]
    assert (fee.rate_uecu, fee.negotiated, fee.subtotal_uecu) == (120, True, 360)
    # globex negotiated the engine fee; with no BYOK fee on the card, BYOK calls pay it.
    assert preview(card, "globex", [spec]).total_uecu == 3 * 50
    split = parse_rate_card(card_text("engine_call_uecu = 200\nbyok_engine_call_uecu = 300", terms))
    assert preview(split, "globex", [spec]).total_uecu == 3 * 300


@pytest.mark.parametrize(
    ("fees", "path", "words"),
    [
        ("engine_call_uecu = 0\nbyok_engine_call_uecu = -1", "fees.byok_engine_call_uecu", ">= 0"),
        (
            "engine_call_uecu = 0\nbyok_engine_call_uecu = 2.5",
            "fees.byok_engine_call_uecu",
            "no decimals",
        ),
        ("byok_engine_call_uecu = 300", "fees.engine_call_uecu", "missing"),
        ("engine_call_uecu = 0\nbyok_engine_call = 1", "fees.byok_engine_call", "did you mean"),
    ],
)
def test_a_bad_byok_engine_fee_names_its_field(fees: str, path: str, words: str) -> None:
    with pytest.raises(RateCardError) as caught:
        parse_rate_card(card_text(fees))
    assert caught.value.path == path
    assert words in caught.value.problem


# -- BYOK models the card does not list --------------------------------------------------------

EXAMPLE = load_rate_card(Path(__file__).resolve().parent.parent / "ratecards" / "example.toml")
#: A customer's fine-tune on its own provider key: no card lists it.
CUSTOM = "acme/support-ft-v3"


@pytest.mark.parametrize("card", [EXAMPLE, SPLIT], ids=["engine-fee", "byok-engine-fee"])
def test_an_unlisted_byok_model_bills_only_the_platforms_engine_work(card: RateCard) -> None:
    assert card.model(CUSTOM) is None
    job = [
        InferenceSpec(
            CUSTOM, prompt_text="Classify this ticket.", max_output_tokens=300, byok=True
        ),
        JudgeSpec("acme/grader", calls=3, prompt_tokens_per_call=900, byok=True),
    ]
    quote = preview(card, "", job)
    engine = card.fees.engine_call_uecu
    if card.fees.byok_engine_call_uecu is not None:
        engine = card.fees.byok_engine_call_uecu
    assert quote.total_uecu == engine + 3 * (engine + card.fees.judge_call_uecu) > 0
    token_lines = [x for x in quote.lines if x.unit is Unit.TOKEN]
    assert [(x.model, x.rate_uecu, x.subtotal_uecu, x.byok) for x in token_lines] == [
        (CUSTOM, 0, 0, True),
        (CUSTOM, 0, 0, True),
        ("acme/grader", 0, 0, True),
        ("acme/grader", 0, 0, True),
    ]
    assert "not on the rate card" in token_lines[0].description
    # What the workers report for it is accepted and priced the same way.
    used = [
        UsageLine("inference", CUSTOM, tokens_in=12, tokens_out=300, calls=1, byok=True),
        UsageLine("judge", "acme/grader", tokens_in=2_700, tokens_out=90, calls=3, byok=True),
    ]
    assert price_usage(card, "", used).total_uecu == quote.total_uecu


def test_an_unlisted_model_without_byok_is_still_refused() -> None:
    for job, field in (
        ([InferenceSpec(CUSTOM, prompt_tokens=10)], "job.items[0].inference.model"),
        ([JudgeSpec(CUSTOM, prompt_tokens_per_call=10)], "job.items[0].judge.judge_model"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            preview(EXAMPLE, "", job)
        assert caught.value.field == field
        assert f"unknown model {CUSTOM!r}" in caught.value.description
        assert "byok" in caught.value.description
    with pytest.raises(InvalidArgument) as caught:
        price_usage(EXAMPLE, "", [UsageLine("inference", CUSTOM, tokens_in=1, calls=1)])
    assert caught.value.field == "usage[0].model"
    # A malformed name is refused whatever the key.
    with pytest.raises(InvalidArgument) as caught:
        preview(EXAMPLE, "", [InferenceSpec("acme ft", prompt_tokens=1, byok=True)])
    assert caught.value.field == "job.items[0].inference.model"


# -- chat-only models given a plain prompt ------------------------------------------------------

EXAMPLE_JOB = json.loads(
    (Path(__file__).resolve().parent.parent / "examples" / "job.json").read_text()
)


def sent_as_chat(text: str, encoding: str) -> int:
    """The prompt tokens a chat API bills for ``text`` sent as one user message (OpenAI's
    cookbook count, which tests/test_pricing_tokens.py checks against the API's figures)."""
    return tokens.count_messages([ChatMessage("user", text)], encoding)


@pytest.mark.parametrize("org", ["", "acme", "globex", "initech"])
def test_the_shipped_examples_plain_prompt_is_priced_as_the_chat_message_it_is_sent_as(
    org: str,
) -> None:
    body = EXAMPLE_JOB["items"][0]["inference"]
    spec = InferenceSpec(
        body["model"],
        prompt_text=body["promptText"],
        max_output_tokens=body["maxOutputTokens"],
        samples=body["samples"],
    )
    model = EXAMPLE.models[spec.model]
    assert model.chat_only
    sent = sent_as_chat(spec.prompt_text, model.encoding)
    # The framing: <|start|>user<|message|>…<|end|>, then the reply's priming.
    assert sent == tokens.count_text(spec.prompt_text, model.encoding) + 3 + 3 + 1
    used = [
        UsageLine(
            "inference",
            spec.model,
            tokens_in=spec.samples * sent,
            tokens_out=spec.samples * spec.max_output_tokens,
            calls=spec.samples,
        )
    ]
    worst = preview(EXAMPLE, org, [spec])
    assert worst.lines[0].quantity == spec.samples * sent
    assert worst.total_uecu == price_usage(EXAMPLE, org, used).total_uecu


def test_only_a_model_marked_chat_only_frames_a_plain_prompt() -> None:
    text = "Classify the ticket below as bug, question or feature request."
    plain = parse_rate_card(card_text("engine_call_uecu = 0"))
    chat = parse_rate_card(card_text("engine_call_uecu = 0").replace("[models.gpt-4o]", CHAT_ONLY))
    assert (plain.models["gpt-4o"].chat_only, chat.models["gpt-4o"].chat_only) == (False, True)
    spec = InferenceSpec("gpt-4o", prompt_text=text, max_output_tokens=1)
    raw = tokens.count_text(text, "o200k_base")
    assert preview(plain, "", [spec]).lines[0].quantity == raw
    assert preview(chat, "", [spec]).lines[0].quantity == sent_as_chat(text, "o200k_base")
    # Chat messages and known counts are priced as before on either.
    for card in (plain, chat):
        given = InferenceSpec("gpt-4o", prompt_tokens=raw, max_output_tokens=1)
        assert preview(card, "", [given]).lines[0].quantity == raw
        framed = InferenceSpec("gpt-4o", messages=[ChatMessage("user", text)], max_output_tokens=1)
        assert preview(card, "", [framed]).lines[0].quantity == sent_as_chat(text, "o200k_base")


CHAT_ONLY = "[models.gpt-4o]\nchat_only = true"


def test_a_chat_only_prompt_must_fit_the_context_window_as_a_message() -> None:
    card = parse_rate_card(card_text("engine_call_uecu = 0").replace("[models.gpt-4o]", CHAT_ONLY))
    window = card.models["gpt-4o"].context_window
    fits = " a" * (window - 7)  # " a" is one token: 7 tokens of framing fill the window
    assert (
        preview(card, "", [InferenceSpec("gpt-4o", prompt_text=fits)]).lines[0].quantity == window
    )
    with pytest.raises(InvalidArgument) as caught:
        preview(card, "", [InferenceSpec("gpt-4o", prompt_text=fits + " a")])
    assert caught.value.field == "job.items[0].inference.prompt_text"
    assert f"the prompt is {window + 1} tokens" in caught.value.description


@pytest.mark.parametrize("value", ["1", "'yes'", "1.0"])
def test_chat_only_is_a_boolean(value: str) -> None:
    text = card_text("engine_call_uecu = 0").replace(
        "[models.gpt-4o]", f"[models.gpt-4o]\nchat_only = {value}"
    )
    with pytest.raises(RateCardError) as caught:
        parse_rate_card(text)
    assert caught.value.path == "models.gpt-4o.chat_only"
    assert "true or false" in caught.value.problem


# -- a judge that reads the candidate's answer ---------------------------------------------------

ORGS = ["", "acme", "globex", "initech"]
LLAMA = "meta-llama/llama-3.1-70b-instruct"


@pytest.mark.parametrize("org", ORGS)
def test_a_judge_of_an_answer_reads_up_to_the_answers_max_output(org: str) -> None:
    answer = InferenceSpec("gpt-4o", prompt_tokens=800, max_output_tokens=1_500, samples=3)
    judge = JudgeSpec(
        "gpt-4o-mini",
        calls=3,
        prompt_tokens_per_call=400,
        max_output_tokens_per_call=50,
        answer_of_item=0,
    )
    # Every answer as long as allowed; each judge call reads the rubric and one answer.
    used = [
        UsageLine("inference", "gpt-4o", tokens_in=3 * 800, tokens_out=3 * 1_500, calls=3),
        UsageLine("judge", "gpt-4o-mini", tokens_in=3 * (400 + 1_500), tokens_out=150, calls=3),
    ]
    worst = preview(EXAMPLE, org, [answer, judge])
    assert worst.total_uecu == price_usage(EXAMPLE, org, used).total_uecu
    judge_in = next(x for x in worst.lines if x.item == "job.items[1].judge")
    assert judge_in.quantity == 3 * (400 + 1_500)
    assert "+ 1500 answer" in judge_in.description
    # The same bound given as a count, without naming the item.
    counted = replace(judge, answer_of_item=None, answer_max_tokens=1_500)
    assert preview(EXAMPLE, org, [answer, counted]).total_uecu == worst.total_uecu


def test_an_answers_bound_is_its_models_max_output_when_the_spec_leaves_it_at_0() -> None:
    answer = InferenceSpec("gpt-4o", prompt_tokens=10)
    judge = JudgeSpec("gpt-4o", prompt_tokens_per_call=10, answer_of_item=0)
    quote = preview(EXAMPLE, "", [answer, judge])
    judge_in = next(x for x in quote.lines if x.item == "job.items[1].judge")
    assert judge_in.quantity == 10 + EXAMPLE.models["gpt-4o"].max_output_tokens


def test_an_answer_in_another_tokenizer_is_scaled_by_the_judges_factor() -> None:
    sonnet = EXAMPLE.models["anthropic/claude-sonnet-4"]
    answer = InferenceSpec("gpt-4o", prompt_tokens=10, max_output_tokens=1_000)
    foreign = JudgeSpec(sonnet.name, prompt_tokens_per_call=100, answer_of_item=0)
    quote = preview(EXAMPLE, "", [answer, foreign])
    judge_in = next(x for x in quote.lines if x.item == "job.items[1].judge")
    assert judge_in.quantity == 100 + ceil_div(1_000 * sonnet.estimate_factor_percent, 100)
    # A judge reading its own model's answer reads it in its own tokens.
    own = [
        InferenceSpec(LLAMA, prompt_tokens=10, max_output_tokens=1_000),
        JudgeSpec(LLAMA, prompt_tokens_per_call=100, answer_of_item=0),
    ]
    judge_in = next(x for x in preview(EXAMPLE, "", own).lines if x.item == "job.items[1].judge")
    assert judge_in.quantity == 100 + 1_000


def test_what_a_judge_reads_is_bounded_by_its_context_window() -> None:
    turbo = EXAMPLE.models["gpt-4-turbo"]
    job = [
        InferenceSpec("gpt-4.1", prompt_tokens=10),  # up to 32,768 tokens of answer
        JudgeSpec(turbo.name, calls=2, prompt_tokens_per_call=100_000, answer_of_item=0),
    ]
    judge_in = next(x for x in preview(EXAMPLE, "", job).lines if x.item == "job.items[1].judge")
    assert judge_in.quantity == 2 * turbo.context_window


def test_gepa_judges_read_the_answer_of_their_iterations_inference() -> None:
    spec = GepaSpec(
        iterations=5,
        per_iteration=[
            InferenceSpec("gpt-4.1", prompt_tokens=3_000, max_output_tokens=1_000),
            JudgeSpec(
                "gpt-4o-mini",
                calls=4,
                prompt_tokens_per_call=1_500,
                max_output_tokens_per_call=100,
                answer_of_item=0,
            ),
        ],
    )
    used = [
        UsageLine("gepa_iteration", calls=5),
        UsageLine("inference", "gpt-4.1", tokens_in=5 * 3_000, tokens_out=5 * 1_000, calls=5),
        UsageLine("judge", "gpt-4o-mini", tokens_in=20 * 2_500, tokens_out=20 * 100, calls=20),
    ]
    for org in ORGS:
        assert (
            preview(EXAMPLE, org, [spec]).total_uecu == price_usage(EXAMPLE, org, used).total_uecu
        )


ANSWERED = InferenceSpec("gpt-4o", prompt_tokens=10, max_output_tokens=100)
RUBRIC = JudgeSpec("gpt-4o-mini", prompt_tokens_per_call=10)


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        (
            [ANSWERED, replace(RUBRIC, answer_of_item=2)],
            "job.items[1].judge.answer_of_item",
            "index of an inference item of job.items (0 to 1), got 2",
        ),
        (
            [ANSWERED, replace(RUBRIC, answer_of_item=-1)],
            "job.items[1].judge.answer_of_item",
            "got -1",
        ),
        (
            [ANSWERED, replace(RUBRIC, answer_of_item=True)],
            "job.items[1].judge.answer_of_item",
            "must be an integer",
        ),
        (
            [ANSWERED, replace(RUBRIC, answer_of_item=1)],
            "job.items[1].judge.answer_of_item",
            "job.items[1] is a judge run, not an inference",
        ),
        (
            [GepaSpec(2, [ANSWERED]), replace(RUBRIC, answer_of_item=0)],
            "job.items[1].judge.answer_of_item",
            "job.items[0] is a GEPA optimization, not an inference",
        ),
        (
            [ANSWERED, replace(RUBRIC, answer_of_item=0, answer_max_tokens=100)],
            "job.items[1].judge.answer",
            "at most one of answer_max_tokens, answer_of_item",
        ),
        (
            [replace(RUBRIC, answer_max_tokens=-5)],
            "job.items[0].judge.answer_max_tokens",
            "between 0",
        ),
        (
            [TraceEvalSpec(3, [replace(RUBRIC, answer_of_item=0)])],
            "job.items[0].trace_eval.judges[0].answer_of_item",
            "judges of a trace evaluation read traces",
        ),
        (
            [
                GepaSpec(
                    2, [replace(RUBRIC, answer_of_item=1), InferenceSpec("gpt-5", prompt_tokens=1)]
                )
            ],
            "job.items[0].gepa.per_iteration[1].inference.model",
            "unknown model 'gpt-5'",
        ),
    ],
)
def test_a_bad_answer_reference_names_its_field(job, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        preview(EXAMPLE, "", job)
    assert caught.value.field == field
    assert words in caught.value.description


# -- GEPA prompts that grow --------------------------------------------------------------------


def grown(base: int, growth: int, iterations: int, window: int) -> list[int]:
    """The prompt of each iteration when every reflection appends ``growth`` tokens to it."""
    return [min(base + i * growth, max(base, window)) for i in range(1, iterations + 1)]


@pytest.mark.parametrize("org", ORGS)
def test_a_gepa_prompt_that_grows_each_iteration_is_bounded(org: str) -> None:
    spec = GepaSpec(
        iterations=10,
        per_iteration=[
            InferenceSpec("gpt-4.1", prompt_tokens=3_000, max_output_tokens=1_000, samples=2),
            JudgeSpec("gpt-4o-mini", calls=4, prompt_tokens_per_call=1_500, answer_of_item=0),
        ],
        prompt_growth_tokens_per_iteration=250,
    )
    prompts = grown(3_000, 250, 10, EXAMPLE.models["gpt-4.1"].context_window)
    mini = EXAMPLE.models["gpt-4o-mini"].max_output_tokens
    used = [
        UsageLine("gepa_iteration", calls=10),
        UsageLine("inference", "gpt-4.1", 2 * sum(prompts), 2 * 10 * 1_000, 2 * 10),
        # The judges read the candidate's answers; their rubric does not grow.
        UsageLine("judge", "gpt-4o-mini", 40 * (1_500 + 1_000), 40 * mini, 40),
    ]
    worst = preview(EXAMPLE, org, [spec])
    assert worst.total_uecu == price_usage(EXAMPLE, org, used).total_uecu
    prompt_line = next(x for x in worst.lines if x.item.endswith("per_iteration[0].inference"))
    assert prompt_line.quantity == 2 * sum(prompts)
    assert "+ 250 per iteration" in prompt_line.description
    # Without the growth the same job was previewed below what its workers report.
    flat = replace(spec, prompt_growth_tokens_per_iteration=0)
    assert preview(EXAMPLE, org, [flat]).total_uecu < worst.total_uecu


def test_growth_stops_at_the_models_context_window() -> None:
    turbo = EXAMPLE.models["gpt-4-turbo"]
    spec = GepaSpec(
        iterations=6,
        per_iteration=[InferenceSpec(turbo.name, prompt_tokens=100_000, max_output_tokens=1)],
        prompt_growth_tokens_per_iteration=10_000,
    )
    prompts = grown(100_000, 10_000, 6, turbo.context_window)
    assert prompts == [110_000, 120_000, 128_000, 128_000, 128_000, 128_000]
    assert preview(EXAMPLE, "", [spec]).lines[1].quantity == sum(prompts)
    # A growth as large as a count may be is bounded the same way (and fits an int64).
    huge = replace(spec, prompt_growth_tokens_per_iteration=2**53 - 1)
    assert preview(EXAMPLE, "", [huge]).lines[1].quantity == 6 * turbo.context_window


def test_an_estimated_prompt_grows_from_its_estimate() -> None:
    sonnet = EXAMPLE.models["anthropic/claude-sonnet-4"]
    text = "Rewrite the instruction so the assistant cites its sources. " * 20
    estimate = preview(EXAMPLE, "", [InferenceSpec(sonnet.name, prompt_text=text)]).lines[0]
    spec = GepaSpec(
        3, [InferenceSpec(sonnet.name, prompt_text=text)], prompt_growth_tokens_per_iteration=40
    )
    line = preview(EXAMPLE, "", [spec]).lines[1]
    assert line.quantity == sum(grown(estimate.quantity, 40, 3, sonnet.context_window))


@pytest.mark.parametrize(
    ("growth", "words"), [(-1, "between 0"), (1.5, "integer"), (True, "integer")]
)
def test_a_bad_growth_names_its_field(growth: object, words: str) -> None:
    spec = GepaSpec(2, [ANSWERED], prompt_growth_tokens_per_iteration=growth)
    with pytest.raises(InvalidArgument) as caught:
        preview(EXAMPLE, "", [spec])
    assert caught.value.field == "job.items[0].gepa.prompt_growth_tokens_per_iteration"
    assert words in caught.value.description


# -- the shipped example, end to end -----------------------------------------------------------


def example_usage() -> list[UsageLine]:
    """What the workers of examples/job.json report when every call uses all it may: derived
    by hand from the JSON (the provider's counts of what is sent), not by the pricer."""
    inference, judge, gepa, trace_eval = (
        next(iter(item.values())) for item in EXAMPLE_JOB["items"]
    )
    enc = EXAMPLE.models[inference["model"]].encoding
    answer = inference["maxOutputTokens"]
    rubric = tokens.count_messages(
        [ChatMessage(m["role"], m["content"]) for m in judge["messages"]["messages"]],
        EXAMPLE.models[judge["judgeModel"]].encoding,
    )
    n, k = inference["samples"], gepa["iterations"]
    rollout, grader = (next(iter(step.values())) for step in gepa["perIteration"])
    growth = gepa["promptGrowthTokensPerIteration"]
    sonnet, llama = trace_eval["judges"]
    t = trace_eval["traces"]
    return [
        UsageLine(
            "inference", "gpt-4o", n * sent_as_chat(inference["promptText"], enc), n * answer, n
        ),
        UsageLine(
            "judge",
            "gpt-4o-mini",
            judge["calls"] * (rubric + answer),
            judge["calls"] * judge["maxOutputTokensPerCall"],
            judge["calls"],
        ),
        UsageLine("gepa_iteration", calls=k),
        UsageLine(
            "inference",
            "gpt-4.1",
            sum(rollout["promptTokens"] + i * growth for i in range(1, k + 1)),
            k * rollout["maxOutputTokens"],
            k,
        ),
        UsageLine(
            "judge",
            "gpt-4o-mini",
            k * grader["calls"] * (grader["promptTokensPerCall"] + rollout["maxOutputTokens"]),
            k * grader["calls"] * grader["maxOutputTokensPerCall"],
            k * grader["calls"],
        ),
        UsageLine("trace", calls=t),
        UsageLine(
            "judge",
            sonnet["judgeModel"],
            t * sonnet["promptTokensPerCall"],
            t * sonnet["maxOutputTokensPerCall"],
            t,
        ),
        UsageLine(
            "judge",
            llama["judgeModel"],
            t * llama["calls"] * llama["promptTokensPerCall"],
            t * llama["calls"] * llama["maxOutputTokensPerCall"],
            t * llama["calls"],
            byok=True,
        ),
    ]


@pytest.mark.parametrize("org", ORGS)
def test_the_shipped_example_bounds_what_its_workers_report(org: str) -> None:
    from google.protobuf.json_format import ParseDict

    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.convert import job_from_pb

    job = job_from_pb(ParseDict(EXAMPLE_JOB, pb.JobSpec()))
    worst = preview(EXAMPLE, org, job)
    assert worst.total_uecu == price_usage(EXAMPLE, org, example_usage()).total_uecu
