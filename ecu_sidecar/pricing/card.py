"""The rate card's types: one validated, immutable version of the card (``RateCard``), its
models' rates and platform fees, an organization's negotiated terms, and ``RateCardError``.

Every amount is an integer number of µECU; token rates are µECU per 1,000,000 tokens. Reading
and validating the TOML file that holds a card is ``ratecard``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "FeeOverride",
    "Fees",
    "ModelOverride",
    "ModelRates",
    "OrganizationTerms",
    "RateCard",
    "RateCardError",
]


class RateCardError(ValueError):
    """A rate card is unreadable or invalid: which file, which field, what is wrong."""

    def __init__(self, file: str, path: str, problem: str, line: int | None = None) -> None:
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        """The file the card was read from (or ``<string>``)."""
        self.path = path
        """Dotted path to the field, e.g. ``models.gpt-4o.input_uecu_per_mtok``; may be empty."""
        self.problem = problem
        """What is wrong, in words."""
        self.line = line
        """1-based line of the problem when the TOML parser reported one."""


@dataclass(frozen=True, slots=True)
class ModelRates:
    """What one model costs and how to estimate its tokens."""

    name: str
    input_uecu_per_mtok: int
    """µECU per 1,000,000 prompt tokens."""
    output_uecu_per_mtok: int
    """µECU per 1,000,000 completion tokens."""
    encoding: str
    """tiktoken encoding used to estimate prompt tokens (cl100k_base or o200k_base)."""
    context_window: int
    """Most prompt tokens the model accepts."""
    max_output_tokens: int
    """Most completion tokens one call may produce; the worst case when a spec says 0."""
    estimate_factor_percent: int = 100
    """Estimated prompt tokens are multiplied by this / 100 (≥ 100, for other tokenizers)."""
    chat_only: bool = False
    """The model is only reached through a chat API: a plain prompt text is sent, and billed,
    as one user message, so it is counted with that message's framing."""


@dataclass(frozen=True, slots=True)
class Fees:
    """Platform fees, each µECU per unit."""

    engine_call_uecu: int
    """Every model call (inference sample or judge call); BYOK calls too, unless
    ``byok_engine_call_uecu`` is set."""
    judge_call_uecu: int
    """Every judge call, on top of the judge model's tokens and the engine fee."""
    gepa_iteration_uecu: int
    """Every GEPA iteration, on top of the calls the iteration makes."""
    trace_uecu: int
    """Every trace evaluated, on top of the judge calls on it."""
    byok_engine_call_uecu: int | None = None
    """Every BYOK model call, instead of ``engine_call_uecu`` (None: BYOK calls pay that one).
    Lets a card bill the engine work of BYOK calls, whose tokens it does not sell, without a
    per-call fee on public-model calls (``engine_call_uecu = 0``)."""


@dataclass(frozen=True, slots=True)
class ModelOverride:
    """Negotiated token rates of one model for one organization (None: the card's rate)."""

    input_uecu_per_mtok: int | None = None
    output_uecu_per_mtok: int | None = None


@dataclass(frozen=True, slots=True)
class FeeOverride:
    """Negotiated platform fees for one organization (None: the card's fee)."""

    engine_call_uecu: int | None = None
    judge_call_uecu: int | None = None
    gepa_iteration_uecu: int | None = None
    trace_uecu: int | None = None
    byok_engine_call_uecu: int | None = None


_NO_MODELS: Mapping[str, ModelOverride] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OrganizationTerms:
    """An organization's enterprise terms; the default is the plain card."""

    organization: str = ""
    discount_percent: int = 0
    """Volume discount on every line whose rate is not negotiated (0-100)."""
    models: Mapping[str, ModelOverride] = field(default_factory=lambda: _NO_MODELS)
    fees: FeeOverride = field(default_factory=FeeOverride)


@dataclass(frozen=True, slots=True)
class RateCard:
    """One validated, immutable version of the rate card."""

    version: str
    fees: Fees
    models: Mapping[str, ModelRates]
    organizations: Mapping[str, OrganizationTerms]
    description: str = ""
    source: str = field(default="", compare=False)
    """The file it was loaded from."""
    fingerprint: str = field(default="", compare=False)
    """SHA-256 of the card's content (comments and layout excluded): same content, same value."""

    def model(self, name: str) -> ModelRates | None:
        """The model's rates, or None when the card does not list it."""
        return self.models.get(name)

    def terms(self, organization: str) -> OrganizationTerms:
        """The organization's enterprise terms, or the plain card's when it has none."""
        terms = self.organizations.get(organization)
        return terms if terms is not None else OrganizationTerms(organization)

    def encodings(self) -> frozenset[str]:
        """The tiktoken encodings this card's models use."""
        return frozenset(m.encoding for m in self.models.values())
