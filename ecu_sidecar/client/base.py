"""What both client flavours share about reaching the sidecar: its address, the deadline of
each attempt, the retry policy, the channel's options and the admin token's metadata."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ecu_sidecar.client.requests import Call
from ecu_sidecar.client.retry import RetryPolicy

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "ClientBase"]

DEFAULT_TARGET = "127.0.0.1:50051"
"""Where the sidecar listens by default (ECU_LISTEN's default)."""

DEFAULT_TIMEOUT_S = 2.0
"""Deadline of one attempt of one RPC."""

#: Reconnect quickly: the sidecar is on localhost, and a worker that started before it (or
#: outlived a restart) should not wait gRPC's default 1-120 s reconnect backoff.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


class ClientBase:
    """Connection settings shared by ``AsyncQuotaClient`` and ``QuotaClient``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ) -> None:
        """Settings only; the channel opens on the first call. Interceptors of the flavour."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.target = target
        """The sidecar's host:port."""
        self.timeout_s = timeout_s
        """Deadline of each attempt of each call."""
        self.retry = retry or RetryPolicy()
        """Which failures are retried, how often and after what pause."""
        self._admin_token = admin_token or ""
        self._options = [*_CHANNEL_OPTIONS, *channel_options]
        self._interceptors = list(interceptors)

    def _metadata(self, call: Call[Any]) -> tuple[tuple[str, str], ...] | None:
        """The admin token for an admin call, when the client has one; else nothing."""
        if call.admin and self._admin_token:
            return (("authorization", f"Bearer {self._admin_token}"),)
        return None
