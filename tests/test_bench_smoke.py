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
    """Floor A must be built like the sidecar's server: read the options from the product's
    source, wherever its ``grpc.aio.server(options=...)`` call lives."""
    from bench.servers import NOOP_SERVER_OPTIONS

    found = []
    for path in sorted((ROOT / "ecu_sidecar").rglob("*.py")):
        if "api" in path.relative_to(ROOT / "ecu_sidecar").parts[:1]:
            continue  # generated code
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "server"
            ):
                for kw in node.keywords:
                    if kw.arg == "options":  # literals and arithmetic on them (8 * 1024 * 1024)
                        code = compile(ast.Expression(kw.value), str(path), "eval")
                        found.append(eval(code, {"__builtins__": {}}))
    assert found, "no grpc.aio.server(options=...) call found in ecu_sidecar/"
    assert [list(map(tuple, f)) for f in found] == [[tuple(o) for o in NOOP_SERVER_OPTIONS]]


def _smoke(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``python -m bench --smoke ARGS``; its results (strict JSON: no NaN, no Infinity)."""
    require_redis()
    require_postgres()
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--no-doc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_jobs(results: dict[str, Any]) -> None:
    """bench/jobs.py: each repeat has the three step kinds, the two flat-out runs and the jobs'
    approve and close; job ÷ wallet is a verdict whose limit is 1 plus the run's noise."""
    jb, repeats = results["jobs"], results["config"]["repeats"]
    for kind in ("wallet", "job", "job_live"):
        assert len(jb["us_each"][kind]) == repeats and jb["us_per_step"][kind] > 0, kind
        assert _finite(jb["ceiling_steps_per_s"][kind]), kind
    assert len(jb["ratios"]) == len(jb["live_ratios"]) == repeats
    for kind in ("wallet", "job"):
        runs = jb["flat_out"][kind]
        assert len(runs) == repeats and all(r["steps_per_s"] > 0 for r in runs), kind
        assert all(r["cpu_us_per_step"] > 0 and 0 < r["redis_busy"] for r in runs), kind
    for name, us in jb["lifecycle_us"].items():
        assert len(us) == repeats and min(us) > 0, name
    (target,) = [t for t in results["targets"] if t["id"] == "job_step"]
    assert target["ratios"] == jb["ratios"] and target["limit"] >= 1


def test_smoke_run_measures_jobs_against_the_wallet(tmp_path: Path) -> None:
    results = _smoke(tmp_path, "--only", "jobs")
    _check_jobs(results)
    assert [t["id"] for t in results["targets"]] == ["job_step"]


def test_smoke_run_produces_every_section(tmp_path: Path) -> None:
    results = _smoke(tmp_path)

    repeats = results["config"]["repeats"]
    assert repeats >= 2  # the smoke run has a noise figure too
    sections = {r["section"] for r in results["runs"]}
    assert {"floor_a", "floor_ab", "floor_b", "sidecar", "batch", "preview", "flusher_lag"} <= (
        sections
    )
    assert "durability" in sections
    # The Unix socket against loopback TCP, both in this run, every repeat.
    assert "unix_socket" in sections
    assert set(results["unix_socket"]) == {"tcp c=1", "unix c=1", "tcp c=16", "unix c=16"}
    for runs in results["unix_socket"].values():
        assert len(runs) == repeats and all(r["rpc_per_s"] > 0 for r in runs)
    # A reconciliation pass of one slice, and the ledger read both ways, every repeat.
    rc = results["reconcile"]
    assert rc["slice"] == 10 and rc["organizations"] == 30
    for key in ("pass_us_per_org", "bulk_read_us_per_org", "account_read_us_per_org"):
        assert len(rc[key]["runs"]) == repeats and rc[key]["median"] > 0, key
    for run in results["runs"]:
        assert run["rpcs"] > 0, run["id"]
        assert _finite(run["rpc_per_s"]) and run["rpc_per_s"] > 0, run["id"]
        for method, s in run["latency_ms"].items():
            assert s["n"] > 0 and all(_finite(s[k]) for k in ("p50", "p99", "p999")), (
                run["id"],
                method,
            )
        if run["server"] == "sidecar":
            assert _finite(run["server_cpu_s_per_1k_rpc"]), run["id"]
            assert _finite(run["peak_rss_mb"]) and run["peak_rss_mb"] > 0, run["id"]
    # Every floor and the runs it is the floor of come once per repeat.
    by_id: dict[str, list[int]] = {}
    for run in results["runs"]:
        by_id.setdefault(run["id"], []).append(run["repeat"])
    for run_id, reps in by_id.items():
        if not run_id.startswith(("sidecar paced", "durability")):
            assert sorted(reps) == list(range(1, repeats + 1)), run_id

    mixed = [r for r in results["runs"] if r["section"] == "batch"]
    assert {"ReserveBatch", "CommitBatch", "Reserve", "Commit"} <= set(mixed[0]["latency_ms"])

    per_rpc = results["roundtrips"]["per_rpc"]
    for kind in ("Reserve", "Commit", "Release", "Extend"):
        assert _finite(per_rpc[kind]["round_trips"]), kind
    assert any(k.startswith("ReserveBatch") for k in per_rpc)
    assert any(k.startswith("CommitBatch") for k in per_rpc)

    # The COPY floor copies exactly the rows each drain wrote.
    drain = results["flusher_drain"]
    assert len(drain["drains"]) == len(drain["copy_floor"]) == repeats
    for d, floor in zip(drain["drains"], drain["copy_floor"], strict=True):
        assert d["complete"] and d["events"] == d["backlog_events"] == d["ledger_events"]
        assert floor["events"] == d["ledger_events"] and floor["events_per_s"] > 0
    cost = results["redis_cost"]
    for name in ("minimal", "reserve", "commit"):
        assert len(cost["us_each"][name]) == repeats and cost["us_per_call"][name] > 0, name
    _check_jobs(results)
    lag = results["flusher_lag"]
    assert lag["samples"] > 0 and _finite(lag["committed_steps_per_s"])

    # Every target is a ratio to its floor, with a limit, a verdict and the run's noise.
    targets = {t["id"]: t for t in results["targets"]}
    assert {"round_trips", "reserve_p50", "reserve_p99", "batch", "preview", "rss"} <= set(targets)
    assert {"flusher_throughput", "flusher_lag", "redis_cost", "job_step"} <= set(targets)
    assert {"throughput_c4_orgs1", "throughput_c4_orgs10"} <= set(targets)
    for t in targets.values():
        assert isinstance(t["met"], bool) and _finite(t["ratio"]) and _finite(t["limit"]), t
        assert t["direction"] in ("≤", "≥", "<"), t
        if t["id"] != "flusher_lag":  # one window: its noise comes from the window's thirds
            assert len(t["ratios"]) == repeats, t
        assert t["noise"] is None or t["noise"] >= 0, t

    # Reserve→Commit with and without the replica wait, same run (bench/durability.py).
    durable = results["durability"]["pairs"]
    assert durable and all(p[k]["rpc_per_s"] > 0 for p in durable for k in ("on", "off"))

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
    [
        ("reserve", 1, 0),
        ("pair", 1, 1),
        ("reserve-batch", 100, 0),
        ("batch-pair", 100, 100),
        ("job-reserve", 1, 0),
        ("job-pair", 1, 1),
    ],
)
async def test_the_instruction_count_loop_does_what_it_counts(
    op: str, reserved: int, committed: int
) -> None:
    """bench.icount's child (the loop valgrind measures, run here without valgrind): each
    iteration places (and commits) its own fresh steps through the handlers, answered OK; a job
    operation's steps draw from the job's room, not from the wallet."""
    require_redis()
    import uuid

    import redis.asyncio as aioredis

    from bench import icount
    from ecu_sidecar.store.keys import org_keys
    from tests.conftest import REDIS_URL

    prefix = "ic" + uuid.uuid4().hex[:10]
    await icount.handler_loop(op, 3, REDIS_URL, prefix)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = org_keys(prefix, "icount-0")
        acct, holds, jobs = keys[0], keys[1], keys[7]
        counters = await client.hmget(acct, ["reserved", "committed", "held"])
        reserved_uecu, committed_uecu, held_uecu = (int(v or 0) for v in counters)
        assert committed_uecu == 3 * committed * 700
        assert await client.hlen(holds) == 3 * reserved
        if op.startswith("job-"):
            # The approval held the job's amount; its steps moved money inside it.
            assert reserved_uecu == icount.JOB_UECU
            assert held_uecu == icount.JOB_UECU - committed_uecu
            job = icount.JOB_ID
            room, cm = await client.hmget(jobs, [f"{job}:room", f"{job}:cm"])
            drawn = 3 * (reserved - committed) * 1_000  # what live steps hold
            assert int(room) == icount.JOB_UECU - drawn - committed_uecu
            assert int(cm or 0) == committed_uecu
        else:
            assert reserved_uecu == 3 * reserved * 1_000
            assert held_uecu == 3 * (reserved - committed) * 1_000
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
        asyncio.run(icount.flush_loop(2, REDIS_URL, prefix, url))
        assert h.ledger_count(url) == 2 * icount.FLUSH_EVENTS
        left = sum(
            h.redis.xlen(f"{prefix}:{{ic-{i:03d}}}:outbox") for i in range(icount.FLUSH_ORGS)
        )
        # The backlog: 3 cycles of reserve+commit events and one grant event per outbox.
        assert left == icount.FLUSH_EVENTS + icount.FLUSH_ORGS


def test_the_instruction_count_table_names_every_operation() -> None:
    from bench import icount

    per_op = {"reserve": 10, "pair": 25, "reserve-batch": 300, "batch-pair": 700}
    per_op |= {"job-reserve": 12, "job-pair": 30, "commit": 15, "commit-batch": 400}
    sides = {side: {**per_op, "job-commit": 18} for side in ("sidecar", "redis")}
    text = icount.render({"instructions": {**sides, "flusher": {"event": 1234}}})
    assert "flusher process: 1,234 instructions per event" in text
    assert "| ReserveBatch of 100 | 300 | 300 |" in text
    assert "| Commit | 15 | 15 |" in text
    assert "| Commit, a job's step | 18 | 18 |" in text
    assert "ReserveBatch of 100 = 30.00 × Reserve; CommitBatch of 100 = 26.67 × Commit" in text
    assert "a job's step (Reserve + Commit) = 1.200 × a wallet step" in text


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

    monkeypatch.setattr(sections, "lag_once", once)
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
    cost |= {"job-reserve": 12, "job-pair": 30}
    sides: list[str] = []

    def count(op: str, n: int, side: str, binary: str, work: Path) -> int:
        sides.append(side)
        return 1_000 + n * cost[op] * (2 if side == "redis" else 1)

    def count_flusher(n: int, binary: str, pg_url: str, work: Path) -> int:
        return 5_000 + n * icount.FLUSH_EVENTS * 7

    monkeypatch.setattr(icount, "count", count)
    monkeypatch.setattr(icount, "count_flusher", count_flusher)
    out = icount.measure("redis-server", 20, 120, log=lambda _: None, pg_url="postgresql://x")
    assert set(sides) == {"sidecar", "redis"}
    assert out["flusher"] == {"event": 7}
    assert out["sidecar"] == {**cost, "commit": 15, "commit-batch": 400, "job-commit": 18}
    assert out["redis"]["commit-batch"] == 800
    assert "flusher" not in icount.measure("redis-server", 20, 120, log=lambda _: None)


def test_resp_commands_are_taken_whole_however_the_bytes_arrive() -> None:
    from bench.scriptargs import resp_commands

    wire = b"*2\r\n$4\r\nPING\r\n$0\r\n\r\n*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n"
    for cut in range(len(wire) + 1):
        buf = bytearray(wire[:cut])
        got = resp_commands(buf)
        buf += wire[cut:]
        got += resp_commands(buf)
        assert got == [[b"PING", b""], [b"EVALSHA", b"ab", b"0"]], cut
        assert not buf


async def test_captured_script_calls_do_what_the_store_does() -> None:
    """Floor B's calls are the product's own: a captured reserve then commit, run directly
    with redis-py, hold and settle a step as the store would (and the minimal hold script
    of the Redis floor runs on the same keys)."""
    require_redis()
    import uuid

    import redis.asyncio as aioredis

    from bench.floors import MINIMAL_HOLD
    from bench.scriptargs import capture
    from ecu_sidecar.model import GrantKind
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore
    from ecu_sidecar.store.keys import org_keys
    from tests.conftest import REDIS_URL

    prefix = "cap" + uuid.uuid4().hex[:10]
    settings = Settings.from_mapping({"redis_url": ("t", REDIS_URL), "key_prefix": ("t", prefix)})
    store = RedisStore.from_settings(settings)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await store.grant("o-1", "g-1", 10_000, GrantKind.TOP_UP, 0)
        calls = await capture(REDIS_URL, prefix)
        for name in ("reserve", "commit"):
            reply = await client.evalsha(calls[name].sha, *calls[name].args("o-1", "r-1"))
            assert reply[0] == b"OK", reply
        balance = await store.balance("o-1")
        assert (balance.committed_uecu, balance.held_uecu) == (700, 0)
        acct, holds, deadlines = org_keys(prefix, "o-1")[:3]
        sha = await client.script_load(MINIMAL_HOLD)
        assert await client.evalsha(sha, 3, acct, holds, deadlines, "m-1", 5, 99, "rec") == 1
        assert await client.zscore(deadlines, "m-1") == 99
    finally:
        await store.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def test_a_verdict_is_the_median_ratio_with_the_spread_of_the_repeats_as_noise() -> None:
    from bench.report import verdict

    t = verdict("x", "x", [0.9, 0.7, 0.8], 0.75, "≥")
    assert t["ratio"] == 0.8 and t["met"] is True
    assert abs(t["noise"] - 0.25) < 1e-9  # (0.9 - 0.7) / 0.8
    assert verdict("x", "x", [3.1, 2.9, 3.2], 3.0, "≤")["met"] is False
    assert verdict("x", "x", [1.0], 2.0, "<", ok=False)["met"] is False
