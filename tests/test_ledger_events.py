"""Outbox event validation and the burn-order replay: pure functions, no database."""

from __future__ import annotations

import itertools
import random

import pytest

from ecu_sidecar.ledger import burn
from ecu_sidecar.ledger.events import Event, Rejected, parse_event


def commit(**over: str) -> dict[str, str]:
    ev = {
        "type": "commit",
        "eid": "commit:r1",
        "org": "acme",
        "ts": "1000",
        "rid": "r1",
        "amount": "300",
        "actual": "200",
        "committed": "200",
        "released": "100",
        "overage": "0",
        "unbilled": "0",
        "late": "0",
        "team": "t",
        "project": "",
        "user": "u",
        "job": "inference",
        "model": "gpt-4o",
        "tokens_in": "10",
        "tokens_out": "5",
        "calls": "1",
    }
    ev.update(over)
    return ev


def test_a_valid_commit_parses_with_optional_fields_defaulted() -> None:
    ev = parse_event(commit())
    assert isinstance(ev, Event)
    assert ev.values["committed"] == 200
    assert ev.values["late"] is False
    assert ev.values["orphan"] is False
    assert ev.values["rcv"] is None and ev.values["lines"] is None


def test_bytes_from_redis_parse_like_strings() -> None:
    raw = {k.encode(): v.encode() for k, v in commit().items()}
    ev = parse_event(raw)
    assert isinstance(ev, Event)
    assert ev.fingerprint == parse_event(commit()).fingerprint


def test_unknown_fields_are_kept_not_refused() -> None:
    ev = parse_event(commit(future_field="x"))
    assert isinstance(ev, Event)
    assert ev.extra == {"future_field": "x"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "teleport"}, "unknown event type 'teleport'"),
        ({"amount": "12x"}, "field 'amount': expected an integer"),
        ({"amount": "+5"}, "field 'amount': expected an integer"),
        ({"amount": "-1"}, "field 'amount': must be between 0"),
        ({"amount": str(2**60)}, "must be between 0 and"),
        ({"late": "yes"}, "field 'late': expected '0' or '1'"),
        ({"job": "mining"}, "field 'job': expected one of"),
        ({"team": "a:b"}, "field 'team': expected 1-64 of"),
        ({"org": ""}, "field 'org': expected 1-64 of"),
        ({"eid": "commit r1"}, "field 'eid'"),
        ({"lines": "{not json"}, "field 'lines': not valid JSON"),
        ({"model": "bad model"}, "field 'model': not a model name"),
        ({"unbilled": "1"}, "committed 200 + unbilled 1 != actual 200"),
        ({"released": "0"}, "released 0 != hold 300"),
        ({"late": "1"}, "a late commit releases nothing"),
        ({"orphan": "1"}, "an orphan commit must be flagged late"),
        ({"user": "a\x00b"}, "contains a NUL character"),
        ({"lines": '["\\u0000"]'}, "JSON holds a NUL character"),
        ({"lines": '["\\ud800"]'}, "JSON holds an unpaired surrogate"),
    ],
)
def test_malformed_commits_are_rejected_with_a_reason(change: dict[str, str], reason: str) -> None:
    result = parse_event(commit(**change))
    assert isinstance(result, Rejected)
    assert reason in result.reason


def test_missing_fields_and_non_strings_are_rejected() -> None:
    ev = commit()
    del ev["calls"]
    result = parse_event(ev)
    assert isinstance(result, Rejected) and "'calls' is required in commit events" in result.reason
    result = parse_event({**commit(), "calls": 1})
    assert isinstance(result, Rejected) and "not strings" in result.reason
    result = parse_event({"type": "commit"})
    assert isinstance(result, Rejected) and "'eid' is required" in result.reason


def test_undecodable_bytes_are_rejected_and_kept_losslessly() -> None:
    raw = {k.encode(): v.encode() for k, v in commit().items()}
    raw[b"model"] = b"\xff\xfe"
    result = parse_event(raw)
    assert isinstance(result, Rejected) and "not valid UTF-8" in result.reason
    assert result.payload.isascii()


def test_every_type_of_the_lua_scripts_parses() -> None:
    base = {"org": "acme", "ts": "5"}
    samples = [
        {"type": "grant", "eid": "grant:g", "grant_id": "g", "amount": "5", "kind": "starter",
         "expires_at": "0"},
        {"type": "grant_expire", "eid": "grant_expire:g", "grant_id": "g", "amount": "0"},
        {"type": "reserve", "eid": "reserve:r", "rid": "r", "amount": "5", "team": "",
         "project": "", "user": "", "job": "judge", "model": "m", "deadline": "9"},
        {"type": "extend", "eid": "extend:r:1", "rid": "r", "deadline": "9", "sequence": "1"},
        {"type": "release", "eid": "release:r", "rid": "r", "amount": "5", "team": "",
         "project": "", "user": "", "job": "judge", "model": "m"},
        {"type": "expire", "eid": "expire:r", "rid": "r", "amount": "5", "team": "",
         "project": "", "user": "", "job": "", "model": ""},
        {"type": "cap", "eid": "cap:t:x:5:1", "scope": "team", "scope_id": "x", "cap": ""},
        {"type": "notify", "eid": "notify:low_balance_5:3", "kind": "low_balance_5",
         "available": "-4", "generation": "3", "reference": "100"},
        {"type": "hydrate", "eid": "hydrate:1", "granted": "100", "balance": "50"},
    ]  # fmt: skip
    for sample in samples:
        assert isinstance(parse_event({**base, **sample}), Event), sample


def test_burn_replay_matches_a_commit_by_commit_simulation() -> None:
    rng = random.Random(7)
    for _ in range(200):
        grants = []
        for i in range(rng.randrange(1, 5)):
            start = rng.randrange(0, 100)
            grants.append(burn.ExpiringGrant(f"g{i}", start, start + rng.randrange(1, 80), 50))
        commits = sorted((rng.randrange(0, 200), rng.randrange(0, 40)) for _ in range(15))
        # Reference: apply events one by one in time order, grants before commits at a tie.
        rest: dict[str, int] = {}
        active: set[str] = set()
        timeline = [(g.granted_at_ms, 0, g) for g in grants] + [
            (t, 1, amount) for t, amount in commits
        ]
        for t, kind, item in sorted(timeline, key=lambda x: (x[0], x[1])):
            for g in grants:
                if g.grant_id in active and g.expires_at_ms <= t:
                    active.discard(g.grant_id)
            if kind == 0:
                rest[item.grant_id] = item.amount_uecu
                if item.expires_at_ms > t:
                    active.add(item.grant_id)
                continue
            spend = item
            for g in sorted(grants, key=lambda g: (g.expires_at_ms, g.grant_id)):
                if g.grant_id in active and spend:
                    take = min(rest[g.grant_id], spend)
                    rest[g.grant_id] -= take
                    spend -= take
                    if rest[g.grant_id] == 0:
                        active.discard(g.grant_id)
        bounds = burn.boundaries(grants)
        sums = [sum(a for t, a in commits if lo <= t < hi) for lo, hi in itertools.pairwise(bounds)]
        assert burn.replay(grants, bounds, sums) == rest
