"""Edge validation (ecu_sidecar.validation): what passes, what is refused, and the field named."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ecu_sidecar import errors
from ecu_sidecar.model import MAX_REQUEST_UECU, CommitItem, JobType, ReserveItem, Usage
from ecu_sidecar.validation import (
    MAX_COUNT,
    check_commit,
    check_reservation_id,
    check_step,
    check_usage_lines,
)

MIN_TTL, MAX_TTL = 1_000, 86_400_000

_AMOUNTS = st.integers(min_value=1, max_value=MAX_REQUEST_UECU)
_JOB_TYPES = st.sampled_from(list(JobType))
_MODELS = st.sampled_from(["gpt-4o", "anthropic/claude-3.5@2024", "m:1+x", "a" * 128])
_TTLS = st.sampled_from([0, MIN_TTL, 3_600_000, MAX_TTL])
_COUNTS = st.integers(min_value=0, max_value=MAX_COUNT)
_ITEMS = st.one_of(st.none(), st.integers(0, 999))


@hsettings(max_examples=300, deadline=None)
@given(step=st.builds(ReserveItem, st.just("r-1"), _AMOUNTS, _JOB_TYPES, _MODELS, _TTLS), at=_ITEMS)
def test_every_valid_step_passes_unchanged(step: ReserveItem, at: int | None) -> None:
    assert check_step(step, MIN_TTL, MAX_TTL, item=at) is step


@hsettings(max_examples=300, deadline=None)
@given(
    commit=st.builds(
        CommitItem,
        st.just("r-1"),
        st.integers(0, MAX_REQUEST_UECU),
        st.builds(Usage, _COUNTS, _COUNTS, _COUNTS),
    ),
    at=_ITEMS,
)
def test_every_valid_commit_of_an_amount_passes_unchanged(
    commit: CommitItem, at: int | None
) -> None:
    assert check_commit(commit, item=at) is commit


_ODD_STEPS = [
    (ReserveItem("r", 0, JobType.JUDGE, "m"), "amount_uecu"),
    (ReserveItem("r", -1, JobType.JUDGE, "m"), "amount_uecu"),
    (ReserveItem("r", MAX_REQUEST_UECU + 1, JobType.JUDGE, "m"), "amount_uecu"),
    (ReserveItem("r", True, JobType.JUDGE, "m"), "amount_uecu"),  # type: ignore[arg-type]
    (ReserveItem("r", 1.0, JobType.JUDGE, "m"), "amount_uecu"),  # type: ignore[arg-type]
    (ReserveItem("r", 5, JobType.JUDGE, "m", job=[object()]), "amount_uecu"),  # not both
    (ReserveItem("r", 1_000, 3, "m"), "job_type"),  # type: ignore[arg-type]
    (ReserveItem("r", 1_000, "inference", "m"), "job_type"),  # type: ignore[arg-type]
    (ReserveItem("r", 1_000, JobType.INFERENCE, ""), "model"),  # a model is required
    (ReserveItem("r", 1_000, JobType.GEPA, "x y"), "model"),
    (ReserveItem("r", 1_000, JobType.GEPA, "a" * 129), "model"),
    (ReserveItem("r", 1_000, JobType.JUDGE, "m", -5), "ttl_ms"),
    (ReserveItem("r", 1_000, JobType.JUDGE, "m", MIN_TTL - 1), "ttl_ms"),
    (ReserveItem("r", 1_000, JobType.JUDGE, "m", MAX_TTL + 1), "ttl_ms"),
    (ReserveItem("r", 1_000, JobType.JUDGE, "m", True), "ttl_ms"),  # type: ignore[arg-type]
    (ReserveItem("r", 1_000, JobType.JUDGE, "m", 0.0), "ttl_ms"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("step", "field"), _ODD_STEPS)
@pytest.mark.parametrize(("at", "prefix"), [(None, ""), (7, "items[7].")])
def test_a_faulty_step_is_refused_naming_its_field(
    step: ReserveItem, field: str, at: int | None, prefix: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        check_step(step, MIN_TTL, MAX_TTL, item=at)
    assert caught.value.field == prefix + field


def test_the_first_faulty_field_is_named() -> None:
    """Fields are checked in request order: amount, job type, model, TTL."""
    worst = ReserveItem("r", 0, 99, "x y", -1)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="amount_uecu"):
        check_step(worst, MIN_TTL, MAX_TTL)
    with pytest.raises(errors.InvalidArgument, match="job_type"):
        check_step(ReserveItem("r", 1, 99, "x y", -1), MIN_TTL, MAX_TTL)  # type: ignore[arg-type]


def test_a_step_with_a_job_spec_is_checked_in_two_parts() -> None:
    """Before pricing only that it names no amount (its job type and model may come from the
    spec); once priced, the rest, with the model no longer required."""
    unpriced = ReserveItem("r", 0, None, "", job=[object()])  # type: ignore[arg-type]
    assert check_step(unpriced, MIN_TTL, MAX_TTL) is unpriced
    priced = ReserveItem("r", 0, JobType.INFERENCE, "", rate_card_version="v1")
    assert check_step(priced, MIN_TTL, MAX_TTL, priced=True) is priced
    with pytest.raises(errors.InvalidArgument, match="ttl_ms"):
        check_step(ReserveItem("r", 0, JobType.GEPA, "", 1), MIN_TTL, MAX_TTL, priced=True)


_ODD = [-1, MAX_COUNT + 1, True, 1.0, None]


@pytest.mark.parametrize("odd", _ODD)
@pytest.mark.parametrize("field", ["tokens_in", "tokens_out", "calls"])
def test_a_faulty_usage_count_is_refused_naming_its_field(odd: object, field: str) -> None:
    usage = Usage(**{field: odd})  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument) as caught:
        check_commit(CommitItem("r", 5, usage), item=2)
    assert caught.value.field == f"items[2].usage.{field}"


@pytest.mark.parametrize("odd", [-1, MAX_REQUEST_UECU + 1, True, 1.0, "5"])
def test_a_faulty_actual_is_refused(odd: object) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        check_commit(CommitItem("r", odd))  # type: ignore[arg-type]
    assert caught.value.field == "actual_uecu"


def test_usage_lines_carry_the_amount_usage_and_need_the_rate_card_version() -> None:
    lines = ["a usage line"]
    with pytest.raises(errors.InvalidArgument, match="actual_uecu"):
        check_usage_lines(CommitItem("r", 5, usage_lines=lines, rate_card_version="v1"))
    with pytest.raises(errors.InvalidArgument, match="usage"):
        check_usage_lines(CommitItem("r", 0, Usage(1), "v1", usage_lines=lines))
    with pytest.raises(errors.InvalidArgument, match="rate_card_version"):
        check_usage_lines(CommitItem("r", 0, usage_lines=lines))
    with pytest.raises(errors.InvalidArgument, match="rate_card_version"):
        check_commit(CommitItem("r", 5, rate_card_version="v1"))  # without lines
    # No line at all (the job made no call) is a usage commit too, priced at 0; with an
    # amount or usage counts beside it, the version is the stray field.
    empty = CommitItem("r", 0, rate_card_version="v1", usage_lines=[])
    assert check_usage_lines(empty) is empty
    for stray in (CommitItem("r", 5, usage_lines=[]), CommitItem("r", 0, Usage(1), usage_lines=[])):
        with pytest.raises(errors.InvalidArgument) as caught:
            check_usage_lines(replace(stray, rate_card_version="v1"), item=2)
        assert caught.value.field == "items[2].rate_card_version"
        assert "empty usage list at 0" in caught.value.description
    # Once priced, a sum of counts past the bound names the lines.
    with pytest.raises(errors.InvalidArgument) as caught:
        check_commit(CommitItem("r", 5, Usage(MAX_COUNT + 1), "v1"), priced=True, item=0)
    assert caught.value.field == "items[0].usage_lines"


def test_reservation_ids_are_valid_and_distinct_within_a_request() -> None:
    seen: set[str] = set()
    check_reservation_id("a", seen, item=0)
    with pytest.raises(errors.InvalidArgument, match="appears twice") as caught:
        check_reservation_id("a", seen, item=1)
    assert caught.value.field == "items[1].reservation_id"
    for odd in ("", "x" * 129, "{a}", "a:b"):
        with pytest.raises(errors.InvalidArgument):
            check_reservation_id(odd, set())


def test_a_commit_naming_only_the_rate_card_version_is_an_empty_usage_list() -> None:
    """proto3 cannot tell an empty repeated field from a missing one: the version is what says
    a commit is priced from usage lines, so naming it alone reports no usage (priced at 0)."""
    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.convert import commit_item_from_pb

    named = commit_item_from_pb(pb.CommitRequest(reservation_id="r", rate_card_version="v1"))
    assert named.usage_lines == []
    plain = commit_item_from_pb(pb.CommitRequest(reservation_id="r", actual_uecu=5))
    assert plain.usage_lines is None
