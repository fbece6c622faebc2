"""The benchmark's smoke run (``python -m bench --smoke``): every section produces figures and
the results JSON is well formed. Benchmarks are not tests: nothing here asserts a speed."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_postgres, require_redis

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == x and x not in (float("inf"), float("-inf"))


def test_noop_server_uses_the_sidecars_server_options() -> None:
    """Floor A must be built like the sidecar's server: read the options from the source."""
    from bench.servers import NOOP_SERVER_OPTIONS

    tree = ast.parse((ROOT / "ecu_sidecar" / "server.py").read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "server"
        ):
            for kw in node.keywords:
                if kw.arg == "options":  # literals and arithmetic on them (8 * 1024 * 1024)
                    code = compile(ast.Expression(kw.value), "server.py", "eval")
                    found.append(eval(code, {"__builtins__": {}}))
    assert found, "no grpc.aio.server(options=...) call found in ecu_sidecar/server.py"
    assert [list(map(tuple, f)) for f in found] == [[tuple(o) for o in NOOP_SERVER_OPTIONS]]


def test_smoke_run_produces_every_section(tmp_path: Path) -> None:
    require_redis()
    require_postgres()
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--no-doc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())  # strict JSON: no NaN, no Infinity

    runs = {r["id"]: r for r in results["runs"]}
    sections = {r["section"] for r in results["runs"]}
    assert {"floor_a", "floor_ab", "floor_b", "sidecar", "batch", "preview", "flusher_lag"} <= (
        sections
    )
    for run in results["runs"]:
        assert run["rpcs"] > 0, run["id"]
        assert _finite(run["rpc_per_s"]) and run["rpc_per_s"] > 0, run["id"]
        for method, s in run["latency_ms"].items():
            assert s["n"] > 0 and all(_finite(s[k]) for k in ("p50", "p99", "p999")), (
                run["id"],
                method,
            )
    for run_id, run in runs.items():
        if run["server"] == "sidecar":
            assert _finite(run["server_cpu_s_per_1k_rpc"]), run_id
            assert _finite(run["peak_rss_mb"]) and run["peak_rss_mb"] > 0, run_id

    # The batch target's reference is measured in the batch's own window; the Preview target
    # has a one-thread run beside it.
    modes = {(r["section"], r["mode"]): r for r in results["runs"]}
    mixed = modes[("batch", "interleaved")]
    assert {"ReserveBatch", "CommitBatch", "Reserve", "Commit"} <= set(mixed["latency_ms"])
    assert "steps_per_s" not in mixed and modes[("batch", "")]["steps_per_s"] > 0
    assert modes[("preview", "tokenizer-threads-1")]["latency_ms"]["Preview"]["n"] > 0

    per_rpc = results["roundtrips"]["per_rpc"]
    for kind in ("Reserve", "Commit", "Release", "Extend"):
        assert _finite(per_rpc[kind]["round_trips"]), kind
    assert any(k.startswith("ReserveBatch") for k in per_rpc)
    assert any(k.startswith("CommitBatch") for k in per_rpc)

    assert results["preview_prompt"]["tokens"] > 0
    drain = results["flusher_drain"]
    assert drain["events"] > 0 and _finite(drain["events_per_s"])
    assert drain["ledger_events"] > 0
    lag = results["flusher_lag"]
    assert lag["samples"] > 0 and _finite(lag["committed_steps_per_s"])

    ids = {t["id"] for t in results["targets"]}
    assert {"round_trips", "reserve_p50", "reserve_p99", "batch", "preview", "rss"} <= ids
    assert {"flusher_throughput", "flusher_lag"} <= ids
    for t in results["targets"]:
        assert isinstance(t["pass"], bool), t

    # Reserve→Commit with and without the replica wait, same run (bench/durability.py).
    durable = results["durability"]["pairs"]
    assert durable and all(p[k]["rpc_per_s"] > 0 for p in durable for k in ("on", "off"))
    assert "durability" in sections

    env = results["meta"]["environment"]
    assert env["nproc"] >= 1 and env["python"] and env["packages"]["grpcio"]


@pytest.mark.parametrize("url", ["redis://10.0.0.1:6379/0", "redis://example.com/0"])
def test_refuses_targets_other_than_loopback(url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--redis-url", url, "--no-doc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "127.0.0.1 only" in proc.stderr


@pytest.mark.parametrize(
    ("op", "reserved", "committed"),
    [("reserve", 1, 0), ("pair", 1, 1), ("reserve-batch", 100, 0), ("batch-pair", 100, 100)],
)
async def test_the_instruction_count_loop_does_what_it_counts(
    op: str, reserved: int, committed: int
) -> None:
    """bench.icount's child (the loop valgrind measures, run here without valgrind): each
    iteration places (and commits) its own fresh steps through the handlers, answered OK."""
    require_redis()
    import uuid

    import redis.asyncio as aioredis

    from bench import icount
    from ecu_sidecar.store.keys import org_keys
    from tests.conftest import REDIS_URL

    prefix = "ic" + uuid.uuid4().hex[:10]
    await icount._child(op, 3, REDIS_URL, prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        acct, holds = org_keys(prefix, "icount-0")[:2]
        counters = await client.hmget(acct, ["reserved", "committed", "held"])
        reserved_uecu, committed_uecu, held_uecu = (int(v or 0) for v in counters)
        assert reserved_uecu == 3 * reserved * 1_000
        assert committed_uecu == 3 * committed * 700
        assert held_uecu == 3 * (reserved - committed) * 1_000
        assert await client.hlen(holds) == 3 * reserved
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def test_the_flusher_instruction_count_loop_moves_whole_cycles_into_the_ledger() -> None:
    """bench.icount's flusher child (run here without valgrind): each cycle moves a full
    batch from the backlog into the ledger, and the backlog holds the cycle read ahead."""
    require_redis()
    require_postgres()
    from bench import icount
    from tests.conftest import PG_URL, REDIS_URL

    with icount.flusher_backlog(REDIS_URL, PG_URL, 2) as (prefix, url, h):
        asyncio.run(icount._flush_child(2, REDIS_URL, prefix, url))
        assert h.ledger_count(url) == 2 * icount.FLUSH_EVENTS
        left = sum(
            h.redis.xlen(f"{prefix}:{{ic-{i:03d}}}:outbox") for i in range(icount.FLUSH_ORGS)
        )
        # The backlog: 3 cycles of reserve+commit events and one grant event per outbox.
        assert left == icount.FLUSH_EVENTS + icount.FLUSH_ORGS


def test_the_instruction_count_table_names_every_operation() -> None:
    from bench import icount

    per_op = {"reserve": 10, "pair": 25, "reserve-batch": 300, "batch-pair": 700}
    sides = {side: {**per_op, "commit": 15, "commit-batch": 400} for side in ("sidecar", "redis")}
    text = icount.render({"instructions": {**sides, "flusher": {"event": 1234}}})
    assert "flusher process: 1,234 instructions per event" in text
    assert "| ReserveBatch of 100 | 300 | 300 |" in text
    assert "| Commit | 15 | 15 |" in text
    assert "ReserveBatch of 100 = 30.00 × Reserve; CommitBatch of 100 = 26.67 × Commit" in text


@pytest.mark.parametrize(("reached", "calls"), [(1_990.0, [1]), (1_700.0, [1, 10])])
def test_the_lag_run_falls_back_to_batches_when_pairs_fall_short(
    monkeypatch: pytest.MonkeyPatch, reached: float, calls: list[int]
) -> None:
    """Pairs are chosen from runs that had the machine to themselves; when, beside the
    flusher, they fall short of the rate, the flusher is measured again in batches (and the
    results say so), so that the lag verdict is at the target rate."""
    from bench import sections
    from bench.harness import Config

    class H:
        cfg = Config(lag_rate=2_000.0)
        results: dict[str, Any] = {
            "runs": [{"section": "sidecar", "mode": "commit", "ops_per_s": 3_000.0}],
            "notes": [],
        }

    seen: list[int] = []

    def once(h: Any, sidecar: Any, rate: float, steps: int, best: float) -> dict[str, Any]:
        seen.append(steps)
        done = reached if steps == 1 else rate
        return {"committed_steps_per_s": done, "steps_per_call": steps, "lag_s": {"max": 0.1}}

    monkeypatch.setattr(sections, "_lag_once", once)
    h = H()
    sections.flusher_lag(h, None)  # type: ignore[arg-type]
    assert seen == calls
    assert h.results["flusher_lag"]["steps_per_call"] == calls[-1]
    assert any("measured again" in n for n in h.results["notes"]) == (len(calls) == 2)


def test_the_instruction_counts_come_out_per_side_and_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench.icount.measure's arithmetic and shape, with the valgrind runs replaced by a fixed
    cost per iteration (start-up 1,000 + n x cost): every figure is the per-iteration cost."""
    from bench import icount

    cost = {"reserve": 10, "pair": 25, "reserve-batch": 300, "batch-pair": 700}
    sides: list[str] = []

    def count(op: str, n: int, side: str, binary: str, work: Path) -> int:
        sides.append(side)
        return 1_000 + n * cost[op] * (2 if side == "redis" else 1)

    def count_flusher(n: int, binary: str, pg_url: str, work: Path) -> int:
        return 5_000 + n * icount.FLUSH_EVENTS * 7

    monkeypatch.setattr(icount, "_count", count)
    monkeypatch.setattr(icount, "_count_flusher", count_flusher)
    out = icount.measure("redis-server", 20, 120, log=lambda _: None, pg_url="postgresql://x")
    assert set(sides) == {"sidecar", "redis"}
    assert out["flusher"] == {"event": 7}
    assert out["sidecar"] == {**cost, "commit": 15, "commit-batch": 400}
    assert out["redis"]["commit-batch"] == 800
    assert "flusher" not in icount.measure("redis-server", 20, 120, log=lambda _: None)
