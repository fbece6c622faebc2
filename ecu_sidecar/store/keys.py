"""The Redis key layout. Every key of one organization shares the hash tag ``{org}``.

    <prefix>:{<org>}:acct        hash   wallet counters, team/project caps and usage, closed
                                        jobs' preview accuracy per job type
    <prefix>:{<org>}:holds       hash   reservation id -> hold record (live and tombstones)
    <prefix>:{<org>}:deadlines   zset   reservation id -> deadline ms of every ACTIVE hold
    <prefix>:{<org>}:tombs       zset   reservation id -> purge time ms of settled holds
    <prefix>:{<org>}:outbox      stream one event per state change, for the ledger flusher
    <prefix>:{<org>}:grants      hash   grant id -> grant record
    <prefix>:{<org>}:gexp        zset   grant id -> expiry ms of expiring grants with a rest
    <prefix>:{<org>}:jobs        hash   job id -> approved job record (open, and closed ones
                                        until their purge time); beside an open job's record its
                                        counters, '<job id>:room', ':dl' ... (what a step moves)
    <prefix>:{<org>}:jobdl       zset   job id -> abandonment deadline ms of an open job (at or
                                        before its ':dl': the sweep moves it on), purge time ms
                                        of an ended one
    <prefix>:{<org>}:jsteps      zset   '<job id>:<reservation id>' of every ACTIVE step hold of
                                        an open job (all scores 0: a job's steps are one lex range)
    <prefix>:{<org>}:fence       string written after each confirmed script, so that the WAIT
                                        behind it covers everything the primary holds (see
                                        RedisStore: ECU_REDIS_WAIT_REPLICAS); no script reads it

Organization ids are validated (ecu_sidecar.validation) to exclude ``{``, ``}`` and ``:``, so a
caller can neither move its keys to another slot nor into another organization's namespace.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["SUFFIXES", "fence_key", "org_keys"]

#: Suffixes in the order every script receives them as KEYS[1..10].
SUFFIXES = (
    "acct", "holds", "deadlines", "tombs", "outbox", "grants", "gexp", "jobs", "jobdl", "jsteps",
)  # fmt: skip


@lru_cache(maxsize=65_536)
def org_keys(prefix: str, org: str) -> tuple[str, ...]:
    """The keys of one organization, in script order."""
    base = f"{prefix}:{{{org}}}:"
    return tuple(base + s for s in SUFFIXES)


def fence_key(prefix: str, org: str) -> str:
    """The organization's fence key (same hash slot as its other keys)."""
    return f"{prefix}:{{{org}}}:fence"
