"""The orchestrator: starts the servers, runs every section, samples the servers' CPU and
memory around each measured window, and collects the figures (bench.report turns them into
the table, the ratios and the targets).

Each measured run: the load children are started with a wall-clock ``start_at`` a moment
ahead, warm up for ``warmup_s`` and measure for ``seconds``; a sampler thread reads the
server's /proc counters, Redis ``INFO`` (commandstats, cpu) and the machine's CPU at the two
edges of the window; the server's peak RSS is reset before the run and read after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.stats import summarize

__all__ = ["Config", "Harness"]

ADMIN_TOKEN = "bench-admin-token"
RATE_CARD = str(procs.ROOT / "ratecards" / "example.toml")
#: Granted to every benchmark organization: far more than any run can spend.
GRANT_UECU = 10**13


@dataclass
class Config:
    """What one benchmark run does (``python -m bench --help`` sets it)."""

    seconds: float = 4.0
    warmup_s: float = 1.0
    smoke: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    pg_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    repeats: int = 3
    """Every floor and every target's run is measured this many times, interleaved: the
    verdicts take the median ratio, and the spread across repeats is the run's noise."""
    concurrencies: tuple[int, ...] = (1, 16, 64)
    org_counts: tuple[int, ...] = (1, 1_000)
    batch: int = 100
    preview_tokens: int = 100_000
    preview_model: str = "gpt-4o"
    flusher_events: int = 100_000
    flusher_orgs: int = 100
    lag_rate: float = 2_000.0
    lag_steps: int = 0
    """Steps per call in the lag test: 0 = one per pair when the machine sustains the rate
    that way, else batches (sections.LAG_BATCH)."""
    lag_orgs: int = 20
    roundtrip_calls: int = 50
    reconcile_orgs: int = 20_000
    reconcile_batch: int = 2_000
    """The reconcile section: organizations seeded, and the slice a timed pass takes."""
    redis_cost_calls: int = 500
    start_margin_s: float = 0.6
    only: tuple[str, ...] = ()
    """The sections to run (bench.sections.SECTIONS); empty: all of them."""

    @classmethod
    def for_smoke(cls, **overrides: Any) -> Config:
        """Every section, each for a fraction of a second, on a small matrix."""
        base: dict[str, Any] = {
            "seconds": 0.3,
            "warmup_s": 0.1,
            "smoke": True,
            "repeats": 2,
            "concurrencies": (1, 4),
            "org_counts": (1, 10),
            "preview_tokens": 5_000,
            "flusher_events": 1_000,
            "flusher_orgs": 5,
            "lag_rate": 100.0,
            "lag_steps": 10,  # the batched path (the pairs path is the sidecar runs' code)
            "lag_orgs": 3,
            "roundtrip_calls": 5,
            "reconcile_orgs": 30,
            "reconcile_batch": 10,
            "redis_cost_calls": 20,
            "start_margin_s": 0.3,
        }
        base.update(overrides)
        return cls(**base)


class _Window:
    """Samples taken at the measured window's edges."""

    def __init__(self) -> None:
        self.begin: dict[str, Any] = {}
        self.end: dict[str, Any] = {}


class Harness:
    """Runs the sections in order; ``results`` accumulates what bench.report needs."""

    def __init__(self, config: Config) -> None:
        import redis

        self.cfg = config
        self.work = Path(tempfile.mkdtemp(prefix="ecu-bench-"))
        self.redis = redis.Redis.from_url(config.redis_url, socket_timeout=10)
        self.run_id = uuid.uuid4().hex[:8]
        self.prefixes: list[str] = []
        self.schemas: list[str] = []
        self.children: list[procs.Child] = []
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.results: dict[str, Any] = {"runs": [], "notes": []}
        from ecu_sidecar.settings import Settings

        self.defaults = Settings.from_mapping({})

    # -- plumbing -----------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def new_prefix(self, tag: str) -> str:
        prefix = f"bench{self.run_id}{tag}"
        self.prefixes.append(prefix)
        return prefix

    def _redis_sample(self) -> dict[str, float]:
        stats = self.redis.info("commandstats")
        cpu = self.redis.info("cpu")
        return {
            "scripts": sum(
                int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval")
            ),
            "eval": int(stats.get("cmdstat_eval", {}).get("calls", 0)),
            "commands": sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"),
            "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        }

    def _sample(self, server: procs.Child | None, extra: list[procs.Child]) -> dict[str, Any]:
        busy, total = procs.machine_busy()
        out: dict[str, Any] = {
            "t": time.time(),
            "redis": self._redis_sample(),
            "machine_busy": busy,
            "machine_total": total,
        }
        if server is not None:
            out["server"] = server.sample()
        out["extra"] = {c.name: c.sample().cpu_s for c in extra}
        return out

    def _sampler(
        self,
        win: _Window,
        t0: float,
        t1: float,
        server: procs.Child | None,
        extra: list[procs.Child],
    ) -> threading.Thread:
        def run() -> None:
            time.sleep(max(0.0, t0 - time.time()))
            win.begin = self._sample(server, extra)
            time.sleep(max(0.0, t1 - time.time()))
            win.end = self._sample(server, extra)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def measure(
        self,
        run_id: str,
        section: str,
        workload: str,
        server: procs.Child | None,
        spec: dict[str, Any],
        *,
        extra: list[procs.Child] | None = None,
        seconds: float | None = None,
        warmup: float | None = None,
        start_at: float | None = None,
        repeat: int = 1,
    ) -> dict[str, Any]:
        """One measured run of ``workload`` against ``server`` (None: no gRPC server, e.g.
        floor B); returns its figures and appends them to results["runs"]."""
        cfg = self.cfg
        seconds = cfg.seconds if seconds is None else seconds
        warmup = cfg.warmup_s if warmup is None else warmup
        start_at = start_at or time.time() + cfg.start_margin_s + float(spec.get("margin_s", 0))
        m0 = start_at + warmup
        m1 = m0 + seconds
        child_spec = {
            "workload": workload,
            "name": run_id,
            "start_at": start_at,
            "warmup_s": warmup,
            "seconds": seconds,
            "shift_if_late": cfg.smoke,
            "rid_prefix": f"b{self.run_id}-{len(self.results['runs'])}-",
            **spec,
        }
        if server is not None:
            procs.reset_peak_rss(server.pid)
        win = _Window()
        sampler = self._sampler(win, m0, m1, server, extra or [])
        deadline = max(0.0, start_at - time.time()) + warmup + seconds + 60
        outs = [procs.run_child("clients", child_spec, self.work, deadline)]
        sampler.join(30)
        run = self._figures(run_id, section, workload, spec, outs, win, server)
        run["repeat"] = repeat
        self.results["runs"].append(run)
        self.log(_one_line(run) + (f" (#{repeat})" if self.cfg.repeats > 1 else ""))
        return run

    def _figures(
        self,
        run_id: str,
        section: str,
        workload: str,
        spec: dict[str, Any],
        outs: list[dict[str, Any]],
        win: _Window,
        server: procs.Child | None,
    ) -> dict[str, Any]:
        lat: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        ops = 0
        client_cpu = 0.0
        for o in outs:
            for method, values in o["latencies_us"].items():
                lat.setdefault(method, []).extend(values)
            for code, n in o["errors"].items():
                errors[code] = errors.get(code, 0) + n
            ops += o["ops"]
            client_cpu += o.get("client_cpu_s") or 0.0
        window = outs[0]["window_s"]
        rpcs = sum(len(v) for v in lat.values())
        b, e = win.begin, win.end
        run: dict[str, Any] = {
            "id": run_id,
            "section": section,
            "workload": workload,
            "server": server.name if server is not None else "redis-py",
            "mode": spec.get("mode", ""),
            "concurrency": int(spec.get("concurrency", 1)),
            "orgs": len(spec.get("orgs", [])),
            "window_s": window,
            "rpcs": rpcs,
            "rpc_per_s": rpcs / window if window else 0.0,
            "ops": ops,
            "ops_per_s": ops / window if window else 0.0,
            "latency_ms": {m: summarize(v) for m, v in lat.items()},
            "errors": errors,
            "client_cpu_util": client_cpu / window if window else None,
        }
        if "batch" in spec:
            run["batch"] = int(spec["batch"])
            if not spec.get("singles"):  # single steps in between would count as batch time
                run["steps_per_s"] = run["ops_per_s"] * int(spec["batch"])
        for o in outs:
            for key in ("tokens", "prompt_chars", "prompt_tokens_quoted", "target_rate"):
                if key in o:
                    run[key] = o[key]
        if b and e:
            span = e["t"] - b["t"]
            busy = e["machine_busy"] - b["machine_busy"]
            total = e["machine_total"] - b["machine_total"]
            run["machine_cores_busy"] = (busy / total) * (os.cpu_count() or 1) if total else None
            rd = {k: e["redis"][k] - b["redis"][k] for k in b["redis"]}
            run["redis"] = {
                "scripts_per_rpc": rd["scripts"] / rpcs if rpcs else None,
                "eval_fallbacks": rd["eval"],
                "commands_per_rpc": rd["commands"] / rpcs if rpcs else None,
                "cpu_util": rd["cpu_s"] / span if span else None,
                "cpu_s_per_1k_rpc": rd["cpu_s"] / rpcs * 1000 if rpcs else None,
            }
            if server is not None and "server" in b and "server" in e:
                cpu = e["server"].cpu_s - b["server"].cpu_s
                run["server_cpu_s"] = cpu
                run["server_cpu_util"] = cpu / span if span else None
                run["server_cpu_s_per_1k_rpc"] = cpu / rpcs * 1000 if rpcs else None
            for name, cpu1 in e.get("extra", {}).items():
                cpu = cpu1 - b["extra"][name]
                run.setdefault("other_cpu_util", {})[name] = cpu / span if span else None
            ours = (
                (run.get("server_cpu_util") or 0.0)
                + (run.get("client_cpu_util") or 0.0)
                + (run["redis"]["cpu_util"] or 0.0)
                + sum(v or 0.0 for v in (run.get("other_cpu_util") or {}).values())
            )
            if run.get("machine_cores_busy") is not None:
                # What else kept this machine's cores busy during the window (other processes
                # on the machine): the interference this run's figures carry.
                run["foreign_cores"] = max(0.0, run["machine_cores_busy"] - ours)
        if server is not None:
            s = server.sample()
            run["peak_rss_mb"] = s.peak_rss_mb
            run["rss_mb"] = s.rss_mb
        return run

    # -- servers and accounts ---------------------------------------------------------------

    def start_noop(self, name: str, *, scripts_prefix: str = "") -> procs.Child:
        """Floor A (or A∘B with ``scripts_prefix``) on uvloop, the product's default loop."""
        args = ["noop", "--uvloop"]
        if scripts_prefix:
            args += ["--redis-url", self.cfg.redis_url, "--prefix", scripts_prefix]
        child = procs.start_server(name, args)
        self.children.append(child)
        return child

    def sidecar_env(self, prefix: str, **extra: str) -> dict[str, str]:
        port = procs.free_port()
        return {
            "ECU_LISTEN": f"127.0.0.1:{port}",
            "ECU_REDIS_URL": extra.pop("ECU_REDIS_URL", self.cfg.redis_url),
            "ECU_KEY_PREFIX": prefix,
            "ECU_RATE_CARD_FILE": RATE_CARD,
            "ECU_LOG_LEVEL": "WARNING",
            **extra,
        }

    def start_sidecar(
        self, name: str, prefix: str, *, env: dict[str, str] | None = None
    ) -> procs.Child:
        """``ecu-sidecar serve`` on the product's defaults (its loop included) plus ``env``."""
        child = procs.start_sidecar(name, self.sidecar_env(prefix, **(env or {})))
        self.children.append(child)
        self._wait_serving(child)
        child.info["prefix"] = prefix
        return child

    def _wait_serving(self, child: procs.Child, timeout: float = 60.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(child.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"{child.name} did not serve within {timeout:.0f}s")

    def fund(self, prefix: str, orgs: list[str], redis_url: str = "") -> None:
        """Fund organizations under ``prefix`` through the product's store (``RedisStore.grant``,
        what the Grant RPC ends in), on ``redis_url`` (default: the run's Redis)."""
        from ecu_sidecar.errors import StoreUnavailable
        from ecu_sidecar.model import GrantKind
        from ecu_sidecar.settings import Settings
        from ecu_sidecar.store import RedisStore

        settings = Settings.from_mapping(
            {
                "redis_url": ("bench", redis_url or self.cfg.redis_url),
                "key_prefix": ("bench", prefix),
            }
        )

        async def run() -> None:
            store = RedisStore.from_settings(settings)
            gate = asyncio.Semaphore(32)

            async def one(org: str) -> None:
                async with gate:
                    for attempt in range(5):  # the same grant id: a retry is a replay
                        try:
                            await store.grant(org, f"bench-{org}", GRANT_UECU, GrantKind.TOP_UP, 0)
                            return
                        except StoreUnavailable:
                            if attempt == 4:
                                raise
                            await asyncio.sleep(0.2 * (attempt + 1))

            try:
                await asyncio.gather(*(one(o) for o in orgs))
            finally:
                await store.close()

        asyncio.run(run())

    def private_redis(self) -> tuple[subprocess.Popen[bytes], str] | None:
        """A throw-away redis-server on 127.0.0.1 that nothing else uses (exact command
        counts), or None when the binary is not installed."""
        exe = shutil.which("redis-server")
        if exe is None:
            return None
        port = procs.free_port()
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(self.work)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.helpers.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return proc, url
            time.sleep(0.05)
        proc.kill()
        return None

    # -- cleanup ----------------------------------------------------------------------------

    def drop_keys(self, pattern: str) -> int:
        n = 0
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += self.redis.unlink(*batch)
                batch = []
        if batch:
            n += self.redis.unlink(*batch)
        return n

    def close(self) -> None:
        for child in self.children:
            with contextlib.suppress(Exception):
                child.stop()
        for proc in self.helpers:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(10)
        for prefix in self.prefixes:
            with contextlib.suppress(Exception):
                self.drop_keys(f"{prefix}:*")
        for schema in self.schemas:
            with contextlib.suppress(Exception):
                self.drop_schema(schema)
        shutil.rmtree(self.work, ignore_errors=True)

    # -- the ledger -----------------------------------------------------------------------

    def new_schema(self) -> str:
        """A fresh, migrated PostgreSQL schema; returns the ledger URL that selects it."""
        import psycopg

        schema = f"bench_{self.run_id}_{len(self.schemas)}"
        with psycopg.connect(self.cfg.pg_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        sep = "&" if "?" in self.cfg.pg_url else "?"
        url = f"{self.cfg.pg_url}{sep}options=-csearch_path%3D{schema}"
        done = subprocess.run(
            [sys.executable, "-m", "ecu_sidecar", "migrate"],
            cwd=procs.ROOT, env=procs.child_env({"ECU_LEDGER_URL": url}),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"ecu-sidecar migrate failed: {done.stderr[-1000:]}")
        return url

    def drop_schema(self, schema: str) -> None:
        import psycopg

        with psycopg.connect(self.cfg.pg_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    @staticmethod
    def schema_of(url: str) -> str:
        """The schema a ledger URL of ``new_schema`` selects."""
        return url.rsplit("%3D", 1)[1]

    def ledger_count(self, url: str) -> int:
        import psycopg

        plain, _, _ = url.partition("?")
        schema = self.schema_of(url)
        with psycopg.connect(plain, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(f"SELECT count(*) FROM {schema}.events").fetchone()
        return int(row[0]) if row else 0


def _one_line(run: dict[str, Any]) -> str:
    lat = run["latency_ms"]
    first = next(iter(lat), None)
    parts = [
        f"{run['id']}: {run['rpc_per_s']:,.0f} rpc/s",
    ]
    if first:
        s = lat[first]
        parts.append(f"{first} p50 {s['p50']:.3f} p99 {s['p99']:.3f} ms")
    if run.get("server_cpu_util") is not None:
        parts.append(f"server cpu {run['server_cpu_util']:.2f}")
    if run.get("client_cpu_util") is not None:
        parts.append(f"client cpu {run['client_cpu_util']:.2f}")
    if run.get("machine_cores_busy") is not None:
        parts.append(f"cores busy {run['machine_cores_busy']:.2f}")
    if run["errors"]:
        parts.append(f"errors {run['errors']}")
    return ", ".join(parts)
