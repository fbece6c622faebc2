"""Outbox event validation and the burn-order replay: pure functions, no database."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecu_sidecar.ledger import burn, events
from ecu_sidecar.ledger.events import SPECS, Event, Rejected, parse_event
from ecu_sidecar.ledger.types import NotificationKind
from ecu_sidecar.model import GrantKind, JobType


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
        entry = {**base, **sample}
        assert isinstance(parse_event(entry), Event), sample


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


# -- the fast path: the same result as the checks, for every entry it takes -----------------

_ID_CHARS = "abcXYZ019._-"
_ODD_CHARS = ':/ @+"\\\x00\x1f\x7fé\u2028\udc80'
_NUMBERS = st.one_of(
    st.integers(-(2**64), 2**64).map(str),
    st.integers(0, 10**15 - 1).map(str),
    st.sampled_from(
        ["", "0", "-0", "007", "+1", "1_000", " 1", "1.0", "\u0661\u0662", str(2**53), "9" * 16]
    ),
)
_IDS = st.one_of(
    st.text(_ID_CHARS, max_size=8),
    st.text(_ID_CHARS + _ODD_CHARS, max_size=8),
    st.integers(60, 132).map(lambda n: "x" * n),
)
_JSON_TEXTS = st.sampled_from(
    ["", "{}", "[]", '[1, "a"]', '{"a": "b\\"c"}', '[{"k": "\u00e9"}]', '{"a": "\\u00e9"}',
     '["\\u0000"]', '["\\ud800"]', '["\udc80"]', '{not json', '"str"', "null", "[1]\x00",
     '{"a": "x\x01"}']
)  # fmt: skip
_CHOICES = st.sampled_from(
    ["", "inference", "judge", "gepa", "starter", "top_up", "team", "project", "mining",
     "Inference", "low_balance_5", "low_balance_20", "auto_topup", "x y"]
)  # fmt: skip
_BY_KIND = {
    "amount": _NUMBERS,
    "positive": _NUMBERS,
    "int": _NUMBERS,
    "cap": _NUMBERS,
    "flag": st.sampled_from(["0", "1", "2", "", "yes"]),
    "id": _IDS,
    "opt_id": _IDS,
    "caller_id": _IDS,
    "opt_caller_id": _IDS,
    "job_policy": _CHOICES,
    "job_end": _CHOICES,
    "model": st.one_of(_IDS, st.sampled_from(["gpt-4o", "org/m@1+x:y", "a b"])),
    "text": st.one_of(st.text(max_size=10), st.integers(250, 260).map(lambda n: "v" * n)),
    "json": st.one_of(_JSON_TEXTS, st.text(max_size=10)),
    "grant_kind": _CHOICES,
    "job": _CHOICES,
    "notify_kind": _CHOICES,
    "scope": _CHOICES,
}

#: Values in the forms the scripts write.
_WELL_FORMED = {
    "amount": st.integers(0, 10**15 - 1).map(str),
    "positive": st.integers(1, 10**15 - 1).map(str),
    "int": st.integers(-(10**15) + 1, 10**15 - 1).map(str),
    "cap": st.one_of(st.just(""), st.integers(0, 10**15 - 1).map(str)),
    "flag": st.sampled_from(["0", "1"]),
    "id": st.text(_ID_CHARS, min_size=1, max_size=64),
    "opt_id": st.text(_ID_CHARS, max_size=64),
    "caller_id": st.text(_ID_CHARS, min_size=1, max_size=128),
    "opt_caller_id": st.text(_ID_CHARS, max_size=128),
    "job_policy": st.sampled_from(["refuse", "wallet"]),
    "job_end": st.sampled_from(["C", "X"]),
    "model": st.text(_ID_CHARS + "/@+:", max_size=128),
    "text": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=256),
    "json": st.sampled_from(["", "{}", '[{"model": "m", "tokens_in": 5}]', '{"a": "b\\"c"}']),
    "grant_kind": st.sampled_from(sorted(k.value for k in GrantKind)),
    "job": st.sampled_from(["", *sorted(j.value for j in JobType)]),
    "notify_kind": st.sampled_from(sorted(k.value for k in NotificationKind)),
    "scope": st.sampled_from(["team", "project"]),
}


@st.composite
def _entries(draw: st.DrawFn) -> dict[str, str]:
    """Entries of every type, a third of them well-formed, with every sort of fault mixed in."""
    etype = draw(st.sampled_from(sorted(SPECS)))
    faulty = draw(st.integers(0, 9)) == 0
    entry = {
        "type": etype,
        "eid": draw(_IDS if faulty else st.text(_ID_CHARS + ":'", min_size=1, max_size=20)),
        "org": draw(_IDS if draw(st.integers(0, 9)) == 0 else _WELL_FORMED["id"]),
        "ts": draw(_NUMBERS if draw(st.integers(0, 9)) == 0 else _WELL_FORMED["amount"]),
    }
    for name, kind, _ in SPECS[etype]:
        roll = draw(st.integers(0, 29))
        if roll == 0:
            continue  # absent
        entry[name] = draw(_BY_KIND[kind] if roll == 1 else _WELL_FORMED[kind])
    if etype == "commit" and draw(st.booleans()):
        # The commit's own arithmetic holds (or the checks refuse it whatever the fields).
        hold, billed = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        late = draw(st.booleans())
        entry |= {
            "amount": str(hold), "actual": str(billed), "committed": str(billed),
            "unbilled": "0", "late": "1" if late else "0",
            "released": "0" if late else str(hold - min(billed, hold)),
            "overage": "0" if late else str(max(0, billed - hold)),
        }  # fmt: skip
    for name in draw(st.lists(st.sampled_from(["rcv", "future", "type2", "a"]), max_size=2)):
        entry[name] = draw(st.one_of(st.text(max_size=5), st.just("v1")))
    if draw(st.integers(0, 19)) == 0:
        entry["type"] = draw(_CHOICES)
    return entry


@settings(max_examples=1000, deadline=None)
@given(entry=_entries())
def test_any_entry_parses_or_is_rejected_with_a_reason(entry: dict[str, str]) -> None:
    result = parse_event(entry)
    payload, fingerprint = events.canonical(entry)
    assert (result.payload, result.fingerprint) == (payload, fingerprint)
    if isinstance(result, Rejected):
        assert result.reason
    else:
        assert (result.type, result.event_id, result.org) == (
            entry["type"],
            entry["eid"],
            entry["org"],
        )


@settings(max_examples=500, deadline=None)
@given(data=st.data(), etype=st.sampled_from(sorted(set(SPECS) - {"hydrate", "repair"})))
def test_every_well_formed_entry_parses(data: st.DataObject, etype: str) -> None:
    """Values in the forms the scripts write: none is refused."""
    entry = {"type": etype, "eid": f"{etype}:r:1", "org": "acme", "ts": "1795809824644"}
    for name, kind, required in SPECS[etype]:
        if required or data.draw(st.booleans()):
            entry[name] = data.draw(_WELL_FORMED[kind])
    if etype == "commit":
        hold, billed = data.draw(st.integers(0, 10**9)), data.draw(st.integers(0, 10**9))
        entry |= {
            "amount": str(hold), "actual": str(billed), "committed": str(billed),
            "unbilled": "0", "late": "0", "orphan": "0",
            "released": str(hold - min(billed, hold)), "overage": str(max(0, billed - hold)),
        }  # fmt: skip
        if "job_uecu" in entry:  # a step bills from its job's money at most what it billed
            entry["job_uecu"] = str(data.draw(st.integers(0, billed)))
    if etype == "reserve" and data.draw(st.booleans()):
        entry["rcv"] = data.draw(_WELL_FORMED["text"])
    assert isinstance(parse_event(entry), Event), parse_event(entry)


#: Entries and their canonical JSON and fingerprint as the ledger has always stored them (the
#: fingerprint tells a redelivery from a reused event id, so this text may never change).
_CANONICAL_FORMS = [
    (
        commit(eid="commit:r1:1795809824644", ts="1795809824644", project="p", user="u",
               job="judge", model="gpt-4o-mini", rcv="v1", tokens_in="900", tokens_out="350",
               lines='[{"model": "m", "tokens_in": 5}]'),
        '{"actual":"200","amount":"300","calls":"1","committed":"200",'
        '"eid":"commit:r1:1795809824644","job":"judge","late":"0",'
        '"lines":"[{\\"model\\": \\"m\\", \\"tokens_in\\": 5}]","model":"gpt-4o-mini",'
        '"org":"acme","overage":"0","project":"p","rcv":"v1","released":"100","rid":"r1",'
        '"team":"t","tokens_in":"900","tokens_out":"350","ts":"1795809824644","type":"commit",'
        '"unbilled":"0","user":"u"}',
        "b6851bfb0324b7a631eaec0ffd2f0d1ce6106be5c8083800640c76ee705cae6a",
    ),
    (
        {"type": "reserve", "eid": "reserve:r", "org": "acme", "ts": "1", "rid": "r",
         "amount": "1", "team": "", "project": "", "user": "\x00", "job": "\udcff",
         "model": "", "deadline": "5"},
        '{"amount":"1","deadline":"5","eid":"reserve:r","job":"\\udcff","model":"",'
        '"org":"acme","project":"","rid":"r","team":"","ts":"1","type":"reserve",'
        '"user":"\\u0000"}',
        "56d688f498aa277b6d417115dcffe70f3be2243a8cd8fe9831c80673c505fe05",
    ),
    (
        {"\u00e9": "\u00fc\u2028", 'a"b': "c\\d\n\t", "zz": "", "A": "\U0001f600",
         "future": "x"},
        '{"A":"\\ud83d\\ude00","a\\"b":"c\\\\d\\n\\t","future":"x","zz":"",'
        '"\\u00e9":"\\u00fc\\u2028"}',
        "b8b1d416a1d0b792c509f5c790b7e3cc4f94e7364364131810ca2c126570b615",
    ),
    ({}, "{}", "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "payload", "fingerprint"), _CANONICAL_FORMS)
def test_the_canonical_json_is_the_text_the_ledger_stores(
    fields: dict[str, str], payload: str, fingerprint: str
) -> None:
    assert events.canonical(fields) == (payload, fingerprint)
