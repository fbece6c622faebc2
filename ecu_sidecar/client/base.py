"""What both client flavours share about reaching the sidecar: its address, its TLS
credentials, the deadline of each attempt, the retry policy, the channel's options and the admin
token's metadata."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from ecu_sidecar.client.requests import Call
from ecu_sidecar.client.retry import RetryPolicy

__all__ = ["DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "ClientBase", "tls_credentials"]

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


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a sidecar that serves TLS (ECU_TLS_CERT_FILE): the CA that signed its
    certificate (None: the system's roots) and, for mutual TLS (ECU_TLS_CLIENT_CA_FILE), this
    client's certificate chain and key, all PEM files."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give cert_file and key_file")

    def pem(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=pem(ca_file), private_key=pem(key_file), certificate_chain=pem(cert_file)
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
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Settings only; the channel opens on the first call. Interceptors of the flavour;
        ``credentials`` (``tls_credentials(...)``) for a sidecar serving TLS, else plaintext."""
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
        self._credentials = credentials

    def _metadata(self, call: Call[Any]) -> tuple[tuple[str, str], ...] | None:
        """The admin token for an admin call, when the client has one; else nothing."""
        if call.admin and self._admin_token:
            return (("authorization", f"Bearer {self._admin_token}"),)
        return None
