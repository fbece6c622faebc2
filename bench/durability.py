"""The cost of "acknowledged means durable" (ECU_REDIS_WAIT_REPLICAS).

Reserve→Commit pairs against two sidecars on the same private primary and replica on
127.0.0.1, in the same run, interleaved per concurrency: one answering as soon as the primary
ran the script (ECU_REDIS_WAIT_REPLICAS=0, the default), one confirming every write on the
replica first (=1: the script, a fence write and WAIT in one pipelined round trip, on a
pooled connection). Reported as the ratio of the two.

Part of ``make bench`` (bench.sections.run_all); not a target, a figure for operators
(docs/operations.md).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from typing import Any

from bench import procs
from bench.harness import Harness

__all__ = ["durability"]

ORG = "dur-0"
WAIT_TIMEOUT_MS = "100"


def _replica(h: Harness, primary_url: str) -> subprocess.Popen[bytes] | None:
    """A replica of the private primary, synced and acknowledging WAIT; None when it cannot
    be started."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        return None
    primary = redis.Redis.from_url(primary_url, socket_timeout=10)
    primary.config_set("repl-diskless-sync-delay", 0)
    host_port = primary_url.split("//", 1)[1].split("/", 1)[0]
    _, port = host_port.rsplit(":", 1)
    rdir = h.work / "replica"
    rdir.mkdir(exist_ok=True)
    rport = procs.free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(rdir), "--replicaof", "127.0.0.1", port],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    h.helpers.append(proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            primary.set("bench:durability:probe", 1)
            if primary.execute_command("WAIT", 1, 50) == 1:
                primary.close()
                return proc
        except redis.RedisError:
            pass
        time.sleep(0.05)
    primary.close()
    return None


def durability(h: Harness) -> None:
    """Measure Reserve→Commit with and without the replica wait; results["durability"]."""
    cfg = h.cfg
    private = h.private_redis()
    if private is None:
        h.results["durability"] = {"skipped": "no redis-server binary"}
        return
    _, url = private
    h.log("durability: a private primary and replica; Reserve→Commit with and without WAIT")
    if _replica(h, url) is None:
        h.results["durability"] = {"skipped": "the replica did not come up"}
        return
    base = {"ECU_REDIS_URL": url}
    w0, w1 = h.new_prefix("w0"), h.new_prefix("w1")
    h.fund(w0, [ORG], url)
    h.fund(w1, [ORG], url)
    off = h.start_sidecar("sidecar[wait=0]", w0, env=base)
    on = h.start_sidecar(
        "sidecar[wait=1]",
        w1,
        env={
            **base,
            "ECU_REDIS_WAIT_REPLICAS": "1",
            "ECU_REDIS_WAIT_TIMEOUT_MS": WAIT_TIMEOUT_MS,
        },
    )
    try:
        out = []
        for c in sorted({1, max(cfg.concurrencies)}):
            spec = {"concurrency": c, "orgs": [ORG], "mode": "commit"}
            a = h.measure(
                f"durability wait=0 c={c}",
                "durability",
                "grpc_pairs",
                off,
                {**spec, "target": off.target},
            )
            b = h.measure(
                f"durability wait=1 c={c}",
                "durability",
                "grpc_pairs",
                on,
                {**spec, "target": on.target},
            )
            out.append({"concurrency": c, "off": a, "on": b})
        h.results["durability"] = {
            "wait_timeout_ms": int(WAIT_TIMEOUT_MS),
            "pairs": [
                {
                    "concurrency": p["concurrency"],
                    "off": _summary(p["off"]),
                    "on": _summary(p["on"]),
                }
                for p in out
            ],
        }
    finally:
        off.stop()
        on.stop()


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    lat = run["latency_ms"]
    return {
        "rpc_per_s": run["rpc_per_s"],
        "reserve_p50_ms": lat.get("Reserve", {}).get("p50", math.nan),
        "reserve_p99_ms": lat.get("Reserve", {}).get("p99", math.nan),
        "commit_p50_ms": lat.get("Commit", {}).get("p50", math.nan),
        "commit_p99_ms": lat.get("Commit", {}).get("p99", math.nan),
        "errors": run["errors"],
        "server_cpu_s_per_1k_rpc": run.get("server_cpu_s_per_1k_rpc"),
    }
