"""The rate card file: a versioned TOML file of per-model ECU rates, platform fees and
enterprise terms, read and validated into a ``RateCard`` (its types live in ``card``, and are
re-exported here).

Every amount is an integer number of µECU; token rates are µECU per 1,000,000 tokens. Loading
validates everything and raises ``RateCardError`` naming the file, the path to the field
(``models.gpt-4o.input_uecu_per_mtok``) and what is wrong. Unknown keys are errors, so a typo
is never silently ignored. The format is documented in docs/pricing.md, with the complete
example in ratecards/example.toml.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import math
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any

from ecu_sidecar.pricing.card import (
    FeeOverride,
    Fees,
    ModelOverride,
    ModelRates,
    OrganizationTerms,
    RateCard,
    RateCardError,
)
from ecu_sidecar.pricing.tokens import ENCODINGS
from ecu_sidecar.validation import ID_PATTERN, MODEL_MAX, MODEL_PATTERN, SCOPE_ID_MAX

__all__ = [
    "FEE_KEYS",
    "MAX_CONTEXT_TOKENS",
    "MAX_ESTIMATE_FACTOR_PERCENT",
    "MAX_RATE_UECU",
    "OPTIONAL_FEE_KEYS",
    "FeeOverride",
    "Fees",
    "ModelOverride",
    "ModelRates",
    "OrganizationTerms",
    "RateCard",
    "RateCardError",
    "format_path",
    "load_rate_card",
    "parse_rate_card",
]

#: Ceiling on every rate and fee (µECU per 1M tokens, or µECU per call/iteration/trace):
#: 10^12 µECU = 10^6 ECU. Higher is a units mistake; with it, a worst case that still passes
#: 10^15 µECU needs absurd counts and is refused when priced (MAX_REQUEST_UECU).
MAX_RATE_UECU = 10**12
#: Ceiling on context_window and max_output_tokens.
MAX_CONTEXT_TOKENS = 100_000_000
#: Ceiling on estimate_factor_percent (10× the tokenizer's count).
MAX_ESTIMATE_FACTOR_PERCENT = 1_000
#: The four platform fees every card sets, each an integer µECU amount.
FEE_KEYS = ("engine_call_uecu", "judge_call_uecu", "gepa_iteration_uecu", "trace_uecu")
#: Fees a card may leave out (absent: BYOK calls pay engine_call_uecu).
OPTIONAL_FEE_KEYS = ("byok_engine_call_uecu",)
_ALL_FEE_KEYS = FEE_KEYS + OPTIONAL_FEE_KEYS

_TOP_KEYS = ("version", "description", "fees", "models", "organizations")
_MODEL_KEYS = (
    "input_uecu_per_mtok",
    "output_uecu_per_mtok",
    "encoding",
    "context_window",
    "max_output_tokens",
    "estimate_factor_percent",
    "chat_only",
)
_OVERRIDE_RATE_KEYS = ("input_uecu_per_mtok", "output_uecu_per_mtok")
_ORG_KEYS = ("discount_percent", "models", "fees")
_VERSION_MAX = 64


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(*parts: str) -> str:
    """A dotted field path, quoting keys that are not TOML bare keys (``models."gpt-4.1"``)."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def load_rate_card(path: str | os.PathLike[str]) -> RateCard:
    """Read and validate a rate card file."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise RateCardError(file, "", f"cannot read the file: {exc.strerror or exc}") from exc
    return parse_rate_card(data, file)


def parse_rate_card(content: str | bytes, source: str = "<string>") -> RateCard:
    """Validate a rate card given as TOML text."""
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RateCardError(source, "", f"is not UTF-8 text ({exc.reason})") from exc
    else:
        text = content
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(source, text, exc) from exc
    return _Validator(source).card(raw)


# ---------------------------------------------------------------------------------- validation


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan (not a number)"
        if math.isinf(value):
            return f"{'-' if value < 0 else ''}inf (infinity)"
        return f"a float ({value!r})"
    if isinstance(value, int):
        return f"{value}"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__} ({value})"


def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, parts: tuple[str, ...], problem: str) -> RateCardError:
        return RateCardError(self.source, format_path(*parts), problem)

    def table(self, value: Any, parts: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(parts, f"must be a table, got {_describe(value)}")
        return value

    def keys(self, table: dict[str, Any], parts: tuple[str, ...], allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    (*parts, key),
                    f"unknown key (allowed here: {', '.join(allowed)}){_suggest(key, allowed)}",
                )

    def integer(
        self,
        table: dict[str, Any],
        parts: tuple[str, ...],
        key: str,
        lo: int,
        hi: int | None,
        *,
        what: str = "an integer",
        default: int | None = None,
    ) -> int:
        here = (*parts, key)
        if key not in table:
            if default is not None:
                return default
            raise self.error(here, f"missing: {what} is required")
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(here, f"must be {what}, got {_describe(value)}")
        if value < lo:
            raise self.error(here, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.error(here, f"must be at most {hi}, got {value}")
        return value

    def uecu(self, table: dict[str, Any], parts: tuple[str, ...], key: str) -> int:
        value = self.integer(
            table, parts, key, 0, None, what="an integer number of uECU (no decimals)"
        )
        if value > MAX_RATE_UECU:
            raise self.error(
                (*parts, key),
                f"must be at most {MAX_RATE_UECU} uECU (10^6 ECU), got {value}: "
                "a units mistake? (rates are integer uECU)",
            )
        return value

    def optional_uecu(self, table: dict[str, Any], parts: tuple[str, ...], key: str) -> int | None:
        return self.uecu(table, parts, key) if key in table else None

    def boolean(self, table: dict[str, Any], parts: tuple[str, ...], key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self.error((*parts, key), f"must be true or false, got {_describe(value)}")
        return value

    def string(self, table: dict[str, Any], parts: tuple[str, ...], key: str) -> str:
        here = (*parts, key)
        if key not in table:
            raise self.error(here, "missing: a string is required")
        value = table[key]
        if not isinstance(value, str):
            raise self.error(here, f"must be a string, got {_describe(value)}")
        return value

    # -- the card ---------------------------------------------------------------------------

    def card(self, raw: dict[str, Any]) -> RateCard:
        self.keys(raw, (), _TOP_KEYS)
        version = self.string(raw, (), "version")
        if not version or len(version) > _VERSION_MAX or not ID_PATTERN.fullmatch(version):
            raise self.error(
                ("version",),
                f"must be 1-{_VERSION_MAX} characters of letters, digits, '.', '_' and '-', "
                f"got {version!r}",
            )
        description = self.string(raw, (), "description") if "description" in raw else ""
        if "fees" not in raw:
            raise self.error(("fees",), "missing: the [fees] table is required")
        fees_table = self.table(raw["fees"], ("fees",))
        self.keys(fees_table, ("fees",), _ALL_FEE_KEYS)
        fees = Fees(
            **{key: self.uecu(fees_table, ("fees",), key) for key in FEE_KEYS},
            **{key: self.optional_uecu(fees_table, ("fees",), key) for key in OPTIONAL_FEE_KEYS},
        )
        models = self.models(raw)
        organizations = self.organizations(raw.get("organizations", {}), models)
        fingerprint = hashlib.sha256(
            json.dumps(raw, sort_keys=True, ensure_ascii=True).encode()
        ).hexdigest()
        return RateCard(
            version=version,
            description=description,
            fees=fees,
            models=MappingProxyType(models),
            organizations=MappingProxyType(organizations),
            source=self.source,
            fingerprint=fingerprint,
        )

    def models(self, raw: dict[str, Any]) -> dict[str, ModelRates]:
        if "models" not in raw:
            raise self.error(("models",), "missing: at least one [models.<name>] table is required")
        table = self.table(raw["models"], ("models",))
        if not table:
            raise self.error(("models",), "must list at least one model")
        seen: dict[str, str] = {}
        models: dict[str, ModelRates] = {}
        for name, value in table.items():
            parts = ("models", name)
            self.model_name(name, parts)
            folded = name.casefold()
            if folded in seen:
                raise self.error(
                    parts,
                    f"duplicate model: same name as models.{seen[folded]} except for letter "
                    "case (model names are matched exactly; keep one)",
                )
            seen[folded] = name
            models[name] = self.model(name, self.table(value, parts), parts)
        return models

    def model_name(self, name: str, parts: tuple[str, ...]) -> None:
        if not name or len(name) > MODEL_MAX or not MODEL_PATTERN.fullmatch(name):
            raise self.error(
                parts,
                f"invalid model name {name!r}: 1-{MODEL_MAX} characters of letters, digits "
                "and . _ / @ + : - (the names workers send)",
            )

    def model(self, name: str, table: dict[str, Any], parts: tuple[str, ...]) -> ModelRates:
        self.keys(table, parts, _MODEL_KEYS)
        input_rate = self.uecu(table, parts, "input_uecu_per_mtok")
        output_rate = self.uecu(table, parts, "output_uecu_per_mtok")
        encoding = self.string(table, parts, "encoding")
        if encoding not in ENCODINGS:
            shipped = tuple(sorted(ENCODINGS))
            raise self.error(
                (*parts, "encoding"),
                f"unknown encoding {encoding!r} (shipped: {', '.join(shipped)})"
                f"{_suggest(encoding, shipped)}",
            )
        context_window = self.integer(
            table, parts, "context_window", 1, MAX_CONTEXT_TOKENS, what="an integer token count"
        )
        max_output = self.integer(
            table, parts, "max_output_tokens", 1, MAX_CONTEXT_TOKENS, what="an integer token count"
        )
        if max_output > context_window:
            raise self.error(
                (*parts, "max_output_tokens"),
                f"must be at most context_window ({context_window}), got {max_output}",
            )
        factor = self.integer(
            table,
            parts,
            "estimate_factor_percent",
            100,
            MAX_ESTIMATE_FACTOR_PERCENT,
            what="an integer percentage",
            default=100,
        )
        return ModelRates(
            name=name,
            input_uecu_per_mtok=input_rate,
            output_uecu_per_mtok=output_rate,
            encoding=encoding,
            context_window=context_window,
            max_output_tokens=max_output,
            estimate_factor_percent=factor,
            chat_only=self.boolean(table, parts, "chat_only"),
        )

    def organizations(
        self, value: Any, models: dict[str, ModelRates]
    ) -> dict[str, OrganizationTerms]:
        table = self.table(value, ("organizations",))
        out: dict[str, OrganizationTerms] = {}
        for org, terms in table.items():
            parts = ("organizations", org)
            if len(org) > SCOPE_ID_MAX or not ID_PATTERN.fullmatch(org):
                raise self.error(
                    parts,
                    f"invalid organization id {org!r}: 1-{SCOPE_ID_MAX} characters of letters, "
                    "digits, '.', '_' and '-'",
                )
            out[org] = self.terms(org, self.table(terms, parts), parts, models)
        return out

    def terms(
        self,
        org: str,
        table: dict[str, Any],
        parts: tuple[str, ...],
        models: dict[str, ModelRates],
    ) -> OrganizationTerms:
        self.keys(table, parts, _ORG_KEYS)
        if not table:
            raise self.error(parts, "declares no terms (expected discount_percent, models or fees)")
        discount = self.integer(
            table, parts, "discount_percent", 0, 100, what="an integer percentage", default=0
        )
        overrides: dict[str, ModelOverride] = {}
        models_table = self.table(table.get("models", {}), (*parts, "models"))
        for name, value in models_table.items():
            here = (*parts, "models", name)
            if name not in models:
                raise self.error(
                    here, f"unknown model {name!r}: overrides may only name models under [models]"
                )
            rates = self.table(value, here)
            self.keys(rates, here, _OVERRIDE_RATE_KEYS)
            if not rates:
                raise self.error(
                    here, f"declares no rate (expected {' or '.join(_OVERRIDE_RATE_KEYS)})"
                )
            overrides[name] = ModelOverride(
                input_uecu_per_mtok=self.optional_uecu(rates, here, "input_uecu_per_mtok"),
                output_uecu_per_mtok=self.optional_uecu(rates, here, "output_uecu_per_mtok"),
            )
        fees_parts = (*parts, "fees")
        fees_table = self.table(table.get("fees", {}), fees_parts)
        self.keys(fees_table, fees_parts, _ALL_FEE_KEYS)
        fees = FeeOverride(
            **{key: self.optional_uecu(fees_table, fees_parts, key) for key in _ALL_FEE_KEYS}
        )
        return OrganizationTerms(
            organization=org,
            discount_percent=discount,
            models=MappingProxyType(overrides),
            fees=fees,
        )


# ------------------------------------------------------------------------- TOML parse errors

_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_DECLARED_TWICE = re.compile(r"^Cannot declare (\(.*\)) twice")
_HEADER = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")


def _key_parts(key_text: str) -> tuple[str, ...] | None:
    """Split a TOML (dotted, possibly quoted) key into its parts, using tomllib itself."""
    try:
        node: Any = tomllib.loads(f"{key_text} = 0")
    except tomllib.TOMLDecodeError:
        return None
    parts: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        parts.append(key)
    return tuple(parts) if node == 0 else None


def _duplicate_key_path(text: str, line: int) -> tuple[str, ...] | None:
    """Best effort: the full path of a key defined twice, from its line and the table above."""
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return None
    key_text = lines[line - 1].split("=", 1)[0].strip()
    key = _key_parts(key_text) if key_text else None
    if key is None:
        return None
    for above in reversed(lines[: line - 1]):
        match = _HEADER.match(above)
        if match:
            table = _key_parts(match.group(1))
            return None if table is None else (*table, *key)
    return key


def _decode_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> RateCardError:
    message = str(exc)
    at = _AT.search(message)
    line = int(at.group(1)) if at else None
    where = f" (line {at.group(1)}, column {at.group(2)})" if at else ""
    bare = _AT.sub("", message)
    twice = _DECLARED_TWICE.match(bare)
    parts: tuple[str, ...] | None = None
    if twice:
        try:
            parts = tuple(ast.literal_eval(twice.group(1)))
        except (ValueError, SyntaxError):
            parts = None
    elif bare.startswith("Cannot overwrite a value") and line is not None:
        parts = _duplicate_key_path(text, line)
    if twice or bare.startswith("Cannot overwrite a value"):
        what = (
            "duplicate model"
            if parts and len(parts) == 2 and parts[0] == "models"
            else "duplicate key"
        )
        problem = f"{what}: defined twice{where} (TOML forbids duplicate keys)"
        return RateCardError(source, format_path(*parts) if parts else "", problem, line)
    return RateCardError(source, "", f"is not valid TOML: {bare}{where}", line)
