"""Settings: the only reader of the environment (ECU_* variables and ECU_CONFIG_FILE), one
frozen dataclass validated at start-up. ``core`` (the Settings and their checks), ``values``
(each value's kind and bounds, the TOML file), ``addresses`` (URLs and host:port, their
secrets masked)."""

from __future__ import annotations

from ecu_sidecar.settings.addresses import SentinelUrl, parse_sentinel_url, url_secrets
from ecu_sidecar.settings.core import Settings, describe
from ecu_sidecar.settings.values import SENTINEL_SCHEME, UNIX_SCHEME, SettingsError

__all__ = [
    "SENTINEL_SCHEME",
    "UNIX_SCHEME",
    "SentinelUrl",
    "Settings",
    "SettingsError",
    "describe",
    "parse_sentinel_url",
    "url_secrets",
]
