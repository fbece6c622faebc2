"""Which failed calls are tried again, how often, after what pause, and what is reported.

Only UNAVAILABLE and DEADLINE_EXCEEDED are retried, a bounded number of times with jittered
backoff, and only because every mutating call is idempotent by its caller id: a request is
built once, so a retry resends the same reservation id, grant id or extend sequence and the
sidecar answers it from its record instead of charging twice. UNAVAILABLE with reason
REBUILDING (the organization fenced while the flusher rebuilds it after a Redis failover) is
retried beyond the attempts, for up to ``RetryPolicy.rebuild_wait_s``.

Both client flavours run the same loop over these decisions; only their sleep differs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ecu_sidecar.client.errors import QuotaError, code_of, error_from_rpc

__all__ = ["RETRYABLE_CODES", "RetryPolicy", "give_up", "retry_after"]

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""The only codes retried: the request may not have arrived, and replaying it is safe."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how patiently, UNAVAILABLE and DEADLINE_EXCEEDED are retried."""

    attempts: int = 3
    """Total attempts per call, the first included (1 disables retries)."""
    initial_backoff_s: float = 0.05
    """Pause before the first retry; doubled before each further one."""
    max_backoff_s: float = 0.5
    """Longest pause between attempts."""
    rebuild_wait_s: float = 15.0
    """How long a call keeps retrying, beyond ``attempts``, while the sidecar answers
    UNAVAILABLE with reason REBUILDING (its organization is being rebuilt from the ledger after
    a Redis failover, for at most ECU_REBUILD_FENCE_MS); 0 counts those like any UNAVAILABLE."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.rebuild_wait_s < 0:
            raise ValueError(f"rebuild_wait_s must be >= 0, got {self.rebuild_wait_s}")

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether attempt number ``attempt`` failing with ``code`` earns another one."""
        return code in RETRYABLE_CODES and attempt < self.attempts

    def backoff_s(self, attempt: int) -> float:
        """The jittered pause after failed attempt ``attempt`` (half fixed, half random)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after(
    policy: RetryPolicy, method: str, failures: Sequence[grpc.RpcError], since: float
) -> bool:
    """Whether to try ``method`` again after ``failures`` (the first at ``since``, monotonic):
    within the policy's attempts, or while the organization is being rebuilt."""
    code = code_of(failures[-1])
    rebuilding = [f for f in failures if error_from_rpc(f).reason == "REBUILDING"]
    within = time.monotonic() - since < policy.rebuild_wait_s
    if within and rebuilding and rebuilding[-1] is failures[-1]:
        log.debug("%s: the organization is being rebuilt; retrying", method)
        return True
    # Answers REBUILDING count as attempts only once the rebuild wait is over.
    if not policy.should_retry(code, len(failures) - (len(rebuilding) if within else 0)):
        return False
    log.debug("%s attempt %d failed with %s; retrying", method, len(failures), code.name)
    return True


def give_up(failures: Sequence[grpc.RpcError]) -> QuotaError:
    """The error to raise once ``failures`` earn no further attempt."""
    # Retries wait for the connection, so a sidecar that is down ends in DEADLINE_EXCEEDED;
    # the earlier UNAVAILABLE ("connection refused") says what went wrong.
    last = failures[-1]
    if code_of(last) == grpc.StatusCode.DEADLINE_EXCEEDED:
        last = next((f for f in failures if code_of(f) == grpc.StatusCode.UNAVAILABLE), last)
    return error_from_rpc(last, len(failures))
