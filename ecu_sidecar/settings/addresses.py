"""Addresses in settings: Redis Sentinel URLs, host:port pairs, loopback hosts, and the
secrets a URL carries (its password, secret-looking query parameters), masked wherever
settings are shown and redacted from logs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

from ecu_sidecar.settings.values import SENTINEL_SCHEME, SettingsError

__all__ = [
    "SentinelUrl",
    "is_loopback",
    "mask_url",
    "parse_sentinel_url",
    "split_hostport",
    "url_secrets",
]


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL (see ECU_REDIS_URL)."""

    sentinels: tuple[tuple[str, int], ...]
    """The Sentinels' (host, port)."""
    service: str
    """The monitored primary's name (Sentinel's master name)."""
    db: int
    username: str | None
    """Of the Redis primary and replicas (Sentinels are asked without credentials)."""
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``
    (raises SettingsError naming what is wrong)."""
    origin = "ECU_REDIS_URL"
    rest = url[len(SENTINEL_SCHEME) :]
    creds, at, rest = rest.rpartition("@")
    username = password = None
    if at:
        user, sep, secret = creds.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise SettingsError(
            f"{origin}: a Sentinel URL needs the service name: "
            "redis+sentinel://host:port[,host:port...]/service[/db]"
        )
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise SettingsError(f"{origin}: database must be a number, got {parts[1]!r}")
        db = int(parts[1])
    sentinels = []
    for item in hosts.split(","):
        sentinels.append(split_hostport(origin, item))
    return SentinelUrl(tuple(sentinels), unquote(parts[0]), db, username, password)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_hostport(var: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{var}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


#: A query parameter whose name contains one of these words carries a secret: masked wherever
#: settings are shown, redacted from logs.
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token")


def _secret_name(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


def url_secrets(url: str) -> list[str]:
    """The secret values a URL carries (its password, secret-looking query parameters), as
    written and percent-decoded: what no log line may show."""
    found: list[str] = []
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    creds, at, _ = rest.rpartition("@")
    if at and ":" in creds:
        found.append(creds.split(":", 1)[1])
    for name, _, value in (item.partition("=") for item in query.split("&") if item):
        if _secret_name(name) and value:
            found.append(value)
    return [v for secret in found if secret for v in dict.fromkeys((secret, unquote(secret)))]


def mask_url(url: str) -> str:
    """The URL with its password and every secret-looking query parameter (``?password=``,
    ``sslpassword=``, ``token=``) masked."""
    scheme, sep, rest = url.partition("://")
    rest, qsep, query = rest.partition("?")
    creds, at, host = rest.rpartition("@")
    if at:
        user = creds.split(":", 1)[0]
        rest = f"{user + ':' if user else ''}***@{host}" if ":" in creds or not user else rest
    if qsep:
        query = "&".join(
            f"{name}=***" if _secret_name(name) else f"{name}{eq}{value}"
            for name, eq, value in (item.partition("=") for item in query.split("&"))
        )
    return f"{scheme}{sep}{rest}{qsep}{query}"
