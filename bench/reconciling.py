"""Reconciliation at scale (``python -m bench --only reconcile``): ``reconcile_orgs``
organizations, each funded by one grant through the product's store and drained into a fresh
ledger schema by the flusher, then passes of one ECU_RECONCILE_BATCH slice timed.

Per repeat, interleaved: a whole pass of one slice (``Reconciler.reconcile``: epochs, outbox
positions, the bulk ledger read, the compare script), the same pass one organization at a time
(``CONCURRENCY`` 1, the baseline), and the ledger read alone both ways,
the bulk ``Ledger.balances`` of the slice against the old per-organization ``ledger_account``.
The first pass over the slice writes a snapshot per organization (none exists yet) and is
reported apart; the timed passes are the steady state (no drift, no snapshot due).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.harness import Harness
from bench.stats import median, spread

__all__ = ["reconcile"]

#: The organization count the full cycle is extrapolated to (issue 17).
TARGET_ORGS = 100_000


def reconcile(h: Harness) -> None:
    cfg = h.cfg
    prefix = h.new_prefix("rc")
    orgs = [f"rc-{i:06d}" for i in range(cfg.reconcile_orgs)]
    h.log(f"reconcile: funding {len(orgs):,} organizations")
    h.fund(prefix, orgs)
    url = h.new_schema()
    out = asyncio.run(_measure(h, prefix, url, orgs))
    h.drop_keys(f"{prefix}:*")
    h.drop_schema(h.schema_of(url))
    per_org = out["pass_us_per_org"]["median"]
    h.log(
        f"reconcile: {len(orgs):,} organizations, slice {out['slice']:,}: a pass "
        f"{per_org:,.0f} µs/org (one at a time "
        f"{out['serial_pass_us_per_org']['median']:,.0f}; first pass "
        f"{out['first_pass_us_per_org']:,.0f}); ledger read "
        f"{out['bulk_read_us_per_org']['median']:,.1f} µs/org bulk vs "
        f"{out['account_read_us_per_org']['median']:,.0f} µs/org ledger_account; a cycle over "
        f"{TARGET_ORGS:,}: {out['cycle_s_at_target']:,.1f} s of passes"
    )
    h.results["reconcile"] = out


def _figure(values: list[float]) -> dict[str, Any]:
    """The median of repeated figures, their spread (this run's noise) and the figures."""
    return {"median": median(values), "spread": spread(values), "runs": values}


async def _measure(h: Harness, prefix: str, url: str, orgs: list[str]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.flusher import reconcile as reconcile_module
    from ecu_sidecar.ledger import open_ledger
    from ecu_sidecar.metrics import FlusherMetrics
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore

    cfg = h.cfg
    settings = Settings.from_mapping(
        {
            "redis_url": ("bench", cfg.redis_url),
            "key_prefix": ("bench", prefix),
            "ledger_url": ("bench", url),
            "reconcile_batch": ("bench", cfg.reconcile_batch),
        }
    )
    store = RedisStore.from_settings(settings)
    ledger = open_ledger(url)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))
    try:
        t0 = time.perf_counter()
        drained = await flusher.drain()
        h.log(f"reconcile: drained {drained:,} events in {time.perf_counter() - t0:.1f}s")
        part = flusher.reconciler.next_slice(orgs)  # the first slice, as a pass takes it
        n = len(part)
        t0 = time.perf_counter()
        first = await flusher.reconciler.reconcile(part)
        first_s = time.perf_counter() - t0
        if len(first) != n or any(first.values()):
            raise RuntimeError(f"reconcile: {n - len(first)} skipped or drifted in the bench")
        passes, serial, bulk, accounts = [], [], [], []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            checked = await flusher.reconciler.reconcile(part)
            passes.append((time.perf_counter() - t0) / n * 1e6)
            if len(checked) != n:
                raise RuntimeError("reconcile: organizations skipped in a timed pass")
            # The same pass one organization at a time (what it was before CONCURRENCY).
            concurrency, reconcile_module.CONCURRENCY = reconcile_module.CONCURRENCY, 1
            try:
                t0 = time.perf_counter()
                await flusher.reconciler.reconcile(part)
                serial.append((time.perf_counter() - t0) / n * 1e6)
            finally:
                reconcile_module.CONCURRENCY = concurrency
            t0 = time.perf_counter()
            await asyncio.to_thread(ledger.balances, part)
            bulk.append((time.perf_counter() - t0) / n * 1e6)
            t0 = time.perf_counter()
            await asyncio.to_thread(lambda: [ledger.ledger_account(o) for o in part])
            accounts.append((time.perf_counter() - t0) / n * 1e6)
        per_org = _figure(passes)
        return {
            "organizations": len(orgs),
            "slice": n,
            "first_pass_us_per_org": first_s / n * 1e6,
            "pass_us_per_org": per_org,
            "concurrency": reconcile_module.CONCURRENCY,
            "serial_pass_us_per_org": _figure(serial),
            "serial_over_concurrent": [a / b for a, b in zip(serial, passes, strict=True)],
            "bulk_read_us_per_org": _figure(bulk),
            "account_read_us_per_org": _figure(accounts),
            "cycle_s_at_target": per_org["median"] * TARGET_ORGS / 1e6,
        }
    finally:
        await store.close()
        ledger.close()
