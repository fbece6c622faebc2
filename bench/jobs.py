"""Approved jobs inside Redis (``python -m bench --only jobs``, issue 16): does a job step cost
more than a wallet step, and how many steps per second can one organization take?

On a private redis-server, through the product's ``RedisStore`` alone, per repeat:

- **one step at a time, interleaved**: a wallet step (reserve one hold, commit it) on ``ORG``,
  a job step (the same with ``job_id``) on an open job of ``ORG``, and a job step on a job of
  ``LIVE_ORG`` that has ``LIVE_STEPS`` other live steps in its step index, in turn,
  ``redis_cost_calls`` times each. ``INFO commandstats`` (EVALSHA + EVAL) read around each step
  gives its µs inside Redis; the figure is the mean of the fastest half, as the minimal hold's.
  The jobs' approve and close are timed the same way, apart: they are no step's cost;
- **one organization flat out**: ``CONCURRENCY`` tasks in a closed loop of wallet steps, then of
  job steps, for ``seconds`` after ``warmup_s``: steps/s, the scripts' µs and Redis's CPU µs
  (its I/O included) per step, and Redis's busy share of the window.

Every key of one organization shares its hash tag, so one shard's single thread runs all its
steps: 10⁶ ÷ (µs per step) is the organization's ceiling in steps per second.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import Harness
from bench.stats import median, trimmed_mean

__all__ = ["jobs"]

ORG, LIVE_ORG = "jobs-0", "jobs-live"
LIVE_STEPS = 1_000
CONCURRENCY = 32
#: Each job's approval: a step draws 700 µECU net, so no run gets near the end of its room.
APPROVED_UECU = 10**12
TTL_MS = 3_600_000
KINDS = ("wallet", "job", "job_live")


def jobs(h: Harness) -> None:
    """Measure wallet and job steps on a private Redis; results["jobs"]."""
    private = h.private_redis()
    if private is None:  # per-step deltas need a Redis no other client runs scripts on
        h.results["jobs"] = {"skipped": "no redis-server binary"}
        return
    proc, url = private
    prefix = h.new_prefix("jb")
    h.log("jobs: wallet steps against job steps inside a private Redis")
    try:
        h.fund(prefix, [ORG, LIVE_ORG], url)
        out = asyncio.run(_measure(h, url, prefix))
    finally:
        proc.terminate()
        proc.wait(10)
    h.results["jobs"] = out
    us, tilt = out["us_per_step"], out["flat_out"]
    h.log(
        f"jobs: Redis µs per step: wallet {us['wallet']:.1f}, job {us['job']:.1f}, job with "
        f"{LIVE_STEPS:,} live steps {us['job_live']:.1f}; job ÷ wallet "
        + " / ".join(f"{r:.2f}" for r in out["ratios"])
        + f"; at c={CONCURRENCY} wallet {median([t['steps_per_s'] for t in tilt['wallet']]):,.0f}"
        f", job {median([t['steps_per_s'] for t in tilt['job']]):,.0f} steps/s"
    )


async def _measure(h: Harness, url: str, prefix: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from ecu_sidecar.jobs import JobApproval
    from ecu_sidecar.model import AccountRef, CommitItem, JobType, ReserveItem, Usage
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore

    cfg = h.cfg
    settings = Settings.from_mapping(
        {
            "redis_url": ("bench", url),
            "key_prefix": ("bench", prefix),
            "redis_timeout_ms": ("bench", 10_000),  # a loaded machine: a bound, not the measure
        }
    )
    store = RedisStore.from_settings(settings)
    info = aioredis.Redis.from_url(url)
    pct = settings.overage_max_percent
    ids = itertools.count()

    def item(rid: str) -> ReserveItem:
        return ReserveItem(rid, 1_000, JobType.INFERENCE, "gpt-4o", TTL_MS)

    async def step(org: str, job: str = "") -> None:
        rid = f"s{next(ids)}"
        await store.reserve(AccountRef(org), [item(rid)], job_id=job)
        (done,) = (
            await store.commit(org, [CommitItem(rid, 700, Usage(900, 350, 1))], pct)
        ).outcomes
        if done.error is not None or done.committed_uecu != 700:
            raise RuntimeError(f"jobs: step {rid} of {org} {job!r} did not commit: {done}")

    async def approve(org: str, job: str) -> None:
        approval = JobApproval(job, APPROVED_UECU, JobType.INFERENCE)
        await store.approve_job(AccountRef(org), approval, ttl_ms=TTL_MS, overage_max_percent=pct)

    async def scripts() -> tuple[int, int]:
        """(calls, µs) of EVALSHA and EVAL so far."""
        stats = await info.info("commandstats")
        got = [stats.get(f"cmdstat_{c}", {}) for c in ("evalsha", "eval")]
        return sum(int(s.get("calls", 0)) for s in got), sum(int(s.get("usec", 0)) for s in got)

    async def timed(call: Callable[[], Awaitable[Any]], calls: int) -> int:
        """µs inside Redis of ``call``, which makes ``calls`` script calls."""
        c0, u0 = await scripts()
        await call()
        c1, u1 = await scripts()
        if c1 - c0 != calls:
            raise RuntimeError(f"jobs: {c1 - c0} script calls where {calls} were made")
        return u1 - u0

    async def flat_out(org: str, job: str) -> dict[str, float]:
        """CONCURRENCY tasks doing steps back to back; figures over the measured window."""
        done = [0]
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set() and done[0] < 10_000_000:
                await step(org, job)
                done[0] += 1

        async def edge() -> tuple[float, int, int, float]:
            _, usec = await scripts()
            cpu = await info.info("cpu")
            busy = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
            return time.perf_counter(), done[0], usec, busy

        tasks = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        try:
            await asyncio.sleep(cfg.warmup_s)
            t0, n0, u0, b0 = await edge()
            await asyncio.sleep(cfg.seconds)
            t1, n1, u1, b1 = await edge()
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        n, span = max(1, n1 - n0), t1 - t0
        return {
            "steps_per_s": (n1 - n0) / span,
            "script_us_per_step": (u1 - u0) / n,
            "cpu_us_per_step": (b1 - b0) * 1e6 / n,
            "redis_busy": (b1 - b0) / span,
        }

    each: dict[str, list[float]] = {k: [] for k in KINDS}
    life: dict[str, list[int]] = {"approve": [], "close": [], "close_live": []}
    tilt: dict[str, list[dict[str, float]]] = {"wallet": [], "job": []}
    try:
        await approve(ORG, "warm")  # the first call of each script loads it (EVAL)
        await step(ORG)
        await step(ORG, "warm")
        await store.job(ORG, "warm", "close")
        for rep in range(cfg.repeats):
            job, live = f"j{rep}", f"live{rep}"
            life["approve"].append(await timed(lambda j=job: approve(ORG, j), 1))
            await approve(LIVE_ORG, live)
            held = [item(f"live{rep}-{i}") for i in range(LIVE_STEPS)]
            await store.reserve(AccountRef(LIVE_ORG), held, job_id=live)
            per: dict[str, list[int]] = {k: [] for k in KINDS}
            for _ in range(cfg.redis_cost_calls):
                per["wallet"].append(await timed(lambda: step(ORG), 2))
                per["job"].append(await timed(lambda j=job: step(ORG, j), 2))
                per["job_live"].append(await timed(lambda j=live: step(LIVE_ORG, j), 2))
            for k in KINDS:
                each[k].append(trimmed_mean(per[k]))
            tilt["wallet"].append(await flat_out(ORG, ""))
            tilt["job"].append(await flat_out(ORG, job))
            life["close"].append(await timed(lambda j=job: store.job(ORG, j, "close"), 1))
            close_live = await timed(lambda j=live: store.job(LIVE_ORG, j, "close"), 1)
            life["close_live"].append(close_live)
    finally:
        await store.close()
        await info.aclose()
    us = {k: median(v) for k, v in each.items()}
    return {
        "calls": cfg.redis_cost_calls,
        "live_steps": LIVE_STEPS,
        "concurrency": CONCURRENCY,
        "us_each": each,
        "us_per_step": us,
        "ratios": [j / w for j, w in zip(each["job"], each["wallet"], strict=True)],
        "live_ratios": [lv / j for lv, j in zip(each["job_live"], each["job"], strict=True)],
        "ceiling_steps_per_s": {k: 1e6 / v for k, v in us.items()},
        "lifecycle_us": life,
        "flat_out": tilt,
    }
