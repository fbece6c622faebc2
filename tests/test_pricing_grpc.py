"""Pricing over gRPC against a real sidecar (real Redis and the embedded store).

Preview, Reserve from a job spec, Commit from usage lines, GetRateCard, and the rate card's hot
reload, end to end. Expected figures come from two independent places: the pricing package
called directly with the pricer's own spec dataclasses (built here, not converted from the
protobuf by the product's code), and hand computation from the rate card's values (read from
the card file, never pasted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.json_format import ParseDict

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.pricing import (
    ChatMessage,
    GepaSpec,
    InferenceSpec,
    JudgeSpec,
    Quote,
    RateCard,
    TraceEvalSpec,
    UsageLine,
    load_rate_card,
    preview,
    price_usage,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings
from tests.conftest import (
    ADMIN_METADATA,
    EXAMPLE_RATE_CARD,
    direct_client,
    drop_keys,
    make_settings,
    open_store,
    snapshot,
    wait_until,
)
from tests.test_service import details

ECU = 1_000_000
CARD = load_rate_card(EXAMPLE_RATE_CARD)
V1 = CARD.version
V2 = "2027-02-01.1"
#: An organization the card has no terms for: list prices.
PLAIN = "plain-co"
PER_MTOK = 1_000_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def line_uecu(quantity: int, rate: int, per: int = 1, discount: int = 0) -> int:
    """One priced line as docs/pricing.md defines it: ceil(q × rate / per), then the discount
    rounded down (the subtotal rounded up)."""
    gross = ceil_div(quantity * rate, per)
    return ceil_div(gross * (100 - discount), 100)


# -- job specs: the proto JSON form (what workers and the CLI send) and the pricer's own form ---

TEXT = "Summarize the following evaluation trace and list every failed assertion."
MESSAGES = [
    ("system", "You are a meticulous grader.", ""),
    ("user", "Grade the answer below against the rubric.", "qa-bot"),
]


def _messages_json() -> dict[str, Any]:
    return {
        "messages": [
            {"role": r, "content": c, **({"name": n} if n else {})} for r, c, n in MESSAGES
        ]
    }


def _messages_spec() -> list[ChatMessage]:
    return [ChatMessage(r, c, n) for r, c, n in MESSAGES]


JOBS: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "inference-text": (
        {
            "items": [
                {
                    "inference": {
                        "model": "gpt-4o",
                        "promptText": TEXT,
                        "maxOutputTokens": 500,
                        "samples": 3,
                    }
                }
            ]
        },
        [InferenceSpec("gpt-4o", prompt_text=TEXT, max_output_tokens=500, samples=3)],
    ),
    # Not an OpenAI tokenizer: the card's estimate factor applies to the counted prompt.
    "inference-chat-other-tokenizer": (
        {
            "items": [
                {"inference": {"model": "anthropic/claude-sonnet-4", "messages": _messages_json()}}
            ]
        },
        [InferenceSpec("anthropic/claude-sonnet-4", messages=_messages_spec())],
    ),
    "judge": (
        {
            "items": [
                {
                    "judge": {
                        "judgeModel": "gpt-4o-mini",
                        "calls": 5,
                        "promptTokensPerCall": 800,
                        "maxOutputTokensPerCall": 150,
                    }
                }
            ]
        },
        [
            JudgeSpec(
                "gpt-4o-mini", calls=5, prompt_tokens_per_call=800, max_output_tokens_per_call=150
            )
        ],
    ),
    "gepa": (
        {
            "items": [
                {
                    "gepa": {
                        "iterations": 6,
                        "perIteration": [
                            {
                                "inference": {
                                    "model": "gpt-4.1",
                                    "promptTokens": 3000,
                                    "maxOutputTokens": 1000,
                                }
                            },
                            {
                                "judge": {
                                    "judgeModel": "gpt-4o-mini",
                                    "calls": 2,
                                    "promptText": TEXT,
                                    "maxOutputTokensPerCall": 100,
                                }
                            },
                        ],
                    }
                }
            ]
        },
        [
            GepaSpec(
                6,
                [
                    InferenceSpec("gpt-4.1", prompt_tokens=3000, max_output_tokens=1000),
                    JudgeSpec(
                        "gpt-4o-mini", calls=2, prompt_text=TEXT, max_output_tokens_per_call=100
                    ),
                ],
            )
        ],
    ),
    # A judge that reads the candidate's answer: a bound in tokens, or the answer of an item
    # (local to the GEPA iteration's list, so the "mixed" job's indices stay valid).
    "judge-of-an-answer": (
        {
            "items": [
                {
                    "judge": {
                        "judgeModel": "gpt-4o-mini",
                        "calls": 2,
                        "promptTokensPerCall": 300,
                        "answerMaxTokens": 900,
                    }
                }
            ]
        },
        [JudgeSpec("gpt-4o-mini", calls=2, prompt_tokens_per_call=300, answer_max_tokens=900)],
    ),
    "gepa-growing-judged-answers": (
        {
            "items": [
                {
                    "gepa": {
                        "iterations": 3,
                        "perIteration": [
                            {
                                "judge": {
                                    "judgeModel": "gpt-4o",
                                    "promptText": TEXT,
                                    "answerOfItem": 1,
                                }
                            },
                            {"inference": {"model": "gpt-4.1", "promptTokens": 2000}},
                        ],
                        "promptGrowthTokensPerIteration": 300,
                    }
                }
            ]
        },
        [
            GepaSpec(
                3,
                [
                    JudgeSpec("gpt-4o", prompt_text=TEXT, answer_of_item=1),
                    InferenceSpec("gpt-4.1", prompt_tokens=2000),
                ],
                prompt_growth_tokens_per_iteration=300,
            )
        ],
    ),
    "trace-eval": (
        {
            "items": [
                {
                    "traceEval": {
                        "traces": 20,
                        "judges": [
                            {
                                "judgeModel": "anthropic/claude-sonnet-4",
                                "promptTokensPerCall": 2000,
                                "maxOutputTokensPerCall": 300,
                            },
                            {
                                "judgeModel": "gpt-4o",
                                "calls": 2,
                                "messages": _messages_json(),
                                "maxOutputTokensPerCall": 50,
                            },
                        ],
                    }
                }
            ]
        },
        [
            TraceEvalSpec(
                20,
                [
                    JudgeSpec(
                        "anthropic/claude-sonnet-4",
                        prompt_tokens_per_call=2000,
                        max_output_tokens_per_call=300,
                    ),
                    JudgeSpec(
                        "gpt-4o", calls=2, messages=_messages_spec(), max_output_tokens_per_call=50
                    ),
                ],
            )
        ],
    ),
}
JOBS["mixed"] = (
    {"items": [item for body, _ in JOBS.values() for item in body["items"]]},
    [item for _, spec in JOBS.values() for item in spec],
)


def job_pb(name: str) -> pb.JobSpec:
    return ParseDict(JOBS[name][0], pb.JobSpec())


def lines_of(quote: pb.Quote) -> list[tuple[Any, ...]]:
    return [
        (x.description, x.quantity, x.unit, x.rate_uecu, x.per, x.subtotal_uecu, x.model, x.item)
        for x in quote.lines
    ]


def expected_lines(quote: Quote) -> list[tuple[Any, ...]]:
    return [
        (
            x.description,
            x.quantity,
            str(x.unit),
            x.rate_uecu,
            x.per,
            x.subtotal_uecu,
            x.model,
            x.item,
        )
        for x in quote.lines
    ]


# -- calling the sidecar -----------------------------------------------------------------------


async def grant(stub: Any, org: str, amount: int, gid: str = "seed") -> None:
    await stub.Grant(
        pb.GrantRequest(
            grant_id=gid, organization=org, amount_uecu=amount, kind=pb.GRANT_KIND_TOP_UP
        ),
        metadata=ADMIN_METADATA,
    )


async def preview_rpc(stub: Any, org: str, job: pb.JobSpec) -> pb.PreviewResponse:
    return await stub.Preview(pb.PreviewRequest(account=pb.Account(organization=org), job=job))


async def reserve_job(
    stub: Any, org: str, rid: str, job: pb.JobSpec, **kw: Any
) -> pb.ReserveResponse:
    return await stub.Reserve(
        pb.ReserveRequest(reservation_id=rid, account=pb.Account(organization=org), job=job, **kw)
    )


async def balance(stub: Any, org: str) -> pb.Balance:
    return (await stub.GetBalance(pb.GetBalanceRequest(organization=org))).balance


async def outbox(server: SidecarServer, org: str) -> list[dict[str, str]]:
    client = direct_client(server.settings)
    try:
        entries = await client.xrange(server.store.outbox_key(org))
    finally:
        await client.aclose()
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def usage_pb(lines: list[UsageLine]) -> list[pb.UsageLine]:
    kinds = {
        "inference": pb.USAGE_KIND_INFERENCE,
        "judge": pb.USAGE_KIND_JUDGE,
        "gepa_iteration": pb.USAGE_KIND_GEPA_ITERATION,
        "trace": pb.USAGE_KIND_TRACE,
    }
    return [
        pb.UsageLine(
            kind=kinds[str(u.kind)],
            model=u.model,
            tokens_in=u.tokens_in,
            tokens_out=u.tokens_out,
            calls=u.calls,
            byok=u.byok,
        )
        for u in lines
    ]


#: What the "mixed" job really used (well within its worst case), in several lines per model.
USAGE = [
    UsageLine("inference", "gpt-4o", tokens_in=40, tokens_out=310, calls=3),
    UsageLine("inference", "anthropic/claude-sonnet-4", tokens_in=33, tokens_out=2_000, calls=1),
    UsageLine("judge", "gpt-4o-mini", tokens_in=4_000, tokens_out=600, calls=5),
    UsageLine("gepa_iteration", calls=4),
    UsageLine("inference", "gpt-4.1", tokens_in=12_000, tokens_out=2_500, calls=4),
    UsageLine("judge", "gpt-4o-mini", tokens_in=1_000, tokens_out=300, calls=8),
    UsageLine("trace", calls=20),
    UsageLine("judge", "anthropic/claude-sonnet-4", tokens_in=40_000, tokens_out=3_000, calls=20),
    UsageLine("judge", "gpt-4o", tokens_in=2_000, tokens_out=800, calls=40, byok=True),
]


# -- Preview -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(JOBS))
async def test_preview_equals_the_pricer_and_reports_the_balance(stub, name: str) -> None:
    spec = JOBS[name][1]
    expected = preview(CARD, PLAIN, spec)
    assert expected.total_uecu > 0

    # Covered: the available balance is what GetBalance says, less nothing.
    await grant(stub, PLAIN, expected.total_uecu + 7)
    out = await preview_rpc(stub, PLAIN, job_pb(name))
    assert out.quote.total_uecu == expected.total_uecu
    assert out.quote.rate_card_version == V1
    assert lines_of(out.quote) == expected_lines(expected)
    assert sum(x.subtotal_uecu for x in out.quote.lines) == out.quote.total_uecu
    available = (await balance(stub, PLAIN)).available_uecu
    assert available == expected.total_uecu + 7
    assert (out.covered, out.available_uecu, out.available_after_uecu) == (True, available, 7)

    # Not covered by one µECU.
    short = "short-co"
    await grant(stub, short, expected.total_uecu - 1)
    out = await preview_rpc(stub, short, job_pb(name))
    assert out.quote.total_uecu == expected.total_uecu
    assert (out.covered, out.available_uecu, out.available_after_uecu) == (
        False,
        expected.total_uecu - 1,
        -1,
    )


def _hand(card: RateCard, name: str) -> int:
    """The worst case of the prompt-token jobs, computed from the card's values by hand
    (list prices, no terms)."""
    m, f = card.models, card.fees
    if name == "judge":  # 5 calls × (800 in, 150 out) of gpt-4o-mini
        j = m["gpt-4o-mini"]
        return (
            line_uecu(5 * 800, j.input_uecu_per_mtok, PER_MTOK)
            + line_uecu(5 * 150, j.output_uecu_per_mtok, PER_MTOK)
            + 5 * f.engine_call_uecu
            + 5 * f.judge_call_uecu
        )
    if name == "trace-eval-known-sizes":  # 20 traces × 1 claude call (2000 in, 300 out)
        c = m["anthropic/claude-sonnet-4"]
        return (
            20 * f.trace_uecu
            + line_uecu(20 * 2000, c.input_uecu_per_mtok, PER_MTOK)
            + line_uecu(20 * 300, c.output_uecu_per_mtok, PER_MTOK)
            + 20 * (f.engine_call_uecu + f.judge_call_uecu)
        )
    if name == "gepa-known-sizes":  # 6 iterations × 1 gpt-4.1 call (3000 in, 1000 out)
        g = m["gpt-4.1"]
        return (
            6 * f.gepa_iteration_uecu
            + line_uecu(6 * 3000, g.input_uecu_per_mtok, PER_MTOK)
            + line_uecu(6 * 1000, g.output_uecu_per_mtok, PER_MTOK)
            + 6 * f.engine_call_uecu
        )
    if name == "inference-default-output":  # 2 samples × 1000 in, the model's max output
        i = m["gpt-4o"]
        return (
            line_uecu(2 * 1000, i.input_uecu_per_mtok, PER_MTOK)
            + line_uecu(2 * i.max_output_tokens, i.output_uecu_per_mtok, PER_MTOK)
            + 2 * f.engine_call_uecu
        )
    raise AssertionError(name)


HAND_JOBS = {
    "judge": job_pb("judge"),
    "trace-eval-known-sizes": ParseDict(
        {
            "items": [
                {
                    "traceEval": {
                        "traces": 20,
                        "judges": [
                            {
                                "judgeModel": "anthropic/claude-sonnet-4",
                                "promptTokensPerCall": 2000,
                                "maxOutputTokensPerCall": 300,
                            }
                        ],
                    }
                }
            ]
        },
        pb.JobSpec(),
    ),
    "gepa-known-sizes": ParseDict(
        {
            "items": [
                {
                    "gepa": {
                        "iterations": 6,
                        "perIteration": [
                            {
                                "inference": {
                                    "model": "gpt-4.1",
                                    "promptTokens": 3000,
                                    "maxOutputTokens": 1000,
                                }
                            }
                        ],
                    }
                }
            ]
        },
        pb.JobSpec(),
    ),
    "inference-default-output": ParseDict(
        {"items": [{"inference": {"model": "gpt-4o", "promptTokens": 1000, "samples": 2}}]},
        pb.JobSpec(),
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_JOBS))
async def test_preview_matches_hand_computed_figures(stub, name: str) -> None:
    out = await preview_rpc(stub, PLAIN, HAND_JOBS[name])
    assert out.quote.total_uecu == _hand(CARD, name)
    # No account: the quote still comes, not covered, nothing available.
    assert (out.covered, out.available_uecu) == (False, 0)


async def test_preview_enterprise_terms_and_byok(stub) -> None:
    """Negotiated rates and fees, a volume discount, and BYOK, each from the card's values."""
    i, f = CARD.models["gpt-4o"], CARD.fees
    n, p, o = 3, 1_000, 400  # samples, prompt tokens, max output tokens
    job = ParseDict(
        {
            "items": [
                {
                    "inference": {
                        "model": "gpt-4o",
                        "promptTokens": p,
                        "maxOutputTokens": o,
                        "samples": n,
                    }
                }
            ]
        },
        pb.JobSpec(),
    )
    byok = ParseDict(
        {
            "items": [
                {
                    "inference": {
                        "model": "gpt-4o",
                        "promptTokens": p,
                        "maxOutputTokens": o,
                        "samples": n,
                        "byok": True,
                    }
                }
            ]
        },
        pb.JobSpec(),
    )

    def list_price(discount: int = 0) -> int:
        return (
            line_uecu(n * p, i.input_uecu_per_mtok, PER_MTOK, discount)
            + line_uecu(n * o, i.output_uecu_per_mtok, PER_MTOK, discount)
            + line_uecu(n, f.engine_call_uecu, 1, discount)
        )

    assert "plain-co" not in CARD.organizations
    assert (await preview_rpc(stub, PLAIN, job)).quote.total_uecu == list_price()

    # acme: a volume discount on every line.
    acme = CARD.organizations["acme"]
    assert acme.discount_percent > 0 and not acme.models
    out = await preview_rpc(stub, "acme", job)
    assert out.quote.total_uecu == list_price(acme.discount_percent) < list_price()
    assert all(x.discount_uecu == x.gross_uecu - x.subtotal_uecu for x in out.quote.lines)
    assert any(x.discount_uecu > 0 for x in out.quote.lines)

    # globex: negotiated gpt-4o rates and engine fee, final prices (no discount).
    globex = CARD.organizations["globex"]
    rates, engine = globex.models["gpt-4o"], globex.fees.engine_call_uecu
    assert rates.input_uecu_per_mtok is not None and rates.output_uecu_per_mtok is not None
    assert engine is not None
    out = await preview_rpc(stub, "globex", job)
    assert out.quote.total_uecu == (
        line_uecu(n * p, rates.input_uecu_per_mtok, PER_MTOK)
        + line_uecu(n * o, rates.output_uecu_per_mtok, PER_MTOK)
        + n * engine
    )
    assert all(x.negotiated for x in out.quote.lines)

    # BYOK: the token lines show the volume at rate 0; the engine fee per call is still billed.
    out = await preview_rpc(stub, PLAIN, byok)
    tokens = [x for x in out.quote.lines if x.unit == "token"]
    assert [(x.quantity, x.rate_uecu, x.subtotal_uecu, x.byok) for x in tokens] == [
        (n * p, 0, 0, True),
        (n * o, 0, 0, True),
    ]
    assert out.quote.total_uecu == n * f.engine_call_uecu > 0
    # ... with the organization's terms on what remains: acme's discount, globex's engine fee.
    assert (await preview_rpc(stub, "acme", byok)).quote.total_uecu == line_uecu(
        n, f.engine_call_uecu, 1, acme.discount_percent
    )
    assert (await preview_rpc(stub, "globex", byok)).quote.total_uecu == n * engine


async def test_preview_changes_no_state(sidecar, stub) -> None:
    await grant(stub, PLAIN, 10 * ECU)
    await reserve_job(stub, PLAIN, "r1", job_pb("judge"))
    before = await snapshot(sidecar.settings)
    for name in sorted(JOBS):
        await preview_rpc(stub, PLAIN, job_pb(name))
    out = await preview_rpc(stub, "nobody", job_pb("judge"))  # no account: no state made
    assert not out.covered
    assert await snapshot(sidecar.settings) == before


async def test_unknown_model_is_refused_never_priced_as_zero(stub) -> None:
    job = ParseDict(
        {"items": [{"judge": {"judgeModel": "gpt-5", "promptTokensPerCall": 10}}]}, pb.JobSpec()
    )
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await preview_rpc(stub, PLAIN, job)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(ei.value)["BadRequest"].field_violations[0].field == (
        "job.items[0].judge.judge_model"
    )
    assert "gpt-5" in (ei.value.details() or "")


# -- Reserve from a job spec, Commit from usage -------------------------------------------------


async def test_reserve_job_holds_exactly_the_preview_total(sidecar, stub) -> None:
    await grant(stub, PLAIN, 50 * ECU)
    shown = await preview_rpc(stub, PLAIN, job_pb("mixed"))
    out = await reserve_job(stub, PLAIN, "r-mixed", job_pb("mixed"))
    assert (
        out.hold.amount_uecu
        == shown.quote.total_uecu
        == preview(CARD, PLAIN, JOBS["mixed"][1]).total_uecu
    )
    assert out.quote == shown.quote and out.quote.rate_card_version == V1
    assert out.available_uecu == shown.available_after_uecu
    b = await balance(stub, PLAIN)
    assert (b.held_uecu, b.available_uecu) == (shown.quote.total_uecu, shown.available_after_uecu)

    # The pinned version and the derived job type are on the hold's event for the ledger.
    (event,) = [e for e in await outbox(sidecar, PLAIN) if e["type"] == "reserve"]
    assert (event["rcv"], event["amount"], event["job"]) == (
        V1,
        str(shown.quote.total_uecu),
        "inference",
    )


async def test_reserve_batch_prices_job_items_only(stub) -> None:
    await grant(stub, PLAIN, 50 * ECU)
    out = await stub.ReserveBatch(
        pb.ReserveBatchRequest(
            account=pb.Account(organization=PLAIN),
            items=[
                pb.ReserveItem(reservation_id="a", job=job_pb("gepa")),
                pb.ReserveItem(reservation_id="b", amount_uecu=1234, job_type=pb.JOB_TYPE_ENGINE),
                pb.ReserveItem(reservation_id="c", job=job_pb("trace-eval")),
            ],
        )
    )
    gepa = preview(CARD, PLAIN, JOBS["gepa"][1]).total_uecu
    trace = preview(CARD, PLAIN, JOBS["trace-eval"][1]).total_uecu
    assert [h.amount_uecu for h in out.holds] == [gepa, 1234, trace]
    assert [q.total_uecu for q in out.quotes] == [gepa, 0, trace]
    assert [q.rate_card_version for q in out.quotes] == [V1, "", V1]
    assert out.available_uecu == 50 * ECU - gepa - 1234 - trace


async def test_commit_usage_charges_exactly_its_price(sidecar, stub) -> None:
    await grant(stub, PLAIN, 50 * ECU)
    held = await reserve_job(stub, PLAIN, "r-mixed", job_pb("mixed"))
    price = price_usage(CARD, PLAIN, USAGE, field="usage_lines")
    assert 0 < price.total_uecu < held.hold.amount_uecu

    out = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r-mixed",
            organization=PLAIN,
            usage_lines=usage_pb(USAGE),
            rate_card_version=held.quote.rate_card_version,
        )
    )
    assert out.committed_uecu == price.total_uecu
    assert out.released_uecu == held.hold.amount_uecu - price.total_uecu
    assert out.quote.total_uecu == price.total_uecu and out.quote.rate_card_version == V1
    assert lines_of(out.quote) == expected_lines(price)
    b = await balance(stub, PLAIN)
    assert (b.committed_uecu, b.held_uecu) == (price.total_uecu, 0)

    # The event for the ledger: the version and the breakdown, summing to what was committed.
    (event,) = [e for e in await outbox(sidecar, PLAIN) if e["type"] == "commit"]
    assert event["rcv"] == V1
    assert (int(event["actual"]), int(event["committed"])) == (price.total_uecu,) * 2
    breakdown = json.loads(event["lines"])
    assert [tuple(row) for row in breakdown] == [
        (x.description, x.quantity, str(x.unit), x.rate_uecu, x.per, x.subtotal_uecu, x.model)
        for x in price.lines
    ]
    assert sum(row[5] for row in breakdown) == out.committed_uecu
    # Usage attribution is summed from the lines.
    assert int(event["tokens_in"]) == sum(u.tokens_in for u in USAGE)
    assert int(event["calls"]) == sum(u.calls for u in USAGE)

    # A replay answers the same.
    again = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r-mixed",
            organization=PLAIN,
            usage_lines=usage_pb(USAGE),
            rate_card_version=V1,
        )
    )
    assert again.replayed and again.committed_uecu == out.committed_uecu


async def test_commit_batch_prices_each_item(stub) -> None:
    await grant(stub, PLAIN, 50 * ECU)
    await reserve_job(stub, PLAIN, "a", job_pb("judge"))
    await reserve_job(stub, PLAIN, "b", job_pb("gepa"))
    judge_use = [UsageLine("judge", "gpt-4o-mini", tokens_in=3_000, tokens_out=500, calls=5)]
    gepa_use = [
        UsageLine("gepa_iteration", calls=6),
        UsageLine("inference", "gpt-4.1", tokens_in=18_000, tokens_out=4_000, calls=6),
    ]
    out = await stub.CommitBatch(
        pb.CommitBatchRequest(
            organization=PLAIN,
            items=[
                pb.CommitItem(
                    reservation_id="a", usage_lines=usage_pb(judge_use), rate_card_version=V1
                ),
                pb.CommitItem(
                    reservation_id="b", usage_lines=usage_pb(gepa_use), rate_card_version=V1
                ),
            ],
        )
    )
    assert [r.code for r in out.results] == [0, 0]
    assert [r.commit.committed_uecu for r in out.results] == [
        price_usage(CARD, PLAIN, judge_use).total_uecu,
        price_usage(CARD, PLAIN, gepa_use).total_uecu,
    ]


async def test_a_byok_model_the_card_does_not_list_bills_the_engine_work(sidecar, stub) -> None:
    """A customer's own model on its own key: accepted though the card does not list it, its
    tokens free, the platform's engine (and judge) fees billed; without BYOK it is refused
    with the field and nothing changes."""
    custom = "acme/support-ft-v3"
    assert CARD.model(custom) is None
    job = {
        "items": [
            {"inference": {"model": custom, "promptTokens": 900, "samples": 2, "byok": True}},
            {"judge": {"judgeModel": custom, "calls": 3, "promptText": "Grade.", "byok": True}},
        ]
    }
    await grant(stub, PLAIN, ECU)
    held = await reserve_job(stub, PLAIN, "r-custom", ParseDict(job, pb.JobSpec()))
    f = CARD.fees
    assert held.hold.amount_uecu == 2 * f.engine_call_uecu + 3 * (
        f.engine_call_uecu + f.judge_call_uecu
    )
    assert {(x.model, x.subtotal_uecu) for x in held.quote.lines if x.unit == "token"} == {
        (custom, 0)
    }
    used = [
        UsageLine("inference", custom, tokens_in=1_800, tokens_out=700, calls=2, byok=True),
        UsageLine("judge", custom, tokens_in=60, tokens_out=30, calls=1, byok=True),
    ]
    out = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r-custom",
            organization=PLAIN,
            usage_lines=usage_pb(used),
            rate_card_version=V1,
        )
    )
    assert out.committed_uecu == 2 * f.engine_call_uecu + f.engine_call_uecu + f.judge_call_uecu

    before = await snapshot(sidecar.settings)
    job["items"][0]["inference"]["byok"] = False
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await reserve_job(stub, PLAIN, "r-custom-2", ParseDict(job, pb.JobSpec()))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        details(ei.value)["BadRequest"].field_violations[0].field == "job.items[0].inference.model"
    )
    assert f"unknown model {custom!r}" in ei.value.details()
    assert await snapshot(sidecar.settings) == before


async def test_a_commit_of_no_usage_lines_prices_at_zero(sidecar, stub) -> None:
    """A job that made no call (it short-circuited) reports an empty usage list: the commit is
    priced at 0, commits 0 and returns the whole hold. On the wire an empty list is no list at
    all; the rate card version alone says the commit is priced from usage lines."""
    await grant(stub, PLAIN, 50 * ECU)
    held = await reserve_job(stub, PLAIN, "r-none", job_pb("judge"))
    batched = await reserve_job(stub, PLAIN, "r-none-b", job_pb("gepa"))

    out = await stub.Commit(
        pb.CommitRequest(reservation_id="r-none", organization=PLAIN, rate_card_version=V1)
    )
    assert (out.committed_uecu, out.released_uecu, out.overage_uecu) == (
        0,
        held.hold.amount_uecu,
        0,
    )
    assert (out.quote.total_uecu, list(out.quote.lines), out.quote.rate_card_version) == (
        0,
        [],
        V1,
    )
    batch = await stub.CommitBatch(
        pb.CommitBatchRequest(
            organization=PLAIN,
            items=[pb.CommitItem(reservation_id="r-none-b", rate_card_version=V1)],
        )
    )
    (result,) = batch.results
    assert (result.code, result.commit.committed_uecu, result.commit.released_uecu) == (
        0,
        0,
        batched.hold.amount_uecu,
    )
    b = await balance(stub, PLAIN)
    assert (b.committed_uecu, b.held_uecu, b.available_uecu) == (0, 0, 50 * ECU)
    events = [e for e in await outbox(sidecar, PLAIN) if e["type"] == "commit"]
    assert [(e["rcv"], int(e["committed"]), json.loads(e["lines"])) for e in events] == [
        (V1, 0, [])
    ] * 2

    again = await stub.Commit(
        pb.CommitRequest(reservation_id="r-none", organization=PLAIN, rate_card_version=V1)
    )
    assert again.replayed and again.committed_uecu == 0


# -- the rate card -----------------------------------------------------------------------------


async def test_get_rate_card_returns_the_card(stub) -> None:
    out = await stub.GetRateCard(pb.GetRateCardRequest(), metadata=ADMIN_METADATA)
    assert out.version == V1 and list(out.versions) == [V1]
    assert (
        out.engine_call_uecu,
        out.judge_call_uecu,
        out.gepa_iteration_uecu,
        out.trace_uecu,
    ) == (
        CARD.fees.engine_call_uecu,
        CARD.fees.judge_call_uecu,
        CARD.fees.gepa_iteration_uecu,
        CARD.fees.trace_uecu,
    )
    # The example card sets no BYOK engine fee: BYOK calls pay the engine fee.
    assert CARD.fees.byok_engine_call_uecu is None
    assert out.byok_engine_call_uecu == CARD.fees.engine_call_uecu
    assert list(out.organizations_with_terms) == sorted(CARD.organizations)
    assert {m.model: m for m in out.models}.keys() == set(CARD.models)
    for m in out.models:
        card = CARD.models[m.model]
        assert (
            m.input_uecu_per_mtok,
            m.output_uecu_per_mtok,
            m.encoding,
            m.context_window,
            m.max_output_tokens,
            m.estimate_factor_percent,
            m.chat_only,
        ) == (
            card.input_uecu_per_mtok,
            card.output_uecu_per_mtok,
            card.encoding,
            card.context_window,
            card.max_output_tokens,
            card.estimate_factor_percent,
            card.chat_only,
        )
    assert any(m.chat_only for m in out.models)


async def test_without_a_rate_card_pricing_is_a_failed_precondition(backend: str) -> None:
    settings = make_settings(backend, rate_card_file="")
    async with running(settings) as (_, stub):
        await grant(stub, PLAIN, ECU)
        for call in (
            stub.Preview(
                pb.PreviewRequest(account=pb.Account(organization=PLAIN), job=job_pb("judge"))
            ),
            stub.GetRateCard(pb.GetRateCardRequest()),
            reserve_job(stub, PLAIN, "r1", job_pb("judge")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call
            assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert details(ei.value)["ErrorInfo"].reason == "RATE_CARD_UNAVAILABLE"
        # Amounts still work.
        await stub.Reserve(
            pb.ReserveRequest(
                reservation_id="r2",
                account=pb.Account(organization=PLAIN),
                amount_uecu=10,
                job_type=pb.JOB_TYPE_ENGINE,
            )
        )


# -- hot reload --------------------------------------------------------------------------------


@dataclass
class Reloadable:
    server: SidecarServer
    stub: Any
    card_file: Path

    def write(self, text: str) -> None:
        self.card_file.write_text(text)

    def sample(self, name: str, labels: dict[str, str]) -> float | None:
        return self.server.registry.get_sample_value(name, labels)


def v2_text() -> str:
    """The example card as version V2, with gpt-4o's input rate doubled."""
    text = Path(EXAMPLE_RATE_CARD).read_text()
    rate = CARD.models["gpt-4o"].input_uecu_per_mtok
    old = f"input_uecu_per_mtok = {rate:_}"
    assert text.count(f'version = "{V1}"') == 1 and text.count(old) == 1
    return text.replace(f'version = "{V1}"', f'version = "{V2}"').replace(
        old, f"input_uecu_per_mtok = {2 * rate}"
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[SidecarServer, Any]]:
    """A sidecar of the given settings and a stub on it; its keys are dropped afterwards."""
    server = SidecarServer(settings, store=open_store(settings))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, quota_pb2_grpc.QuotaStub(channel)
    finally:
        await drop_keys(settings)
        await server.stop(grace=0)


@pytest.fixture
def card_file(tmp_path: Path) -> Path:
    """A copy of the example card, for the test to rewrite (ECU_RATE_CARD_FILE)."""
    path = tmp_path / "rates.toml"
    shutil.copyfile(EXAMPLE_RATE_CARD, path)
    return path


@pytest_asyncio.fixture
async def reloadable(backend: str, card_file: Path) -> AsyncIterator[Reloadable]:
    """A sidecar whose card file the test rewrites; reloads only when the test says so."""
    settings = make_settings(backend, rate_card_file=str(card_file), rate_card_poll_ms=0)
    async with running(settings) as (server, stub):
        yield Reloadable(server, stub, card_file)


#: Usage whose price differs between V1 and V2 (gpt-4o input tokens).
RELOAD_USAGE = [UsageLine("inference", "gpt-4o", tokens_in=1_500, tokens_out=200, calls=2)]
RELOAD_JOB = {
    "items": [
        {
            "inference": {
                "model": "gpt-4o",
                "promptTokens": 1000,
                "maxOutputTokens": 500,
                "samples": 2,
            }
        }
    ]
}


async def test_commit_after_a_reload_is_priced_with_the_pinned_version(
    reloadable: Reloadable,
) -> None:
    r, stub = reloadable, reloadable.stub
    await grant(stub, PLAIN, 10 * ECU)
    job = ParseDict(RELOAD_JOB, pb.JobSpec())
    first = await reserve_job(stub, PLAIN, "r-v1", job)
    assert first.quote.rate_card_version == V1

    r.write(v2_text())
    await r.server.reload_rate_card(force=True)
    card2 = load_rate_card(r.card_file)
    assert card2.version == V2
    rates = await stub.GetRateCard(pb.GetRateCardRequest())
    assert rates.version == V2 and list(rates.versions) == [V1, V2]
    assert r.sample("ecu_rate_card_reloads_total", {"result": "ok"}) == 1
    assert r.sample("ecu_rate_card_info", {"version": V2}) == 1
    assert r.sample("ecu_rate_card_info", {"version": V1}) is None

    # New work is priced with V2 ...
    second = await reserve_job(stub, PLAIN, "r-v2", job)
    assert second.quote.rate_card_version == V2
    assert (
        second.hold.amount_uecu
        == preview(
            card2,
            PLAIN,
            [InferenceSpec("gpt-4o", prompt_tokens=1000, max_output_tokens=500, samples=2)],
        ).total_uecu
    )
    assert second.hold.amount_uecu > first.hold.amount_uecu

    # ... while the hold priced with V1 is committed with V1's rates.
    v1_price = price_usage(CARD, PLAIN, RELOAD_USAGE).total_uecu
    v2_price = price_usage(card2, PLAIN, RELOAD_USAGE).total_uecu
    assert v1_price != v2_price
    out = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r-v1",
            organization=PLAIN,
            usage_lines=usage_pb(RELOAD_USAGE),
            rate_card_version=first.quote.rate_card_version,
        )
    )
    assert (out.committed_uecu, out.quote.rate_card_version) == (v1_price, V1)

    # The V2 hold cannot be priced with V1 (nor changed by trying).
    before = await snapshot(r.server.settings)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.Commit(
            pb.CommitRequest(
                reservation_id="r-v2",
                organization=PLAIN,
                usage_lines=usage_pb(RELOAD_USAGE),
                rate_card_version=V1,
            )
        )
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(ei.value)["ErrorInfo"].reason == "RATE_CARD_MISMATCH"
    assert await snapshot(r.server.settings) == before
    out = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r-v2",
            organization=PLAIN,
            usage_lines=usage_pb(RELOAD_USAGE),
            rate_card_version=V2,
        )
    )
    assert out.committed_uecu == v2_price


async def test_job_reserve_replayed_after_a_reload_is_still_a_replay(
    reloadable: Reloadable,
) -> None:
    r, stub = reloadable, reloadable.stub
    await grant(stub, PLAIN, 10 * ECU)
    job = ParseDict(RELOAD_JOB, pb.JobSpec())
    first = await reserve_job(stub, PLAIN, "r1", job, ttl_ms=600_000)
    r.write(v2_text())
    await r.server.reload_rate_card(force=True)
    assert (await preview_rpc(stub, PLAIN, job)).quote.total_uecu != first.hold.amount_uecu

    again = await reserve_job(stub, PLAIN, "r1", job, ttl_ms=600_000)
    assert again.replayed
    assert again.hold == first.hold  # same hold: amount, deadline, state
    b = await balance(stub, PLAIN)
    assert (b.held_uecu, b.outstanding_holds, b.reserved_uecu) == (
        first.hold.amount_uecu,
        1,
        first.hold.amount_uecu,
    )
    # Its usage is still priced with the version it pinned.
    out = await stub.Commit(
        pb.CommitRequest(
            reservation_id="r1",
            organization=PLAIN,
            usage_lines=usage_pb(RELOAD_USAGE),
            rate_card_version=V1,
        )
    )
    assert out.committed_uecu == price_usage(CARD, PLAIN, RELOAD_USAGE).total_uecu


async def test_replay_after_a_reload_answers_the_pinned_quote(reloadable: Reloadable) -> None:
    r, stub = reloadable, reloadable.stub
    await grant(stub, PLAIN, 10 * ECU)
    job = ParseDict(RELOAD_JOB, pb.JobSpec())
    first = await reserve_job(stub, PLAIN, "r1", job)
    r.write(v2_text())
    await r.server.reload_rate_card(force=True)
    again = await reserve_job(stub, PLAIN, "r1", job)
    assert again.replayed
    assert again.quote.rate_card_version == first.quote.rate_card_version == V1
    assert again.quote.total_uecu == again.hold.amount_uecu


async def test_a_bad_new_card_is_refused_and_the_old_one_keeps_serving(
    reloadable: Reloadable,
) -> None:
    r, stub = reloadable, reloadable.stub
    await grant(stub, PLAIN, 10 * ECU)
    rate = CARD.models["gpt-4o"].input_uecu_per_mtok
    bad = v2_text().replace(f"input_uecu_per_mtok = {2 * rate}", "input_uecu_per_mtok = -1")
    assert bad != v2_text()
    r.write(bad)
    await r.server.reload_rate_card(force=True)
    assert r.sample("ecu_rate_card_reloads_total", {"result": "failed"}) == 1
    assert r.sample("ecu_rate_card_reloads_total", {"result": "ok"}) is None
    assert r.sample("ecu_rate_card_info", {"version": V1}) == 1
    assert r.sample("ecu_rate_card_info", {"version": V2}) is None
    assert r.server.rates is not None and r.server.rates.last_error is not None
    assert "models.gpt-4o.input_uecu_per_mtok" in str(r.server.rates.last_error)

    rates = await stub.GetRateCard(pb.GetRateCardRequest())
    assert rates.version == V1 and list(rates.versions) == [V1]
    job = ParseDict(RELOAD_JOB, pb.JobSpec())
    held = await reserve_job(stub, PLAIN, "r1", job)
    assert held.quote.rate_card_version == V1
    assert held.hold.amount_uecu == (await preview_rpc(stub, PLAIN, job)).quote.total_uecu

    # Fixed, the file loads.
    r.write(v2_text())
    await r.server.reload_rate_card()
    assert (await stub.GetRateCard(pb.GetRateCardRequest())).version == V2
    assert r.sample("ecu_rate_card_reloads_total", {"result": "ok"}) == 1


async def test_a_changed_file_is_picked_up_by_polling(backend: str, card_file: Path) -> None:
    settings = make_settings(backend, rate_card_file=str(card_file), rate_card_poll_ms=50)
    async with running(settings) as (server, stub):
        await asyncio.to_thread(card_file.write_text, v2_text())

        async def loaded() -> bool:
            return (await stub.GetRateCard(pb.GetRateCardRequest())).version == V2

        await wait_until(loaded, "the changed card loaded", limit_s=10)
        assert server.registry.get_sample_value("ecu_rate_card_info", {"version": V2}) == 1


async def test_only_an_admin_learns_which_organizations_negotiated_terms() -> None:
    """GetRateCard names organizations with negotiated terms to the admin token's holder only;
    any other caller learns at most whether the organization it names has terms."""
    assert len(CARD.organizations) >= 1
    member = sorted(CARD.organizations)[0]
    settings = make_settings("embedded")
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = quota_pb2_grpc.QuotaStub(ch)
            admin = await stub.GetRateCard(pb.GetRateCardRequest(), metadata=ADMIN_METADATA)
            assert list(admin.organizations_with_terms) == sorted(CARD.organizations)
            anyone = await stub.GetRateCard(pb.GetRateCardRequest())
            assert list(anyone.organizations_with_terms) == []
            assert anyone.version == admin.version and anyone.models == admin.models
            own = await stub.GetRateCard(pb.GetRateCardRequest(organization=member))
            assert list(own.organizations_with_terms) == [member]
            other = await stub.GetRateCard(pb.GetRateCardRequest(organization="no-terms-org"))
            assert list(other.organizations_with_terms) == []
            wrong = await stub.GetRateCard(
                pb.GetRateCardRequest(), metadata=(("authorization", "Bearer not-it"),)
            )
            assert list(wrong.organizations_with_terms) == []
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.GetRateCard(pb.GetRateCardRequest(organization="no{way}"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(grace=0)
