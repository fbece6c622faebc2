"""The background sweeper's schedule: which recently served organizations have work, and when.

Every script sweeps its organization before deciding, so the background pass only matters for
organizations nobody touches. Each sweep answers how long until that organization next has
work (a hold deadline, a grant expiry, a job's abandonment deadline or an ended job's purge);
it is left alone until then, a new hold brings its
visit forward, and an organization nobody touches is swept at least every
SWEEP_IDLE_INTERVALS intervals (for holds other sidecar processes made, which this one does
not hear of). Time comes from an injected monotonic clock, so tests step it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ecu_sidecar.model import SweepOutcome

__all__ = ["SWEEP_IDLE_INTERVALS", "SweepSchedule"]

#: An organization nobody touches is swept at least every this many sweep intervals.
SWEEP_IDLE_INTERVALS = 30


class SweepSchedule:
    """Organizations served recently (at most ``max_orgs``, least recent dropped first), each
    with the time (``clock``) the background sweeper next has work there."""

    def __init__(
        self, interval_ms: int, max_orgs: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_ms = interval_ms
        """ECU_SWEEP_INTERVAL_MS: how often the sweeper wakes."""
        self.max_orgs = max_orgs
        """ECU_SWEEP_MAX_ORGS: most organizations remembered."""
        self.clock = clock
        """Monotonic seconds (injected so tests step time instead of sleeping)."""
        self._due: OrderedDict[str, float] = OrderedDict()
        """Organization (least recently served first) -> when its next sweep has work."""

    def seen(self, org: str, due_within_ms: int | None = None) -> None:
        """``org`` was served now; ``due_within_ms``: a hold made now falls due then, so sweep
        no later than that."""
        due = self._due
        at = due.get(org)
        if at is None:
            wait_ms = self.interval_ms if due_within_ms is None else due_within_ms
            due[org] = self.clock() + wait_ms / 1000
            if len(due) > self.max_orgs:
                due.popitem(last=False)
            return
        due.move_to_end(org)
        if due_within_ms is not None:
            sooner = self.clock() + due_within_ms / 1000
            if sooner < at:
                due[org] = sooner

    def organizations(self) -> list[str]:
        """The organizations served recently, least recent first."""
        return list(self._due)

    def due_at(self, org: str) -> float | None:
        """When (``clock``) ``org`` is next swept; None when it is not remembered."""
        return self._due.get(org)

    async def run(self, sweep: Callable[[str], Awaitable[SweepOutcome]]) -> int:
        """Sweep (the store's ``sweep``) every organization whose work has come; returns how
        many holds expired."""
        total = 0
        due = self._due
        interval_s = self.interval_ms / 1000
        idle_s = interval_s * SWEEP_IDLE_INTERVALS
        now = self.clock()
        for org in [org for org, at in due.items() if at <= now]:
            # While the script runs, a reserve may bring the due time forward: keep the earlier.
            due[org] = math.inf
            try:
                out = await sweep(org)
            except BaseException:
                if due.get(org) == math.inf:
                    due[org] = now + interval_s
                raise
            total += out.expired
            if out.waiting:
                wait_s = 0.0  # more were due than one sweep handles: the next tick goes on
            elif out.next_due_ms is None:
                wait_s = idle_s
            else:
                wait_s = min(out.next_due_ms / 1000, idle_s)
            if org in due:  # not evicted meanwhile
                due[org] = min(due[org], self.clock() + wait_s)
        return total
