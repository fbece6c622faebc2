"""Edge validation: every caller-supplied value is checked here before any store call.

Identifiers become parts of Redis keys and hash fields, so their alphabet excludes everything
that could leave a key namespace or hash tag: ``{``, ``}``, ``:``, whitespace and control
characters. Amounts are integers bounded far below 2^53 so Lua doubles stay exact.
Each failure raises InvalidArgument naming the request field (proto field path).
"""

from __future__ import annotations

import re

from ecu_sidecar.errors import InvalidArgument
from ecu_sidecar.model import MAX_REQUEST_UECU

__all__ = [
    "ID_PATTERN",
    "MAX_COUNT",
    "MODEL_PATTERN",
    "check_amount",
    "check_count",
    "check_id",
    "check_model",
    "check_optional_id",
]

#: Organizations, teams, projects, users: 1-64 characters.
SCOPE_ID_MAX = 64
#: Reservation and grant ids: 1-128 characters (a UUID or a ULID fits with room to spare).
CALLER_ID_MAX = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
#: Model names are attribution only (never part of a key) and may carry a provider and version.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._/@+:-]+")
MODEL_MAX = 128
#: Token and call counts: any non-negative integer below 2^53.
MAX_COUNT = 2**53 - 1


def check_id(field: str, value: str, max_len: int = SCOPE_ID_MAX) -> str:
    """A required identifier."""
    if not value:
        raise InvalidArgument(field, "is required")
    return _check_id_text(field, value, max_len)


def check_optional_id(field: str, value: str, max_len: int = SCOPE_ID_MAX) -> str:
    """An identifier that may be empty (no team, no project, no user)."""
    if not value:
        return ""
    return _check_id_text(field, value, max_len)


def _check_id_text(field: str, value: str, max_len: int) -> str:
    if len(value) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters, got {len(value)}")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field, "may contain only letters, digits, '.', '_' and '-' (no '{', '}', ':', spaces)"
        )
    return value


def check_model(field: str, value: str, required: bool) -> str:
    """A model name: required for inference and judge steps, optional otherwise."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required for this job type")
        return ""
    if len(value) > MODEL_MAX:
        raise InvalidArgument(field, f"must be at most {MODEL_MAX} characters, got {len(value)}")
    if not MODEL_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field, "may contain only letters, digits and . _ / @ + : - (no braces, no spaces)"
        )
    return value


def check_amount(field: str, value: int, *, allow_zero: bool = False) -> int:
    """An amount of µECU: a positive (or non-negative) integer at most MAX_REQUEST_UECU."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            field, f"must be an integer number of uECU, got {type(value).__name__}"
        )
    low = 0 if allow_zero else 1
    if value < low:
        raise InvalidArgument(field, f"must be {'>= 0' if allow_zero else '> 0'} uECU, got {value}")
    if value > MAX_REQUEST_UECU:
        raise InvalidArgument(field, f"must be at most {MAX_REQUEST_UECU} uECU, got {value}")
    return value


def check_count(field: str, value: int) -> int:
    """A token or call count: 0 <= value < 2^53."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__}")
    if not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(field, f"must be between 0 and {MAX_COUNT}, got {value}")
    return value
