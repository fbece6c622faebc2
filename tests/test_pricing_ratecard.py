"""Rate card loading: the example card, and a precise error for every kind of broken card."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecu_sidecar.pricing.ratecard import (
    MAX_RATE_UECU,
    RateCardError,
    load_rate_card,
    parse_rate_card,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "ratecards" / "example.toml"

BASE = """\
version = "v1"

[fees]
engine_call_uecu = 200
judge_call_uecu = 1_000
gepa_iteration_uecu = 50_000
trace_uecu = 500

[models.gpt-4o]
input_uecu_per_mtok = 2_500_000
output_uecu_per_mtok = 10_000_000
encoding = "o200k_base"
context_window = 128_000
max_output_tokens = 16_384

[models."gpt-4.1"]
input_uecu_per_mtok = 2_000_000
output_uecu_per_mtok = 8_000_000
encoding = "o200k_base"
context_window = 1_000_000
max_output_tokens = 32_768

[organizations.acme]
discount_percent = 10

[organizations.acme.models.gpt-4o]
input_uecu_per_mtok = 2_000_000
"""


def replace(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def append(text: str) -> str:
    return BASE + "\n" + text


RATE = "input_uecu_per_mtok = 2_500_000"
RATE_PATH = "models.gpt-4o.input_uecu_per_mtok"

#: (case id, card text, expected error path, expected words in the problem)
BROKEN = [
    ("negative rate", replace(RATE, "input_uecu_per_mtok = -1"), RATE_PATH, ">= 0, got -1"),
    ("float rate", replace(RATE, "input_uecu_per_mtok = 2.5"), RATE_PATH, "a float (2.5)"),
    ("exponent rate", replace(RATE, "input_uecu_per_mtok = 1e6"), RATE_PATH, "float"),
    ("nan rate", replace(RATE, "input_uecu_per_mtok = nan"), RATE_PATH, "nan (not a number)"),
    ("inf rate", replace(RATE, "input_uecu_per_mtok = inf"), RATE_PATH, "inf (infinity)"),
    ("-inf rate", replace(RATE, "input_uecu_per_mtok = -inf"), RATE_PATH, "-inf (infinity)"),
    ("bool rate", replace(RATE, "input_uecu_per_mtok = true"), RATE_PATH, "a boolean (true)"),
    ("string rate", replace(RATE, 'input_uecu_per_mtok = "100"'), RATE_PATH, "a string ('100')"),
    ("array rate", replace(RATE, "input_uecu_per_mtok = [1]"), RATE_PATH, "an array"),
    (
        "huge rate",
        replace(RATE, f"input_uecu_per_mtok = {MAX_RATE_UECU + 1}"),
        RATE_PATH,
        f"at most {MAX_RATE_UECU}",
    ),
    ("missing rate", replace(RATE + "\n", ""), RATE_PATH, "missing: an integer number of uECU"),
    (
        "missing output rate",
        replace("output_uecu_per_mtok = 10_000_000\n", ""),
        "models.gpt-4o.output_uecu_per_mtok",
        "missing",
    ),
    (
        "misspelt key",
        replace(RATE, "input_uecu_per_mtk = 2_500_000"),
        "models.gpt-4o.input_uecu_per_mtk",
        "unknown key",
    ),
    ("missing version", replace('version = "v1"\n', ""), "version", "missing: a string"),
    ("integer version", replace('version = "v1"', "version = 1"), "version", "must be a string"),
    ("bad version", replace('version = "v1"', 'version = "v 1"'), "version", "letters, digits"),
    ("empty version", replace('version = "v1"', 'version = ""'), "version", "1-64 characters"),
    ("unknown top key", 'colour = "blue"\n' + BASE, "colour", "unknown key"),
    ("misspelt fees table", replace("[fees]", "[feez]"), "feez", "did you mean 'fees'?"),
    (
        "missing fees table",
        BASE.split("[fees]")[0] + "[models" + BASE.split("[models", 1)[1],
        "fees",
        "missing: the [fees] table is required",
    ),
    ("missing fee", replace("trace_uecu = 500\n", ""), "fees.trace_uecu", "missing"),
    ("negative fee", replace("trace_uecu = 500", "trace_uecu = -5"), "fees.trace_uecu", ">= 0"),
    ("float fee", replace("trace_uecu = 500", "trace_uecu = 0.5"), "fees.trace_uecu", "float"),
    (
        "unknown fee",
        replace("trace_uecu = 500", "trace_uecu = 500\ntrace_fee = 1"),
        "fees.trace_fee",
        "unknown key",
    ),
    (
        "duplicate model",
        append('[models."gpt-4o"]\ninput_uecu_per_mtok = 1\n'),
        "models.gpt-4o",
        "duplicate model: defined twice (line",
    ),
    (
        "duplicate key",
        replace(RATE, RATE + "\ninput_uecu_per_mtok = 3"),
        RATE_PATH,
        "duplicate key: defined twice (line 11",
    ),
    (
        "duplicate model by case",
        append(
            "[models.GPT-4o]\ninput_uecu_per_mtok = 1\noutput_uecu_per_mtok = 1\n"
            'encoding = "o200k_base"\ncontext_window = 10\nmax_output_tokens = 10\n'
        ),
        "models.GPT-4o",
        "duplicate model: same name as models.gpt-4o except for letter case",
    ),
    (
        "unknown encoding",
        replace('encoding = "o200k_base"', 'encoding = "o200k"'),
        "models.gpt-4o.encoding",
        "unknown encoding 'o200k' (shipped: cl100k_base, o200k_base); did you mean 'o200k_base'?",
    ),
    (
        "non-string encoding",
        replace('encoding = "o200k_base"', "encoding = 200"),
        "models.gpt-4o.encoding",
        "must be a string",
    ),
    (
        "model name with a space",
        replace("[models.gpt-4o]", '[models."gpt 4o"]'),
        'models."gpt 4o"',
        "invalid model name 'gpt 4o'",
    ),
    (
        "model name with a brace",
        replace("[models.gpt-4o]", '[models."gpt{4o}"]'),
        'models."gpt{4o}"',
        "invalid model name",
    ),
    (
        "quoted model path",
        replace("context_window = 1_000_000", "context_window = 0"),
        'models."gpt-4.1".context_window',
        ">= 1, got 0",
    ),
    (
        "max output over the window",
        replace("max_output_tokens = 16_384", "max_output_tokens = 200_000"),
        "models.gpt-4o.max_output_tokens",
        "at most context_window (128000)",
    ),
    (
        "factor under 100",
        replace(RATE, RATE + "\nestimate_factor_percent = 90"),
        "models.gpt-4o.estimate_factor_percent",
        ">= 100, got 90",
    ),
    (
        "factor as float",
        replace(RATE, RATE + "\nestimate_factor_percent = 1.25"),
        "models.gpt-4o.estimate_factor_percent",
        "must be an integer percentage",
    ),
    (
        "model not a table",
        replace("[models.gpt-4o]", "[models]\ngpt-4o = 5\n[models.other]"),
        "models.gpt-4o",
        "must be a table",
    ),
    ("no models", replace("[models.gpt-4o]", "[modelz.gpt-4o]"), "modelz", "unknown key"),
    (
        "empty models",
        'version = "v1"\nmodels = {}\n[fees]\nengine_call_uecu = 0\njudge_call_uecu = 0\n'
        "gepa_iteration_uecu = 0\ntrace_uecu = 0\n",
        "models",
        "at least one model",
    ),
    (
        "models missing",
        'version = "v1"\n[fees]\nengine_call_uecu = 0\njudge_call_uecu = 0\n'
        "gepa_iteration_uecu = 0\ntrace_uecu = 0\n",
        "models",
        "missing",
    ),
    (
        "override of an unknown model",
        replace("[organizations.acme.models.gpt-4o]", "[organizations.acme.models.gpt-5]"),
        "organizations.acme.models.gpt-5",
        "unknown model 'gpt-5'",
    ),
    (
        "override with a misspelt rate",
        replace(
            "[organizations.acme.models.gpt-4o]\ninput", "[organizations.acme.models.gpt-4o]\nimput"
        ),
        "organizations.acme.models.gpt-4o.imput_uecu_per_mtok",
        "did you mean 'input_uecu_per_mtok'?",
    ),
    (
        "override without a rate",
        replace(
            "[organizations.acme.models.gpt-4o]\ninput_uecu_per_mtok = 2_000_000\n",
            "[organizations.acme.models.gpt-4o]\n",
        ),
        "organizations.acme.models.gpt-4o",
        "declares no rate",
    ),
    (
        "negative override",
        replace("gpt-4o]\ninput_uecu_per_mtok = 2_000_000", "gpt-4o]\ninput_uecu_per_mtok = -2"),
        "organizations.acme.models.gpt-4o.input_uecu_per_mtok",
        ">= 0",
    ),
    (
        "bad organization id",
        replace("[organizations.acme]", '[organizations."acme corp"]').replace(
            "[organizations.acme.models", '[organizations."acme corp".models'
        ),
        'organizations."acme corp"',
        "invalid organization id 'acme corp'",
    ),
    (
        "organization id with a colon",
        append('[organizations."a:b"]\ndiscount_percent = 1\n'),
        'organizations."a:b"',
        "invalid organization id",
    ),
    (
        "discount over 100",
        replace("discount_percent = 10", "discount_percent = 101"),
        "organizations.acme.discount_percent",
        "at most 100, got 101",
    ),
    (
        "fractional discount",
        replace("discount_percent = 10", "discount_percent = 12.5"),
        "organizations.acme.discount_percent",
        "a float (12.5)",
    ),
    (
        "unknown organization key",
        replace("discount_percent = 10", "discount = 10"),
        "organizations.acme.discount",
        "did you mean 'discount_percent'?",
    ),
    (
        "unknown organization fee",
        append("[organizations.acme.fees]\nengine_uecu = 1\n"),
        "organizations.acme.fees.engine_uecu",
        "unknown key",
    ),
    (
        "organization without terms",
        append("[organizations.empty]\n"),
        "organizations.empty",
        "declares no terms",
    ),
    ("not TOML", replace('version = "v1"', "version = "), "", "is not valid TOML"),
]


@pytest.mark.parametrize(
    ("text", "path", "words"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_broken_card_error_names_file_path_and_problem(
    tmp_path: Path, text: str, path: str, words: str
) -> None:
    file = tmp_path / "card.toml"
    file.write_text(text)
    with pytest.raises(RateCardError) as caught:
        load_rate_card(file)
    error = caught.value
    assert error.file == str(file)
    assert error.path == path
    assert words in error.problem
    assert str(error).startswith(f"{file}: {path + ': ' if path else ''}")


def test_base_card_is_valid() -> None:
    card = parse_rate_card(BASE)
    assert card.version == "v1"
    assert card.terms("acme").models["gpt-4o"].input_uecu_per_mtok == 2_000_000


def test_duplicate_key_error_carries_the_line() -> None:
    with pytest.raises(RateCardError) as caught:
        parse_rate_card(replace(RATE, RATE + "\ninput_uecu_per_mtok = 3"), "card.toml")
    assert caught.value.line == 11


def test_not_utf8(tmp_path: Path) -> None:
    file = tmp_path / "card.toml"
    file.write_bytes(b'version = "\xff"\n')
    with pytest.raises(RateCardError, match="is not UTF-8"):
        load_rate_card(file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RateCardError, match="cannot read the file") as caught:
        load_rate_card(tmp_path / "nope.toml")
    assert caught.value.path == ""


def test_example_card_loads() -> None:
    card = load_rate_card(EXAMPLE)
    assert card.source == str(EXAMPLE)
    assert card.version
    assert {"cl100k_base", "o200k_base"} == card.encodings()
    assert set(card.organizations) == {"acme", "globex", "initech"}
    sonnet = card.models["anthropic/claude-sonnet-4"]
    assert sonnet.estimate_factor_percent > 100
    assert card.models["gpt-4o"].estimate_factor_percent == 100  # the default
    for model in card.models.values():
        assert isinstance(model.input_uecu_per_mtok, int)
        assert model.max_output_tokens <= model.context_window
    assert card.terms("nobody").discount_percent == 0
    assert card.terms("nobody").models == {}


def test_fingerprint_ignores_comments_and_layout() -> None:
    plain = parse_rate_card(BASE)
    commented = parse_rate_card("# a comment\n" + BASE.replace("2_500_000", "2500000  # 2.5 ECU"))
    changed = parse_rate_card(BASE.replace("2_500_000", "2_500_001"))
    assert plain.fingerprint == commented.fingerprint
    assert plain == commented
    assert plain.fingerprint != changed.fingerprint


def test_the_documented_example_is_the_shipped_one() -> None:
    doc = (EXAMPLE.parent.parent / "docs" / "pricing.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    assert block == EXAMPLE.read_text()
