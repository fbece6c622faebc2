"""Pricing: the rate card, offline token estimation, worst-case previews and usage prices.

Pure Python (no gRPC, no Redis). See docs/pricing.md.
"""

from ecu_sidecar.pricing.pricer import (
    GepaSpec,
    InferenceSpec,
    JobItem,
    JobSpec,
    JudgeSpec,
    Line,
    Quote,
    TraceEvalSpec,
    Unit,
    UsageKind,
    UsageLine,
    preview,
    price_usage,
)
from ecu_sidecar.pricing.ratecard import (
    FeeOverride,
    Fees,
    ModelOverride,
    ModelRates,
    OrganizationTerms,
    RateCard,
    RateCardError,
    load_rate_card,
    parse_rate_card,
)
from ecu_sidecar.pricing.registry import NoRateCard, RateCardRegistry, UnknownRateCardVersion
from ecu_sidecar.pricing.tokens import ChatMessage, EncodingDataError, count_messages, count_text

__all__ = [
    "ChatMessage",
    "EncodingDataError",
    "FeeOverride",
    "Fees",
    "GepaSpec",
    "InferenceSpec",
    "JobItem",
    "JobSpec",
    "JudgeSpec",
    "Line",
    "ModelOverride",
    "ModelRates",
    "NoRateCard",
    "OrganizationTerms",
    "Quote",
    "RateCard",
    "RateCardError",
    "RateCardRegistry",
    "TraceEvalSpec",
    "Unit",
    "UnknownRateCardVersion",
    "UsageKind",
    "UsageLine",
    "count_messages",
    "count_text",
    "load_rate_card",
    "parse_rate_card",
    "preview",
    "price_usage",
]
