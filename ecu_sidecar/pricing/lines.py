"""One priced line and the quote they add up to: the card's rate or the organization's
negotiated one, BYOK, and the organization's discount.

Every line is ``ceil(quantity × rate / per)`` (per = 1,000,000 for tokens, 1 for calls,
iterations and traces), then the discount if the line's rate is not negotiated:
``ceil(gross × (100 − discount) / 100)``. Integer arithmetic only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import MAX_REQUEST_UECU, JobType
from ecu_sidecar.pricing.card import ModelRates, OrganizationTerms, RateCard

__all__ = [
    "PER_CALL",
    "PER_MTOK",
    "Line",
    "Pricer",
    "Quote",
    "Unit",
    "ceil_div",
    "check_total",
]

#: Token rates are per this many tokens.
PER_MTOK = 1_000_000
#: Fees are per one call, iteration or trace.
PER_CALL = 1
_INT64_MAX = 2**63 - 1


class Unit(enum.StrEnum):
    """What a line's quantity counts."""

    TOKEN = "token"
    CALL = "call"
    ITERATION = "iteration"
    TRACE = "trace"


@dataclass(frozen=True, slots=True)
class Line:
    """One priced line of a quote."""

    description: str
    quantity: int
    unit: Unit
    rate_uecu: int
    """µECU per ``per`` units after BYOK and negotiated rates (before the discount)."""
    per: int
    """1,000,000 for tokens, 1 for calls, iterations and traces."""
    subtotal_uecu: int
    """What the line costs: gross − discount."""
    model: str
    job_type: JobType
    item: str = ""
    """The spec item it prices (``job.items[0].gepa.per_iteration[1].judge``), or the first
    usage line of the aggregate it prices (``usage[3]``)."""
    byok: bool = False
    negotiated: bool = False
    """The rate is the organization's negotiated one: no discount applies."""
    gross_uecu: int = 0
    """ceil(quantity × rate / per)."""
    discount_uecu: int = 0


@dataclass(frozen=True, slots=True)
class Quote:
    """A priced job or usage: the total, its breakdown, and the card version that priced it."""

    total_uecu: int
    lines: tuple[Line, ...]
    rate_card_version: str


# ------------------------------------------------------------------------------- line pricing


def ceil_div(numerator: int, denominator: int) -> int:
    """numerator / denominator, rounded up, in integers."""
    return -(-numerator // denominator)


@dataclass(frozen=True, slots=True)
class Pricer:
    """Prices lines with one card and one organization's terms."""

    card: RateCard
    terms: OrganizationTerms

    def line(
        self,
        *,
        description: str,
        quantity: int,
        unit: Unit,
        rate: int,
        per: int,
        negotiated: bool,
        model: str,
        job_type: JobType,
        item: str,
        byok: bool = False,
    ) -> Line:
        gross = ceil_div(quantity * rate, per)
        if quantity > _INT64_MAX and gross <= MAX_REQUEST_UECU:
            # A zero rate lets any count pass the money limit: bound the count itself, which
            # travels as an int64. Non-zero rates are refused by the money limit first.
            raise InvalidArgument(item, f"{description}: {quantity} {unit}s do not fit in int64")
        discount = 0
        if not negotiated and self.terms.discount_percent:
            discount = gross - ceil_div(gross * (100 - self.terms.discount_percent), 100)
        return Line(
            description=description,
            quantity=quantity,
            unit=unit,
            rate_uecu=rate,
            per=per,
            subtotal_uecu=gross - discount,
            model=model,
            job_type=job_type,
            item=item,
            byok=byok,
            negotiated=negotiated,
            gross_uecu=gross,
            discount_uecu=discount,
        )

    def token_rate(self, model: ModelRates, which: str, byok: bool) -> tuple[int, bool]:
        if byok:
            return 0, False
        override = self.terms.models.get(model.name)
        negotiated = None if override is None else getattr(override, which)
        if negotiated is not None:
            return negotiated, True
        return getattr(model, which), False

    def fee(self, key: str) -> tuple[int, bool]:
        negotiated = getattr(self.terms.fees, key)
        if negotiated is not None:
            return negotiated, True
        return getattr(self.card.fees, key), False

    def engine_fee(self, byok: bool) -> tuple[str, str]:
        """The fee key and wording of a call's engine fee: BYOK calls pay
        ``byok_engine_call_uecu`` when the card or the organization's terms set one, every
        other call (and BYOK calls when neither does) ``engine_call_uecu``."""
        own = (self.terms.fees.byok_engine_call_uecu, self.card.fees.byok_engine_call_uecu)
        if byok and own != (None, None):
            return "byok_engine_call_uecu", "BYOK engine fee per call"
        return "engine_call_uecu", "engine fee per call"

    def model_calls(
        self,
        *,
        model: ModelRates,
        tokens_in: int,
        tokens_out: int,
        calls: int,
        byok: bool,
        judge: bool,
        job_type: JobType,
        label: str,
        item: str,
    ) -> list[Line]:
        """Token lines (always shown, 0 under BYOK), then the engine (and judge) fee lines."""
        suffix = ""
        if byok:
            unlisted = "" if self.card.model(model.name) else ", not on the rate card"
            suffix = f" (BYOK{unlisted}: 0, paid by the customer's key)"
        lines = []
        for which, quantity, what in (
            ("input_uecu_per_mtok", tokens_in, "input tokens"),
            ("output_uecu_per_mtok", tokens_out, "output tokens"),
        ):
            rate, negotiated = self.token_rate(model, which, byok)
            lines.append(
                self.line(
                    description=f"{label}: {what}{suffix}",
                    quantity=quantity,
                    unit=Unit.TOKEN,
                    rate=rate,
                    per=PER_MTOK,
                    negotiated=negotiated,
                    model=model.name,
                    job_type=job_type,
                    item=item,
                    byok=byok,
                )
            )
        fees = [self.engine_fee(byok)]
        if judge:
            fees.append(("judge_call_uecu", "judge fee per call"))
        for key, what in fees:
            lines.extend(
                self.fee_line(key, f"{label}: {what}", calls, Unit.CALL, job_type, item, model.name)
            )
        return lines

    def fee_line(
        self,
        key: str,
        description: str,
        quantity: int,
        unit: Unit,
        job_type: JobType,
        item: str,
        model: str = "",
    ) -> list[Line]:
        """A platform fee line; omitted when the fee is 0."""
        rate, negotiated = self.fee(key)
        if rate == 0:
            return []
        return [
            self.line(
                description=description,
                quantity=quantity,
                unit=unit,
                rate=rate,
                per=PER_CALL,
                negotiated=negotiated,
                model=model,
                job_type=job_type,
                item=item,
            )
        ]


def check_total(field: str, total: int, what: str) -> None:
    """Refuse a total over what one request may move (MAX_REQUEST_UECU)."""
    if total > MAX_REQUEST_UECU:
        raise InvalidArgument(
            field,
            f"{what} is {total} uECU, over the {MAX_REQUEST_UECU} uECU one request may move; "
            "split the job",
        )
