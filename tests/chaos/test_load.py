"""Sustained mixed load: several client processes, two sidecar processes, a flusher process,
many organizations, a fixed time; then the books are checked.

Each client process (tests/chaos/load_worker.py) runs many concurrent gRPC callers that
reserve, commit (below, at, above the hold), release, or abandon holds (1 s TTL: they expire
and are swept). Meanwhile `ecu-sidecar flush` moves the outboxes into a SQLite ledger.

Reported (printed and written to tests/chaos/results/load[-long].json; no timing is asserted):
the load held (calls/s), the error rate (anything but OK and the business refusal
INSUFFICIENT_ECU), p50/p99/max latency per RPC.

Checked at the end, for every organization: every acknowledged call is in Redis; the counters
equal the sums of the hold records; conservation; after the clock passes every TTL nothing is
outstanding; after the flusher's final drain the ledger equals Redis.

Default: 5 s, 2 client processes x 16 callers, 50 organizations. ECU_CHAOS_LONG=1: 60 s,
4 x 32, 500 organizations (ECU_CHAOS_LOAD_S overrides the duration in both).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.store import RedisStore
from tests.chaos.support import (
    LONG,
    SidecarProcess,
    audit,
    grant,
    ledger_agrees,
    new_flusher,
    percentile,
    scale,
    sidecar_env,
    spawn,
    write_result,
)
from tests.conftest import REDIS_URL, drop_keys, make_settings, require_redis

pytestmark = pytest.mark.chaos

DURATION_S = float(os.environ.get("ECU_CHAOS_LOAD_S", scale(5, 60)))
CLIENTS = scale(2, 4)
CONCURRENCY = scale(16, 32)
ORGS = scale(50, 500)
GRANT_UECU = 2_000_000_000


async def test_sustained_mixed_load(tmp_path: Path) -> None:
    require_redis()
    prefix = "load" + uuid.uuid4().hex[:10]
    ledger_url = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(ledger_url)
    ledger.migrate()
    orgs = [f"org-{i:04d}" for i in range(ORGS)]
    env = sidecar_env(
        REDIS_URL=REDIS_URL,
        KEY_PREFIX=prefix,
        REDIS_TIMEOUT_MS=1_000,
        SWEEP_INTERVAL_MS=200,
        LOG_LEVEL="INFO",  # start, signal, stop: in the failure message if one hangs
    )
    sidecars = [SidecarProcess(env) for _ in range(2)]
    flusher_env = {
        **env,
        "ECU_LEDGER_URL": ledger_url,
        "ECU_FLUSHER_INTERVAL_MS": "20",
        "ECU_FLUSHER_DISCOVERY_INTERVAL_MS": "500",
        "ECU_FLUSHER_CLAIM_IDLE_MS": "5000",
        "ECU_RECONCILE_INTERVAL_MS": "2000",
    }
    flusher = spawn(
        ["ecu_sidecar", "flush"], flusher_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    settings = make_settings("redis", key_prefix=prefix, ledger_url=ledger_url)
    store = RedisStore.from_settings(settings)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        for sc in sidecars:
            await sc.wait_serving()
        async with grpc.aio.insecure_channel(sidecars[0].target) as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await asyncio.gather(*(grant(stub, org, GRANT_UECU) for org in orgs))
        for n in range(CLIENTS):
            cfg = {
                "targets": [sc.target for sc in sidecars],
                "orgs": orgs,
                "duration_s": DURATION_S,
                "concurrency": CONCURRENCY,
                "seed": n + 1,
                "acked_path": str(tmp_path / f"acked-{n}.jsonl"),
                "summary_path": str(tmp_path / f"summary-{n}.json"),
            }
            clients.append(spawn(["tests.chaos.load_worker", json.dumps(cfg)]))
        for c in clients:
            await asyncio.to_thread(c.wait, DURATION_S + 60)
            assert c.returncode == 0
        for sc in sidecars:
            sc.signal(signal.SIGTERM)
        for sc in sidecars:
            assert await sc.wait_exit() == 0, sc.stderr()
        flusher.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(flusher.communicate, None, 60)
        assert flusher.returncode == 0, err.decode()

        summaries = [
            json.loads((tmp_path / f"summary-{n}.json").read_text()) for n in range(CLIENTS)
        ]
        acked: dict[str, list[dict[str, Any]]] = {}
        for n in range(CLIENTS):
            for line in (tmp_path / f"acked-{n}.jsonl").read_text().splitlines():
                entry = json.loads(line)
                acked.setdefault(entry["org"], []).append(entry)

        # The books: every acknowledged call is there, the counters are the records' sums.
        store.clock_offset_ms = 600_000  # every hold's TTL has passed; tombstones remain
        expired = 0
        for org in orgs:
            a = await audit(store, org, settings)
            assert a.balance.outstanding_holds == 0
            expired += a.balance.expired_holds
            for entry in acked.get(org, []):
                hold = a.records.get(entry["rid"])
                assert hold is not None, entry
                if entry["op"] == "Reserve":
                    assert int(hold["amt"]) == entry["amount"], (entry, hold)
                elif entry["op"] == "Commit":
                    assert hold["st"] == "C" and int(hold["cm"]) == entry["committed"], (
                        entry,
                        hold,
                    )
                else:
                    assert hold["st"] in ("R", "E"), (entry, hold)
        # The sweep above added expire events: a last drain, then ledger == Redis.
        await new_flusher(store, ledger, settings).drain()
        for org in orgs:
            await ledger_agrees(ledger, store, org)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        for sc in sidecars:
            sc.close()
        if flusher.poll() is None:
            flusher.kill()
        await drop_keys(settings)
        await store.close()
        ledger.close()

    codes: dict[str, int] = {}
    latencies: dict[str, list[float]] = {}
    elapsed = max(s["elapsed_s"] for s in summaries)
    for s in summaries:
        for k, v in s["codes"].items():
            codes[k] = codes.get(k, 0) + v
        for op, values in s["latencies"].items():
            latencies.setdefault(op, []).extend(values)
    total = sum(codes.values())
    errors = sum(v for k, v in codes.items() if k != "OK" and not k.endswith("INSUFFICIENT_ECU"))
    everything = [x for values in latencies.values() for x in values]
    result = {
        "variant": "long" if LONG else "short",
        "duration_s": round(elapsed, 2),
        "client_processes": CLIENTS,
        "callers_per_process": CONCURRENCY,
        "sidecar_processes": len(sidecars),
        "organizations": ORGS,
        "calls": total,
        "calls_per_s": round(total / elapsed, 1),
        "codes": codes,
        "error_rate": errors / total if total else 0.0,
        "latency_ms": {
            op: {
                "p50": round(1000 * percentile(v, 50), 2),
                "p99": round(1000 * percentile(v, 99), 2),
                "max": round(1000 * max(v), 2) if v else 0.0,
            }
            for op, v in {**latencies, "all": everything}.items()
        },
        "holds_expired_and_counted": expired,
        "lost": 0,
        "machine_cpus": os.cpu_count(),
    }
    write_result("load-long" if LONG else "load", result)
    print(f"load: {json.dumps(result)}")
    # No hung call (DEADLINE_EXCEEDED), no INTERNAL: refusals and store timeouts only.
    allowed = {"OK", "RESOURCE_EXHAUSTED/INSUFFICIENT_ECU", "UNAVAILABLE/STORE_UNAVAILABLE"}
    assert set(codes) <= allowed, codes
