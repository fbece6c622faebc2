"""Outbox events: validate one Redis stream entry into a typed event, or say why not.

Pure Python, no SQL. An entry is a flat mapping of strings (bytes are decoded as UTF-8). Common
fields: ``type``, ``eid`` (unique per organization), ``org``, ``ts`` (ms, Redis clock); the rest
depends on the type (see ``SPECS``). Fields not in the spec are allowed and kept in the payload.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ecu_sidecar.ledger.types import NotificationKind
from ecu_sidecar.model import GrantKind, JobType
from ecu_sidecar.validation import CALLER_ID_MAX, ID_PATTERN, MODEL_MAX, MODEL_PATTERN, SCOPE_ID_MAX

__all__ = ["MAX_VALUE", "SPECS", "Event", "Rejected", "parse_event"]

#: Every integer field lies in [-MAX_VALUE, MAX_VALUE]: what Lua doubles hold exactly, and far
#: inside BIGINT so no sum of a realistic ledger overflows.
MAX_VALUE = 2**53
EVENT_ID_MAX = 256
TEXT_MAX = 256
JSON_MAX = 65_536
_INT = re.compile(r"-?[0-9]{1,20}")
_EVENT_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_TEXT = re.compile(r"[^\x00-\x1f\x7f]*")

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
    ),
    "release": (
        ("rid", "caller_id", True),
        ("amount", "amount", True),
        ("team", "opt_id", True),
        ("project", "opt_id", True),
        ("user", "opt_id", True),
        ("job", "job", True),
        ("model", "model", True),
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


class _Invalid(Exception):
    pass


def canonical(fields: Mapping[str, str]) -> tuple[str, str]:
    """The canonical JSON of an entry and its fingerprint."""
    payload = json.dumps(dict(fields), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return payload, hashlib.sha256(payload.encode("ascii")).hexdigest()


def _decode(raw: Mapping[Any, Any]) -> tuple[dict[str, str], list[str]]:
    """Strings as they are, bytes decoded (undecodable bytes kept as surrogates, refused later),
    anything else as its repr; returns the fields and the names of the non-string values."""
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
    """Validate one outbox entry; never raises for bad content."""
    fields, odd = _decode(raw)
    payload, fingerprint = canonical(fields)
    org = fields.get("org", "")
    eid = fields.get("eid", "")
    etype = fields.get("type", "")
    try:
        if odd:
            raise _Invalid(f"fields {odd} are not strings")
        for key, val in fields.items():
            _check_text(key, key, TEXT_MAX)
            _check_text(key, val, JSON_MAX)
        for name in ("type", "eid", "org", "ts"):
            if name not in fields:
                raise _Invalid(f"field {name!r} is required")
        spec = SPECS.get(etype)
        if spec is None:
            raise _Invalid(
                f"unknown event type {etype!r} (this ledger knows {', '.join(sorted(SPECS))})"
            )
        _value("org", "id", org)
        if len(eid) > EVENT_ID_MAX or not _EVENT_ID.fullmatch(eid):
            raise _Invalid(f"field 'eid': expected 1-{EVENT_ID_MAX} printable ASCII characters")
        ts = _value("ts", "amount", fields["ts"])
        values: dict[str, Any] = {}
        for name, kind, required in spec:
            if name in fields:
                values[name] = _value(name, kind, fields[name])
            elif required:
                raise _Invalid(f"field {name!r} is required in {etype} events")
            else:
                values[name] = False if kind == "flag" else None
        known = {"type", "eid", "org", "ts"} | {name for name, _, _ in spec}
        extra = {k: v for k, v in fields.items() if k not in known}
        if etype == "commit":
            _check_commit(values)
    except _Invalid as exc:
        return Rejected(_safe(org), _safe(eid), _safe(etype), fingerprint, payload, str(exc))
    return Event(etype, eid, org, ts, values, extra, fingerprint, payload)


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


def _value(name: str, kind: str, text: str) -> Any:
    if kind in ("amount", "positive", "int"):
        if not _INT.fullmatch(text):
            raise _Invalid(f"field {name!r}: expected an integer, got {text[:40]!r}")
        number = int(text)
        low = {"amount": 0, "positive": 1, "int": -MAX_VALUE}[kind]
        if not low <= number <= MAX_VALUE:
            raise _Invalid(f"field {name!r}: must be between {low} and {MAX_VALUE}, got {number}")
        return number
    if kind == "flag":
        if text not in ("0", "1"):
            raise _Invalid(f"field {name!r}: expected '0' or '1', got {text[:40]!r}")
        return text == "1"
    if kind in ("id", "opt_id", "caller_id"):
        limit = CALLER_ID_MAX if kind == "caller_id" else SCOPE_ID_MAX
        if not text and kind == "opt_id":
            return ""
        if len(text) > limit or not ID_PATTERN.fullmatch(text):
            raise _Invalid(
                f"field {name!r}: expected 1-{limit} of [A-Za-z0-9._-], got {text[:40]!r}"
            )
        return text
    if kind == "model":
        if text and (len(text) > MODEL_MAX or not MODEL_PATTERN.fullmatch(text)):
            raise _Invalid(f"field {name!r}: not a model name: {text[:40]!r}")
        return text
    if kind == "text":
        if len(text) > TEXT_MAX or not _TEXT.fullmatch(text):
            raise _Invalid(f"field {name!r}: expected at most {TEXT_MAX} printable characters")
        return text
    if kind == "json":
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
    choices = {
        "grant_kind": _GRANT_KINDS,
        "job": _JOB_TYPES,
        "notify_kind": _NOTIFY_KINDS,
        "scope": frozenset({"team", "project"}),
    }
    if kind in choices:
        if text not in choices[kind]:
            raise _Invalid(
                f"field {name!r}: expected one of {', '.join(sorted(choices[kind]))}, "
                f"got {text[:40]!r}"
            )
        return text
    if kind == "cap":
        return None if text == "" else _value(name, "amount", text)
    raise AssertionError(f"unknown field kind {kind}")


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
