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
An unknown model is refused, never priced as zero, unless it runs on the customer's own key
(BYOK: its tokens are free, the platform's fees are billed).

This module is the pricer's public face; each part lives in the module that owns it:
``spec`` (job specs and usage lines), ``lines`` (one priced line: rates, BYOK, negotiated
terms, the discount; the quote), ``worst_case`` (``preview``) and ``usage`` (``price_usage``).
"""

from __future__ import annotations

from ecu_sidecar.pricing.lines import PER_CALL, PER_MTOK, Line, Quote, Unit
from ecu_sidecar.pricing.spec import (
    MAX_LIST_ITEMS,
    GepaSpec,
    InferenceSpec,
    JobItem,
    JobSpec,
    JudgeSpec,
    Message,
    TraceEvalSpec,
    UsageKind,
    UsageLine,
)
from ecu_sidecar.pricing.tokens import ChatMessage
from ecu_sidecar.pricing.usage import price_usage
from ecu_sidecar.pricing.worst_case import preview

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
    "Message",
    "Quote",
    "TraceEvalSpec",
    "Unit",
    "UsageKind",
    "UsageLine",
    "preview",
    "price_usage",
]
