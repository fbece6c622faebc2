"""The preview against what real evaluation workers do and report (issue 16).

Each test builds the usage a worker would report for a job — the provider's token counts, every
call, every answer as long as its bound allows — prices it, and checks that the job's preview
is at least that price: a judge reading the candidate's answer, GEPA prompts that grow,
chat-only models given a plain prompt, BYOK models the card does not list, the engine fee of
BYOK calls. Expected figures are derived from the card's values, never pasted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.pricing import (
    InferenceSpec,
    JudgeSpec,
    RateCard,
    RateCardError,
    Unit,
    UsageLine,
    load_rate_card,
    parse_rate_card,
    preview,
    price_usage,
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
