"""Logging: text or JSON lines, structured fields, and secrets redacted from every line.

Records carry their structured fields as ``extra`` (``request_id``, ``organization``,
``reservation_id`` …). The text format appends them as ``key=value``; the JSON format makes
them keys of the line's object. Every formatted line, exception text included, passes through
the redaction of the configured secrets (ECU_ADMIN_TOKEN and the passwords of ECU_REDIS_URL and
ECU_LEDGER_URL), as a last line of defence behind code that never logs them in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from ecu_sidecar.settings import Settings, url_secrets

__all__ = ["JsonFormatter", "RedactingFormatter", "TextFormatter", "configure", "secrets_of"]

#: Attributes every LogRecord has: anything else on a record is a structured field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

#: Shorter secrets are not redacted (they would blank out ordinary words); none should be.
_MIN_SECRET = 4

REDACTED = "***"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries (its ``extra``)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, the record's
    structured fields, and exc when an exception is attached."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            out.setdefault(key, _plain(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value …`` (the structured fields appended)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The message line with the record's structured fields appended."""
        line = super().formatMessage(record)
        extra = fields_of(record)
        if extra:
            line += " " + " ".join(f"{k}={_plain(v)}" for k, v in extra.items())
        return line


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter and replaces every secret in its output with ``***``."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's line, secrets replaced."""
        line = self.inner.format(record)
        for secret in self.secrets:
            line = line.replace(secret, REDACTED)
        return line


def secrets_of(settings: Settings) -> list[str]:
    """The values no log line may contain: the admin token, and the passwords and secret query
    parameters of the Redis and ledger URLs."""
    out = [settings.admin_token] if settings.admin_token else []
    out += url_secrets(settings.redis_url)
    out += url_secrets(settings.ledger_url)
    return out


def configure(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Route every log record to ``stream`` (stderr) at ECU_LOG_LEVEL, in ECU_LOG_FORMAT, with
    the secrets redacted. Replaces any handler configured before; returns the new one."""
    handler = logging.StreamHandler(stream or sys.stderr)
    inner = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    handler.setFormatter(RedactingFormatter(inner, secrets_of(settings)))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    return handler
