"""The burn order replayed from the ledger: what rest each expiring grant has.

Redis spends (burns) every billed commit from the organization's expiring grants, soonest
expiry first (ties by grant id), and from the never-expiring pool after them; a grant leaves
that order when it is burnt to zero or when it expires: a commit at or after a grant's expiry
never burns it (every script sweeps expired grants before it commits anything, and its burn
skips one that a sweep held to ECU_SWEEP_LIMIT left).

Between two consecutive boundaries (a grant's start or expiry) the set of active grants is
fixed, and burning a then b from a fixed order is burning a + b: so the replay needs only the
billed sum of each segment, not every commit. Events in the same millisecond are ordered
grant first (the stream order within one millisecond is not recorded in the ledger).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ExpiringGrant", "boundaries", "replay"]


@dataclass(frozen=True, slots=True)
class ExpiringGrant:
    """An expiring grant as the replay needs it."""

    grant_id: str
    granted_at_ms: int
    expires_at_ms: int
    amount_uecu: int


def boundaries(grants: Sequence[ExpiringGrant]) -> list[int]:
    """Sorted distinct times at which the active set changes."""
    return sorted({g.granted_at_ms for g in grants} | {g.expires_at_ms for g in grants})


def replay(
    grants: Sequence[ExpiringGrant], bounds: Sequence[int], segment_sums: Sequence[int]
) -> dict[str, int]:
    """Each grant's rest when it leaves the active set (its current rest if it has not expired).

    ``segment_sums[i]`` is the billed total of commits with ``bounds[i] <= ts < bounds[i+1]``.
    """
    if len(segment_sums) != max(0, len(bounds) - 1):
        raise ValueError("one segment sum per pair of consecutive bounds")
    rest: dict[str, int] = {}
    active: dict[str, ExpiringGrant] = {}
    for i, t in enumerate(bounds):
        for gid in [gid for gid, g in active.items() if g.expires_at_ms <= t]:
            del active[gid]
        for g in grants:
            if g.granted_at_ms == t:
                rest[g.grant_id] = g.amount_uecu
                if g.expires_at_ms > t:
                    active[g.grant_id] = g
        spend = segment_sums[i] if i < len(segment_sums) else 0
        for g in sorted(active.values(), key=lambda g: (g.expires_at_ms, g.grant_id)):
            if spend <= 0:
                break
            take = min(rest[g.grant_id], spend)
            rest[g.grant_id] -= take
            spend -= take
            if rest[g.grant_id] == 0:
                del active[g.grant_id]
    return rest
