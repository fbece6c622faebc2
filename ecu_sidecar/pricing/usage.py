"""Usage pricing: the price of what a job really used, with the same rates and rounding as its
preview, usage lines aggregated per (kind, model, BYOK) before rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import JobType
from ecu_sidecar.pricing.card import ModelRates, RateCard
from ecu_sidecar.pricing.lines import Line, Pricer, Quote, Unit, check_total
from ecu_sidecar.pricing.spec import UsageKind, UsageLine, check_list, flag, known_model
from ecu_sidecar.validation import check_count, check_optional_id

__all__ = ["price_usage"]

# ---------------------------------------------------------------------------- usage pricing


def price_usage(
    card: RateCard, organization: str, usage: Sequence[UsageLine], *, field: str = "usage"
) -> Quote:
    """The price of what a job used, with the same rates and rounding as its preview.

    Lines are aggregated per (kind, model, BYOK) before rounding. ``field`` prefixes the error
    paths (``usage[2].tokens_in``). An empty usage list prices at 0.
    """
    organization = check_optional_id("organization", organization)
    pricer = Pricer(card, card.terms(organization))
    lines_in = check_list(usage, field, allow_empty=True)
    groups: dict[tuple[UsageKind, str, bool], list[int]] = {}
    first: dict[tuple[UsageKind, str, bool], str] = {}
    models: dict[str, ModelRates] = {}
    for index, line in enumerate(lines_in):
        path = f"{field}[{index}]"
        key, model, counts = _usage_line(card, line, path)
        if key in groups:
            groups[key] = [a + b for a, b in zip(groups[key], counts, strict=True)]
        else:
            groups[key] = counts
            first[key] = path
        if model is not None:
            models[model.name] = model
    lines: list[Line] = []
    for (kind, model_name, byok), (tokens_in, tokens_out, calls) in groups.items():
        item = first[(kind, model_name, byok)]
        if kind is UsageKind.GEPA_ITERATION:
            lines += pricer.fee_line(
                "gepa_iteration_uecu",
                "GEPA: iteration fee",
                calls,
                Unit.ITERATION,
                JobType.GEPA,
                item,
            )
        elif kind is UsageKind.TRACE:
            lines += pricer.fee_line(
                "trace_uecu",
                "trace evaluation: trace fee",
                calls,
                Unit.TRACE,
                JobType.TRACE_EVAL,
                item,
            )
        else:
            judge = kind is UsageKind.JUDGE
            lines += pricer.model_calls(
                model=models[model_name],
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                calls=calls,
                byok=byok,
                judge=judge,
                job_type=JobType.JUDGE if judge else JobType.INFERENCE,
                label=f"{kind.value} {model_name} ({calls} calls)",
                item=item,
            )
    total = sum(line.subtotal_uecu for line in lines)
    check_total(field, total, "the usage")
    return Quote(total_uecu=total, lines=tuple(lines), rate_card_version=card.version)


def _usage_line(
    card: RateCard, line: object, path: str
) -> tuple[tuple[UsageKind, str, bool], ModelRates | None, list[int]]:
    if not isinstance(line, UsageLine):
        raise InvalidArgument(path, f"must be a UsageLine, got {type(line).__name__}")
    try:
        kind = UsageKind(line.kind)
    except ValueError:
        raise InvalidArgument(
            f"{path}.kind",
            f"must be one of {', '.join(k.wire_name for k in UsageKind)}, got {line.kind}",
        ) from None
    tokens_in = check_count(f"{path}.tokens_in", line.tokens_in)
    tokens_out = check_count(f"{path}.tokens_out", line.tokens_out)
    calls = check_count(f"{path}.calls", line.calls)
    byok = flag(line.byok, f"{path}.byok")
    if kind in (UsageKind.INFERENCE, UsageKind.JUDGE):
        model = known_model(card, line.model, f"{path}.model", byok=byok)
        return (kind, model.name, byok), model, [tokens_in, tokens_out, calls]
    if line.model:
        raise InvalidArgument(
            f"{path}.model",
            f"must be empty for {kind.wire_name} usage (report model calls as "
            f"{UsageKind.INFERENCE.wire_name} or {UsageKind.JUDGE.wire_name} usage)",
        )
    for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
        if value:
            raise InvalidArgument(
                f"{path}.{name}",
                f"must be 0 for {kind.wire_name} usage (report tokens as "
                f"{UsageKind.INFERENCE.wire_name} or {UsageKind.JUDGE.wire_name} usage)",
            )
    # BYOK has no effect on platform fees: fold it so such lines aggregate together.
    return (kind, "", False), None, [0, 0, calls]
