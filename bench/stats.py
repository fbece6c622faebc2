"""Latency summaries and profile digests."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["percentile", "summarize", "top_frames"]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(latencies_us: list[float]) -> dict[str, Any]:
    """p50/p99/p999/mean/max in milliseconds, and the sample count."""
    ordered = sorted(latencies_us)
    n = len(ordered)
    if not n:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "p999": math.nan, "mean": math.nan}
    return {
        "n": n,
        "p50": percentile(ordered, 50) / 1000,
        "p99": percentile(ordered, 99) / 1000,
        "p999": percentile(ordered, 99.9) / 1000,
        "mean": sum(ordered) / n / 1000,
        "max": ordered[-1] / 1000,
    }


def top_frames(raw_profile: Path, limit: int) -> list[dict[str, Any]]:
    """From py-spy's raw (collapsed stacks) output: the frames with the most self samples and
    the most inclusive samples, as shares of all samples."""
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw_profile.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_counts[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return []
    return [
        {"frame": f, "self": n / total, "inclusive": incl[f] / total}
        for f, n in self_counts.most_common(limit)
    ]
