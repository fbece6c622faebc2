"""Outbox events: validate one Redis stream entry into a typed event, or say why not.

Pure Python, no SQL. An entry is a flat mapping of strings (bytes are decoded as UTF-8). Common
fields: ``type``, ``eid`` (unique per organization), ``org``, ``ts`` (ms, Redis clock); the rest
depends on the type (see ``SPECS``). Fields not in the spec are allowed and kept in the payload.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ecu_sidecar.jobs import JobPolicy, JobState
from ecu_sidecar.ledger.types import NotificationKind
from ecu_sidecar.model import GrantKind, JobType
from ecu_sidecar.validation import CALLER_ID_MAX, ID_PATTERN, MODEL_MAX, MODEL_PATTERN, SCOPE_ID_MAX

__all__ = ["MAX_VALUE", "SPECS", "Event", "Parsed", "Rejected", "parse_event", "parse_events"]

#: Every integer field lies in [-MAX_VALUE, MAX_VALUE]: what Lua doubles hold exactly, and far
#: inside BIGINT so no sum of a realistic ledger overflows.
MAX_VALUE = 2**53
EVENT_ID_MAX = 256
TEXT_MAX = 256
JSON_MAX = 65_536
_EVENT_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_TEXT = re.compile(r"[^\x00-\x1f\x7f]*")
#: json.dumps(fields, sort_keys=True, separators=(",", ":")), its encoder made once.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

# Field kinds: how a value is checked and what it becomes.
_GRANT_KINDS = frozenset(k.value for k in GrantKind)
_JOB_TYPES = frozenset(j.value for j in JobType) | {""}
_NOTIFY_KINDS = frozenset(k.value for k in NotificationKind)

#: Per event type: (field, kind, required). Optional fields default to None (flags to False).
SPECS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "grant": (
        ("grant_id", "caller_id", True),
        ("amount", "positive", True),
        ("kind", "grant_kind", True),
        ("expires_at", "amount", True),
    ),
    "grant_expire": (
        ("grant_id", "caller_id", True),
        ("amount", "amount", True),
    ),
    "reserve": (
        ("rid", "caller_id", True),
        ("amount", "amount", True),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
        ("user", "opt_id", True),
        ("job", "job", True),
        ("model", "model", True),
        ("deadline", "amount", True),
        ("job_id", "opt_caller_id", False),
        ("extra", "amount", False),
    ),
    "extend": (
        ("rid", "caller_id", True),
        ("deadline", "amount", True),
        ("sequence", "amount", True),
    ),
    "commit": (
        ("rid", "caller_id", True),
        ("amount", "amount", True),
        ("actual", "amount", True),
        ("committed", "amount", True),
        ("released", "amount", True),
        ("overage", "amount", True),
        ("unbilled", "amount", True),
        ("late", "flag", True),
        ("orphan", "flag", False),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
        ("user", "opt_id", True),
        ("job", "job", True),
        ("model", "model", True),
        ("tokens_in", "amount", True),
        ("tokens_out", "amount", True),
        ("calls", "amount", True),
        ("rcv", "text", False),
        ("lines", "json", False),
        ("job_id", "opt_caller_id", False),
        ("job_uecu", "amount", False),
    ),
    "release": (
        ("rid", "caller_id", True),
        ("amount", "amount", True),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
        ("user", "opt_id", True),
        ("job", "job", True),
        ("model", "model", True),
        ("job_id", "opt_caller_id", False),
    ),
    "cap": (
        ("scope", "scope", True),
        ("scope_id", "id", True),
        ("cap", "cap", True),
    ),
    "autotopup": (
        ("threshold", "cap", True),
        ("amount", "amount", True),
    ),
    "notify": (
        ("kind", "notify_kind", True),
        ("available", "int", True),
        ("generation", "amount", False),
        ("threshold", "int", False),
        ("reference", "int", False),
        ("amount", "amount", False),
    ),
    "job_open": (
        ("job_id", "caller_id", True),
        ("amount", "positive", True),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
        ("user", "opt_id", True),
        ("job", "job", True),
        ("rcv", "text", False),
        ("policy", "job_policy", True),
        ("ttl", "amount", True),
        ("extra_max", "amount", True),
    ),
    "job_close": (
        ("job_id", "caller_id", True),
        ("state", "job_end", True),
        ("returned", "amount", True),
        ("steps_uecu", "amount", True),
        ("committed", "amount", True),
        ("approved", "positive", True),
        ("extra", "amount", True),
        ("job", "job", True),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
    ),
    # Reconciliation writes absolute values into Redis; the ledger keeps them as an audit trail.
    "hydrate": (),
    "repair": (),
}
SPECS["expire"] = SPECS["release"]


@dataclass(frozen=True, slots=True)
class Event:
    """A validated outbox event."""

    type: str
    event_id: str
    org: str
    ts: int
    values: dict[str, Any]
    """The type's fields, parsed (ints, bools, None for absent optionals)."""
    extra: dict[str, str]
    """Fields beyond the common ones and the type's spec (kept, not interpreted)."""
    fingerprint: str
    """sha256 of the canonical payload: tells a redelivery from a reused event id."""
    payload: str
    """Every field as canonical JSON (sorted keys, ASCII)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that cannot be applied, with the reason; it goes to quarantine."""

    org: str
    event_id: str
    type: str
    fingerprint: str
    payload: str
    reason: str


@dataclass(frozen=True, slots=True)
class Parsed:
    """A batch of entries validated (``parse_events``), in their order: what
    ``Ledger.write_events`` takes, so that a caller can validate one batch while the database
    writes the previous one."""

    events: tuple[Event, ...]
    rejected: tuple[Rejected, ...]

    def __len__(self) -> int:
        return len(self.events) + len(self.rejected)


class _Invalid(Exception):
    pass


def canonical(fields: Mapping[str, str]) -> tuple[str, str]:
    """The canonical JSON of an entry (sorted keys, ASCII, no spaces) and its fingerprint, the
    sha256 of it. The ledger stores both: this text never changes."""
    payload = _CANONICAL.encode(fields)
    return payload, hashlib.sha256(payload.encode("ascii")).hexdigest()


def _decode(raw: Mapping[Any, Any]) -> tuple[dict[str, str], list[str]]:
    """Strings as they are, bytes decoded (undecodable bytes kept as surrogates, refused later),
    anything else as its repr; returns the fields and the names of the non-string values."""
    if type(raw) is dict and {*map(type, raw), *map(type, raw.values())} == {str}:
        return raw, []  # the flusher's case: nothing to convert (never modified below)
    out: dict[str, str] = {}
    odd: list[str] = []
    for k, v in raw.items():
        key = k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k)
        if isinstance(v, bytes):
            out[key] = v.decode("utf-8", "surrogateescape")
        elif isinstance(v, str):
            out[key] = v
        else:
            out[key] = repr(v)
            odd.append(key)
    return out, odd


def parse_event(raw: Mapping[Any, Any]) -> Event | Rejected:
    """Validate one outbox entry, field by field, naming the first fault; never raises for bad
    content."""
    fields, odd = _decode(raw)
    payload, fingerprint = canonical(fields)
    org = fields.get("org", "")
    eid = fields.get("eid", "")
    etype = fields.get("type", "")
    try:
        if odd:
            raise _Invalid(f"fields {odd} are not strings")
        _check_texts(fields, payload)
        for name in ("type", "eid", "org", "ts"):
            if name not in fields:
                raise _Invalid(f"field {name!r} is required")
        spec = _COMPILED.get(etype)
        if spec is None:
            raise _Invalid(
                f"unknown event type {etype!r} (this ledger knows {', '.join(sorted(SPECS))})"
            )
        _ID(org, "org")
        if len(eid) > EVENT_ID_MAX or not _EVENT_ID.fullmatch(eid):
            raise _Invalid(f"field 'eid': expected 1-{EVENT_ID_MAX} printable ASCII characters")
        ts = _AMOUNT(fields["ts"], "ts")
        values: dict[str, Any] = {}
        for name, check, required, default in spec.fields:
            text = fields.get(name)
            if text is not None:
                values[name] = check(text, name)
            elif required:
                raise _Invalid(f"field {name!r} is required in {etype} events")
            else:
                values[name] = default
        if fields.keys() <= spec.known:
            extra: dict[str, str] = {}
        else:
            extra = {k: v for k, v in fields.items() if k not in spec.known}
        if etype == "commit":
            _check_commit(values)
    except _Invalid as exc:
        return Rejected(_safe(org), _safe(eid), _safe(etype), fingerprint, payload, str(exc))
    return Event(etype, eid, org, ts, values, extra, fingerprint, payload)


def parse_events(raw: Iterable[Mapping[Any, Any]]) -> Parsed:
    """Validate a batch of entries (parse_event for each); never raises for bad content."""
    events: list[Event] = []
    rejected: list[Rejected] = []
    for entry in raw:
        result = parse_event(entry)
        if isinstance(result, Event):
            events.append(result)
        else:
            rejected.append(result)
    return Parsed(tuple(events), tuple(rejected))


def _check_texts(fields: dict[str, str], payload: str) -> None:
    """Every name and value: within its length, no NUL, valid UTF-8."""
    # The common case in one look at the canonical JSON: it writes NUL, every non-ASCII
    # character and lone surrogates as \u escapes, and no value is longer than the whole
    # text. Otherwise the field-by-field checks decide (and name the field).
    if (
        "\\u" not in payload
        and len(payload) <= JSON_MAX
        and max(map(len, fields), default=0) <= TEXT_MAX
    ):
        return
    for key, val in fields.items():
        _check_text(key, key, TEXT_MAX)
        _check_text(key, val, JSON_MAX)


def _safe(text: str) -> str:
    """A refused entry's org, id or type as something any text column can hold."""
    if len(text) <= EVENT_ID_MAX and _TEXT.fullmatch(text) and text.isascii():
        return text
    return json.dumps(text)[1:-1][:EVENT_ID_MAX]


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise _Invalid(f"field {name[:40]!r}: longer than {limit} characters")
    if "\x00" in value:
        raise _Invalid(f"field {name[:40]!r}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"field {name[:40]!r}: not valid UTF-8") from None


def _integer(low: int) -> Callable[[str, str], int]:
    def check(text: str, name: str) -> int:
        # What the pattern -?[0-9]{1,20} accepts (ASCII digits only: int() would also take
        # other scripts' digits, underscores and spaces).
        digits = text[1:] if text[:1] == "-" else text
        if not (0 < len(digits) <= 20 and digits.isascii() and digits.isdigit()):
            raise _Invalid(f"field {name!r}: expected an integer, got {text[:40]!r}")
        number = int(text)
        if not low <= number <= MAX_VALUE:
            raise _Invalid(f"field {name!r}: must be between {low} and {MAX_VALUE}, got {number}")
        return number

    return check


def _flag(text: str, name: str) -> bool:
    if text not in ("0", "1"):
        raise _Invalid(f"field {name!r}: expected '0' or '1', got {text[:40]!r}")
    return text == "1"


def _identifier(limit: int, optional: bool) -> Callable[[str, str], str]:
    def check(text: str, name: str) -> str:
        if not text and optional:
            return ""
        if len(text) > limit or not ID_PATTERN.fullmatch(text):
            raise _Invalid(
                f"field {name!r}: expected 1-{limit} of [A-Za-z0-9._-], got {text[:40]!r}"
            )
        return text

    return check


def _model(text: str, name: str) -> str:
    if text and (len(text) > MODEL_MAX or not MODEL_PATTERN.fullmatch(text)):
        raise _Invalid(f"field {name!r}: not a model name: {text[:40]!r}")
    return text


def _text(text: str, name: str) -> str:
    if len(text) > TEXT_MAX or not _TEXT.fullmatch(text):
        raise _Invalid(f"field {name!r}: expected at most {TEXT_MAX} printable characters")
    return text


def _json(text: str, name: str) -> str | None:
    if text == "":
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        raise _Invalid(f"field {name!r}: not valid JSON") from None
    if not isinstance(doc, (list, dict)):
        raise _Invalid(f"field {name!r}: expected a JSON array or object")
    # Escapes JSONB cannot hold (\u0000, lone surrogates) are refused here, not by the
    # database in the middle of a batch.
    for item in _json_strings(doc):
        if "\x00" in item:
            raise _Invalid(f"field {name!r}: JSON holds a NUL character")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(f"field {name!r}: JSON holds an unpaired surrogate") from None
    return text


def _choice(choices: frozenset[str]) -> Callable[[str, str], str]:
    def check(text: str, name: str) -> str:
        if text not in choices:
            raise _Invalid(
                f"field {name!r}: expected one of {', '.join(sorted(choices))}, got {text[:40]!r}"
            )
        return text

    return check


_AMOUNT = _integer(0)
_ID = _identifier(SCOPE_ID_MAX, optional=False)


def _cap(text: str, name: str) -> int | None:
    return None if text == "" else _AMOUNT(text, name)


#: Field kind -> check(text, field name) -> value, raising _Invalid.
_CHECKS: dict[str, Callable[[str, str], Any]] = {
    "amount": _AMOUNT,
    "positive": _integer(1),
    "int": _integer(-MAX_VALUE),
    "flag": _flag,
    "id": _ID,
    "opt_id": _identifier(SCOPE_ID_MAX, optional=True),
    "caller_id": _identifier(CALLER_ID_MAX, optional=False),
    "opt_caller_id": _identifier(CALLER_ID_MAX, optional=True),
    "model": _model,
    "text": _text,
    "json": _json,
    "grant_kind": _choice(_GRANT_KINDS),
    "job": _choice(_JOB_TYPES),
    "notify_kind": _choice(_NOTIFY_KINDS),
    "scope": _choice(frozenset({"team", "project"})),
    "job_policy": _choice(frozenset(p.value for p in JobPolicy)),
    "job_end": _choice(frozenset({JobState.CLOSED.value, JobState.ABANDONED.value})),
    "cap": _cap,
}


@dataclass(frozen=True, slots=True)
class _Spec:
    fields: tuple[tuple[str, Callable[[str, str], Any], bool, Any], ...]
    """(field, check, required, value when absent)"""
    known: frozenset[str]
    """The common fields and the type's own: any other field is kept in ``extra``."""


_COMPILED = {
    etype: _Spec(
        tuple(
            (name, _CHECKS[kind], req, False if kind == "flag" else None)
            for name, kind, req in spec
        ),
        frozenset({"type", "eid", "org", "ts", *(name for name, _, _ in spec)}),
    )
    for etype, spec in SPECS.items()
}


def _json_strings(doc: Any) -> Iterator[str]:
    """Every string (keys too) in a decoded JSON document."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_commit(v: dict[str, Any]) -> None:
    """The commit's own arithmetic (docs/architecture.md, holds): refuse what cannot be."""
    hold, actual, billed = v["amount"], v["actual"], v["committed"]
    if billed + v["unbilled"] != actual:
        raise _Invalid(f"commit: committed {billed} + unbilled {v['unbilled']} != actual {actual}")
    if v["orphan"] and not v["late"]:
        raise _Invalid("commit: an orphan commit must be flagged late")
    if v["late"]:
        if v["released"] or v["overage"]:
            raise _Invalid("commit: a late commit releases nothing and has no overage")
    else:
        if v["released"] != hold - min(billed, hold):
            raise _Invalid(f"commit: released {v['released']} != hold {hold} - min(billed, hold)")
        if v["overage"] != max(0, billed - hold):
            raise _Invalid(f"commit: overage {v['overage']} != max(0, billed - hold)")
    if (v["job_uecu"] or 0) > billed:
        raise _Invalid(f"commit: job_uecu {v['job_uecu']} exceeds committed {billed}")
