"""The rate card registry: atomic swaps, immutable versions, pinned versions, change detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ecu_sidecar.pricing import (
    InferenceSpec,
    RateCardError,
    RateCardRegistry,
    UnknownRateCardVersion,
    UsageLine,
    preview,
    price_usage,
)
from ecu_sidecar.pricing.registry import NoRateCard

EXAMPLE = Path(__file__).resolve().parent.parent / "ratecards" / "example.toml"
EXAMPLE_TEXT = EXAMPLE.read_text()
OLD_VERSION = 'version = "2026-11-27.1"'


def card_text(version: str, gpt4o_input: int = 2_500_000) -> str:
    assert OLD_VERSION in EXAMPLE_TEXT
    text = EXAMPLE_TEXT.replace(OLD_VERSION, f'version = "{version}"')
    old_rate = "input_uecu_per_mtok = 2_500_000"
    assert old_rate in text
    return text.replace(old_rate, f"input_uecu_per_mtok = {gpt4o_input}", 1)


_tick = [1_700_000_000_000_000_000]


def write(path: Path, text: str) -> None:
    """Write and give the file a new, distinct mtime (no sleeping for the clock to move)."""
    path.write_text(text)
    _tick[0] += 1_000_000_000
    os.utime(path, ns=(_tick[0], _tick[0]))


@pytest.fixture
def card_file(tmp_path: Path) -> Path:
    path = tmp_path / "rates.toml"
    write(path, card_text("v1"))
    return path


def test_from_file_serves_the_card(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    assert registry.current.version == "v1"
    assert registry.get("v1") is registry.current
    assert registry.versions() == ("v1",)
    assert registry.path == str(card_file)
    assert (registry.reloads_ok, registry.reloads_failed) == (1, 0)


def test_empty_registry() -> None:
    registry = RateCardRegistry()
    with pytest.raises(NoRateCard):
        _ = registry.current
    with pytest.raises(NoRateCard):
        registry.reload()
    assert registry.maybe_reload() is None


def test_an_invalid_first_card_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rates.toml"
    write(path, card_text("v1", gpt4o_input=-1))
    with pytest.raises(RateCardError) as caught:
        RateCardRegistry.from_file(path)
    assert caught.value.path == "models.gpt-4o.input_uecu_per_mtok"


def test_an_invalid_card_never_replaces_a_valid_one(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    good = registry.current
    write(card_file, card_text("v2").replace('encoding = "o200k_base"', 'encoding = "o300k"', 1))
    with pytest.raises(RateCardError) as caught:
        registry.reload()
    assert caught.value.path == "models.gpt-4o.encoding"
    assert registry.current is good
    assert registry.versions() == ("v1",)
    assert (registry.reloads_ok, registry.reloads_failed) == (1, 1)
    assert registry.last_error is caught.value
    # It keeps pricing with the good card.
    quote = preview(registry.current, "", [InferenceSpec("gpt-4o", prompt_tokens=10)])
    assert quote.rate_card_version == "v1"


def test_a_version_is_immutable(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    write(card_file, card_text("v1", gpt4o_input=1))
    with pytest.raises(RateCardError) as caught:
        registry.reload()
    assert caught.value.path == "version"
    assert "already loaded with different content" in caught.value.problem
    assert registry.current.models["gpt-4o"].input_uecu_per_mtok == 2_500_000


def test_same_version_same_content_is_not_a_change(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    first = registry.current
    write(card_file, "# reformatted, same prices\n" + card_text("v1"))
    assert registry.maybe_reload() is None
    assert registry.reload() is first
    assert registry.reloads_failed == 0


def test_older_versions_stay_retrievable_after_a_reload(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    pinned = registry.current.version  # a reservation priced under v1 pins "v1"
    write(card_file, card_text("v2", gpt4o_input=9_000_000))
    assert registry.reload().version == "v2"
    assert registry.current.version == "v2"
    assert registry.versions() == ("v1", "v2")

    usage = [UsageLine("inference", "gpt-4o", tokens_in=1_000_000, calls=0)]
    old = price_usage(registry.get(pinned), "", usage)
    new = price_usage(registry.current, "", usage)
    assert old.rate_card_version == "v1"
    assert old.total_uecu == registry.get("v1").models["gpt-4o"].input_uecu_per_mtok
    assert new.rate_card_version == "v2"
    assert new.total_uecu == 9_000_000


def test_unknown_version(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    with pytest.raises(UnknownRateCardVersion) as caught:
        registry.get("v0")
    assert caught.value.reason == "RATE_CARD_VERSION_UNKNOWN"
    assert "loaded: v1" in caught.value.message


def test_rollback_to_an_older_version(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    write(card_file, card_text("v2", gpt4o_input=1))
    registry.reload()
    write(card_file, card_text("v1"))
    assert registry.reload().version == "v1"
    assert registry.current is registry.get("v1")


def test_maybe_reload_follows_the_file(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    assert registry.maybe_reload() is None  # unchanged

    write(card_file, card_text("v2"))
    assert registry.maybe_reload().version == "v2"
    assert registry.maybe_reload() is None

    # A bad file is reported once, then quietly ignored until it changes again.
    write(card_file, card_text("v3").replace("[fees]", "[fess]"))
    with pytest.raises(RateCardError, match="fess"):
        registry.maybe_reload()
    assert registry.maybe_reload() is None
    assert registry.current.version == "v2"
    assert registry.reloads_failed == 1

    write(card_file, card_text("v3"))
    assert registry.maybe_reload().version == "v3"
    assert registry.last_error is None
    assert (registry.reloads_ok, registry.reloads_failed) == (3, 1)


def test_maybe_reload_survives_a_missing_file(card_file: Path) -> None:
    registry = RateCardRegistry.from_file(card_file)
    card_file.unlink()
    with pytest.raises(RateCardError, match="cannot read the file"):
        registry.maybe_reload()
    assert registry.maybe_reload() is None  # reported once
    assert registry.current.version == "v1"
    write(card_file, card_text("v2"))
    assert registry.maybe_reload().version == "v2"


def test_maybe_reload_detects_a_same_size_same_mtime_rewrite_only_on_reload(
    card_file: Path,
) -> None:
    # The cheap check looks at (mtime, size, inode); reload() always reads the file.
    registry = RateCardRegistry.from_file(card_file)
    st = card_file.stat()
    card_file.write_text(card_text("v9"))  # same length as "v1"
    os.utime(card_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert registry.maybe_reload() is None
    assert registry.reload().version == "v9"


def test_register_keeps_an_archived_version_without_serving_it(
    card_file: Path, tmp_path: Path
) -> None:
    archived = tmp_path / "v0.toml"
    write(archived, card_text("v0", gpt4o_input=1_000))
    registry = RateCardRegistry.from_file(card_file)
    registry.register(archived)
    assert registry.current.version == "v1"
    assert registry.get("v0").models["gpt-4o"].input_uecu_per_mtok == 1_000
    assert registry.path == str(card_file)


def test_a_failed_load_of_another_path_keeps_the_watched_file(
    card_file: Path, tmp_path: Path
) -> None:
    registry = RateCardRegistry.from_file(card_file)
    with pytest.raises(RateCardError):
        registry.load(tmp_path / "missing.toml")
    assert registry.path == str(card_file)
    assert registry.current.version == "v1"
    assert registry.reloads_failed == 1
