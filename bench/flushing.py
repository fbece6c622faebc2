"""The flusher under measurement: ``python -m bench.flushing <spec.json>``, its own process
(as ``ecu-sidecar flush`` runs in production).

- ``drain``: move an outbox backlog into the ledger as fast as the flusher goes
  (``Flusher.flush_once`` in a loop until the outboxes are empty or the time bound passes);
- ``run``: the flusher's own loop (``Flusher.run``: flush every interval, reconcile, hydrate)
  until a wall-clock time, then one final drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import proc_sample
from ecu_sidecar.errors import StoreUnavailable

__all__ = ["main"]


def _settings(spec: dict[str, Any]) -> Any:
    from ecu_sidecar.settings import Settings

    raw = {
        "redis_url": spec["redis_url"],
        "key_prefix": spec["prefix"],
        "ledger_url": spec["ledger_url"],
        **spec.get("settings", {}),
    }
    return Settings.from_mapping({k: ("bench", v) for k, v in raw.items()})


async def _left(store: Any, flusher: Any) -> int:
    """Entries still in the outboxes (the flusher deletes what the ledger committed)."""
    return sum([(await store.outbox_state(org)).length for org in await flusher.discover()])


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.ledger import open_ledger
    from ecu_sidecar.metrics import FlusherMetrics
    from ecu_sidecar.store import RedisStore

    settings = _settings(spec)
    store = RedisStore.from_settings(settings)
    ledger = open_ledger(settings.ledger_url)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))
    pid = os.getpid()
    try:
        if spec["mode"] == "drain":
            await flusher.discover(force=True)
            cpu0 = proc_sample(pid).cpu_s
            t0 = time.perf_counter()
            deadline = t0 + float(spec["max_seconds"])
            moved = batches = 0
            failures: list[str] = []
            complete = False
            while time.perf_counter() < deadline:
                try:
                    n = await flusher.flush_once()
                except StoreUnavailable as exc:
                    failures.append(exc.message)  # what Flusher.run does: back off, retry
                    await asyncio.sleep(0.05)
                    continue
                moved += n
                batches += 1 if n else 0
                if n == 0:
                    if await _left(store, flusher) == 0:
                        complete = True
                        break
                    await asyncio.sleep(0.05)  # entries still pending somewhere: retry
            elapsed = time.perf_counter() - t0
            cpu = proc_sample(pid).cpu_s - cpu0
            return {
                "events": moved,
                "batches": batches,
                "seconds": elapsed,
                "events_per_s": moved / elapsed if elapsed else 0.0,
                "cpu_s": cpu,
                "complete": complete,
                "left": await _left(store, flusher),
                "store_failures": failures,
                "redis_timeout_ms": settings.redis_timeout_ms,
                "batch_per_stream": settings.flusher_batch,
            }
        stop = asyncio.Event()
        cpu0 = proc_sample(pid).cpu_s
        runner = asyncio.create_task(flusher.run(stop))
        await asyncio.sleep(max(0.0, float(spec["until"]) - time.time()))
        stop.set()
        await asyncio.wait_for(runner, 30)
        cpu = proc_sample(pid).cpu_s - cpu0
        final = await flusher.drain()
        return {"cpu_s": cpu, "final_drain": final, "interval_ms": settings.flusher_interval_ms}
    finally:
        await store.close()
        ledger.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    from ecu_sidecar import eventloop

    # The loop `ecu-sidecar flush` runs on (ECU_EVENT_LOOP: uvloop by default).
    result = eventloop.run(_main(spec), _settings(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
