"""Latency summaries and the spread of repeated figures."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["median", "percentile", "spread", "summarize", "trimmed_mean"]


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


def median(values: list[float]) -> float:
    """The median of the finite values (NaN when there is none)."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def spread(values: list[float]) -> float:
    """Run-to-run noise of repeated figures: (max - min) / median, NaN below two values."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    m = median(xs)
    if len(xs) < 2 or not m:
        return math.nan
    return (max(xs) - min(xs)) / abs(m)


def trimmed_mean(durations: list[int]) -> float:
    """The mean of the fastest half of the calls' µs: a call preempted mid-script on a loaded
    machine is an outlier, not the script's cost (Redis counts whole µs per call, so a mean is
    what resolves a few-µs script; a median would round to whole µs)."""
    kept = sorted(durations)[: max(1, len(durations) // 2)]
    return sum(kept) / len(kept)
