"""The benchmark's sections, in the order one run executes them.

Every floor is measured beside what it is the floor of, ``repeats`` times in turn (A, A∘B, B
and the sidecar per concurrency; the batch and its single steps in one window; Preview and
tiktoken; each flusher drain and its COPY floor; the scripts and the minimal hold), so that
every ratio compares runs made seconds apart, and the spread of the ratio across the repeats
is this run's noise.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.durability import durability
from bench.floors import copy_floor, redis_cost
from bench.harness import Harness
from bench.jobs import jobs
from bench.reconciling import reconcile
from bench.scriptargs import ScriptCall, capture
from bench.stats import summarize

__all__ = ["SECTIONS", "run_all"]

#: The sections in the order a run executes them (``python -m bench --only NAME`` picks some).
SECTIONS = (
    "roundtrips",
    "pairs",
    "batch",
    "preview",
    "redis_cost",
    "jobs",
    "flusher",
    "lag",
    "durability",
    "unix_socket",
    "reconcile",
)

_WORDS = (
    "the model evaluates each trace against a rubric and returns a score with its reasons "
    "while the judge compares two answers for accuracy relevance and tone before it writes "
    "a short verdict about latency budget tokens prompts completions retries errors cost "
    "quality dataset sample baseline candidate optimizer iteration reflection feedback "
    "customer support ticket summary billing invoice refund policy account organization team "
    "project user workflow pipeline deployment release version schema migration index query"
).split()


def run_all(h: Harness) -> None:
    cfg = h.cfg
    want = set(cfg.only or SECTIONS)
    main_prefix = h.new_prefix("m")
    h.log(f"starting the sidecar (prefix {main_prefix})")
    sidecar = h.start_sidecar("sidecar", main_prefix)
    orgs = {n: [f"o{n}-{i:05d}" for i in range(n)] for n in cfg.org_counts}
    funded = [o for group in orgs.values() for o in group] if "pairs" in want else []
    h.fund(main_prefix, [*funded, "rt-0", "batch-0", "pv-0"])
    if "roundtrips" in want:
        roundtrips(h, sidecar)
    if "pairs" in want:
        noop = h.start_noop("floor-a")
        b_prefix = h.new_prefix("b")
        first = orgs[min(orgs)]
        h.fund(b_prefix, first)
        calls = asyncio.run(capture(cfg.redis_url, b_prefix))
        ab = h.start_noop("floor-ab", scripts_prefix=b_prefix)
        for rep in range(1, cfg.repeats + 1):
            pairs(h, sidecar, noop, ab, b_prefix, calls, orgs, rep)
        ab.stop()
        noop.stop()
    if "batch" in want:
        for rep in range(1, cfg.repeats + 1):
            batch(h, sidecar, rep)
    if "preview" in want:
        preview(h, sidecar)
    if "redis_cost" in want:
        scripts_vs_minimal(h)
    if "jobs" in want:
        jobs(h)
    if "flusher" in want:
        flusher_drain(h)
    if "lag" in want:
        flusher_lag(h, sidecar)
    if "durability" in want:
        durability(h)
    if "unix_socket" in want:
        unix_socket(h)
    if "reconcile" in want:
        reconcile(h)


def unix_socket(h: Harness) -> None:
    """The sidecar on a Unix domain socket against the same on loopback TCP, in one run:
    Reserve→Commit pairs, one organization, c=1 and c=16, the two in turn per repeat. Not a
    target (the socket is offered for isolation): the figures say whether it is also faster."""
    folder = tempfile.mkdtemp(prefix="ecu-bench-uds-")
    prefix = h.new_prefix("u")
    h.fund(prefix, ["uds-0"])
    unix = h.start_sidecar("sidecar-unix", prefix, env={"ECU_LISTEN": f"unix://{folder}/ecu.sock"})
    tcp = h.start_sidecar("sidecar-tcp", prefix)
    out: dict[str, list[dict[str, float]]] = {}
    try:
        for rep in range(1, h.cfg.repeats + 1):
            for c in (1, 16):
                for name, child in (("tcp", tcp), ("unix", unix)):
                    run = h.measure(
                        f"sidecar over {name} c={c}",
                        "unix_socket",
                        "grpc_pairs",
                        child,
                        {
                            "target": child.target,
                            "concurrency": c,
                            "orgs": ["uds-0"],
                            "mode": "commit",
                        },
                        repeat=rep,
                    )
                    p50 = run["latency_ms"].get("Reserve", {}).get("p50", 0.0)
                    out.setdefault(f"{name} c={c}", []).append(
                        {"rpc_per_s": run["rpc_per_s"], "reserve_p50_ms": p50}
                    )
    finally:
        unix.stop()
        tcp.stop()
        shutil.rmtree(folder, ignore_errors=True)
    h.results["unix_socket"] = out
    for key, runs in out.items():
        rates = " / ".join(f"{r['rpc_per_s']:,.0f}" for r in runs)
        p50s = " / ".join(f"{r['reserve_p50_ms']:.3f}" for r in runs)
        h.log(f"{key}: RPC/s {rates}, Reserve p50 {p50s} ms")


def roundtrips(h: Harness, sidecar: procs.Child) -> None:
    """Redis commands per RPC from INFO commandstats. On a private redis-server when the
    binary is there (nothing else runs commands on it, and that sidecar's background sweeper
    is slowed to once an hour), so the deltas are exact; else on the shared Redis."""
    h.log("counting Redis round trips per RPC (INFO commandstats)")
    private = h.private_redis()
    target, url, child, where = sidecar.target, h.cfg.redis_url, None, "shared"
    if private is not None:
        _, url = private
        prefix = h.new_prefix("rt")
        h.fund(prefix, ["rt-0"], url)
        child = h.start_sidecar(
            "sidecar[roundtrips]",
            prefix,
            env={"ECU_REDIS_URL": url, "ECU_SWEEP_INTERVAL_MS": "3600000"},
        )
        target, where = child.target, "private"
    spec = {
        "workload": "roundtrips",
        "name": "roundtrips",
        "target": target,
        "redis_url": url,
        "orgs": ["rt-0"],
        "calls": h.cfg.roundtrip_calls,
        "batch": h.cfg.batch,
        "repeats": h.cfg.repeats,
        "rid_prefix": f"rt{h.run_id}-",
    }
    try:
        out = procs.run_child("clients", spec, h.work, 120)
    finally:
        if child is not None:
            child.stop()
        if private is not None:
            private[0].terminate()
            private[0].wait(10)
    out["redis"] = where
    h.results["roundtrips"] = out


def pairs(
    h: Harness,
    sidecar: procs.Child,
    noop: procs.Child,
    ab: procs.Child,
    b_prefix: str,
    calls: dict[str, ScriptCall],
    orgs: dict[int, list[str]],
    rep: int,
) -> None:
    """Per concurrency: floor A, floor A∘B, floor B (c=1: the p50 target's), then the
    sidecar's Reserve→Commit pairs over 1 and 1,000 organizations."""
    cfg = h.cfg
    first = orgs[min(orgs)]
    for c in cfg.concurrencies:
        h.measure(
            f"A c={c}",
            "floor_a",
            "grpc_pairs",
            noop,
            {"target": noop.target, "concurrency": c, "orgs": ["org-a"], "mode": "commit"},
            repeat=rep,
        )
        h.measure(
            f"AB c={c} orgs={len(first)}",
            "floor_ab",
            "grpc_pairs",
            ab,
            {"target": ab.target, "concurrency": c, "orgs": first, "mode": "commit"},
            repeat=rep,
        )
        if c == min(cfg.concurrencies):
            h.measure(
                f"B c={c} orgs={len(first)}",
                "floor_b",
                "redis_pairs",
                None,
                {
                    "redis_url": cfg.redis_url,
                    "pool_size": h.defaults.redis_pool_size,
                    "calls": {k: v.to_json() for k, v in calls.items()},
                    "concurrency": c,
                    "orgs": first,
                    "mode": "commit",
                },
                repeat=rep,
            )
        for n, group in orgs.items():
            h.measure(
                f"sidecar commit c={c} orgs={n}",
                "sidecar",
                "grpc_pairs",
                sidecar,
                {"target": sidecar.target, "concurrency": c, "orgs": group, "mode": "commit"},
                repeat=rep,
            )


#: Single Reserve→Commit pairs after each batch pair in the batch run.
BATCH_SINGLES = 3


def batch(h: Harness, sidecar: procs.Child, rep: int) -> None:
    """ReserveBatch→CommitBatch of ``batch`` steps, each pair followed by single
    Reserve→Commit pairs of the same organization: the batch and the single Reserve it is
    compared with, in one window."""
    h.measure(
        f"sidecar batch={h.cfg.batch} and single steps interleaved c=1",
        "batch",
        "grpc_batch",
        sidecar,
        {
            "target": sidecar.target,
            "concurrency": 1,
            "orgs": ["batch-0"],
            "batch": h.cfg.batch,
            "singles": BATCH_SINGLES,
            "mode": "interleaved",
        },
        repeat=rep,
    )


def make_prompt(encoding: str, tokens: int, path: Path) -> int:
    """Deterministic English-like text of ``tokens`` tokens (as tiktoken counts them)."""
    from ecu_sidecar.pricing.tokens import get_encoding

    enc = get_encoding(encoding)
    rng = random.Random(6)
    parts: list[str] = []
    ids: list[int] = []
    for _ in range(100):  # each round adds about tokens / 4; bounded all the same
        for _ in range(max(1, tokens // 40)):
            sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18)))
            parts.append(sentence.capitalize() + rng.choice([". ", ", ", "; ", "? ", ".\n"]))
            if rng.random() < 0.05:
                parts.append(f"{rng.randint(0, 99_999)} ")
        ids = enc.encode_ordinary("".join(parts))
        if len(ids) > tokens:
            break
    ids = ids[:tokens]
    text = enc.decode(ids)
    path.write_text(text, encoding="utf-8")
    return len(enc.encode_ordinary(text))


def preview(h: Harness, sidecar: procs.Child) -> None:
    """Preview of one long prompt on the sidecar, then tiktoken's own encode of the same text
    in one thread, in turn."""
    from ecu_sidecar.pricing import RateCardRegistry

    cfg = h.cfg
    card = RateCardRegistry(warm_encodings=False)
    encoding = card.load(procs.ROOT / "ratecards" / "example.toml").models[cfg.preview_model]
    text_file = h.work / "prompt.txt"
    n = make_prompt(encoding.encoding, cfg.preview_tokens, text_file)
    h.results["preview_prompt"] = {
        "tokens": n,
        "encoding": encoding.encoding,
        "model": cfg.preview_model,
        "chars": len(text_file.read_text(encoding="utf-8")),
    }
    for rep in range(1, cfg.repeats + 1):
        h.measure(
            f"sidecar Preview {n:,}-token prompt c=1",
            "preview",
            "grpc_preview",
            sidecar,
            {
                "target": sidecar.target,
                "concurrency": 1,
                "orgs": ["pv-0"],
                "text_file": str(text_file),
                "model": cfg.preview_model,
            },
            repeat=rep,
        )
        h.measure(
            f"tiktoken encode {n:,} tokens",
            "preview",
            "tiktoken",
            None,
            {
                "concurrency": 1,
                "text_file": str(text_file),
                "encoding": encoding.encoding,
                "margin_s": 2.0,  # the child builds the encoding before its window opens
            },
            repeat=rep,
        )


def scripts_vs_minimal(h: Harness) -> None:
    """The reserve and commit scripts against the minimal hold, inside a private
    redis-server (bench.floors.redis_cost); on the shared Redis when there is no binary."""
    private = h.private_redis()
    url = private[1] if private is not None else h.cfg.redis_url
    where = "private" if private is not None else "shared"
    prefix = h.new_prefix("rc")
    h.log(f"Redis cost per call: the scripts and the minimal hold ({where} Redis)")
    try:
        h.fund(prefix, ["rc-0"], url)
        calls = asyncio.run(capture(url, prefix))
        out = redis_cost(url, prefix, "rc-0", calls, h.cfg.redis_cost_calls, h.cfg.repeats)
    finally:
        if private is not None:
            private[0].terminate()
            private[0].wait(10)
    out["redis"] = where
    h.results["redis_cost"] = out
    us = out["us_per_call"]
    h.log(
        f"Redis µs per call: reserve {us['reserve']:.1f}, commit {us['commit']:.1f}, "
        f"minimal hold {us['minimal']:.1f}"
    )


def backlog(h: Harness, prefix: str, orgs: list[str], pairs_n: int) -> int:
    """Fill the outboxes with reserve and commit events, written by the product's own scripts
    with the product's own arguments (pipelined with redis-py: the backlog is the input here,
    not what is measured)."""
    calls = asyncio.run(capture(h.cfg.redis_url, prefix))
    for call in calls.values():
        h.redis.script_load(call.source)
    done = 0
    step = 200
    deadline = time.monotonic() + 300
    while done < pairs_n and time.monotonic() < deadline:
        pipe = h.redis.pipeline(transaction=False)
        chunk = range(done, min(pairs_n, done + step))
        for name in ("reserve", "commit"):
            for i in chunk:
                pipe.evalsha(calls[name].sha, *calls[name].args(orgs[i % len(orgs)], f"fl-{i}"))
        for reply in pipe.execute():
            if reply[0] != b"OK":
                raise RuntimeError(f"backlog: the script refused: {reply!r}"[:300])
        done += len(chunk)
    return done


def flusher_drain(h: Harness) -> None:
    """Per repeat: a fresh backlog, one flusher process draining it into a fresh schema, then
    the COPY floor of the rows it wrote into another fresh schema."""
    cfg = h.cfg
    drains, floors = [], []
    for rep in range(1, cfg.repeats + 1):
        prefix = h.new_prefix(f"f{rep}")
        orgs = [f"f-{i:04d}" for i in range(cfg.flusher_orgs)]
        h.fund(prefix, orgs)
        pairs_n = max(1, (cfg.flusher_events - len(orgs)) // 2)
        made = backlog(h, prefix, orgs, pairs_n)
        url = h.new_schema()
        spec = {
            "mode": "drain",
            "name": "flusher drain",
            "redis_url": cfg.redis_url,
            "prefix": prefix,
            "orgs": orgs,
            "ledger_url": url,
            "max_seconds": 300.0,  # a bound, not the measure: the drain runs to the end
        }
        proc, spec = procs.spawn_child("flushing", spec, h.work)
        out = procs.collect_child(proc, spec, spec["max_seconds"] + 120)
        out["backlog_events"] = 2 * made + len(orgs)
        out["ledger_events"] = h.ledger_count(url)
        h.drop_keys(f"{prefix}:*")
        floor_url = h.new_schema()
        floor = copy_floor(cfg.pg_url, h.schema_of(url), h.schema_of(floor_url))
        h.log(
            f"flusher drain: {out['events']:,} events in {out['seconds']:.2f}s = "
            f"{out['events_per_s']:,.0f} ev/s; COPY floor: {floor['events_per_s']:,.0f} ev/s"
            f" (#{rep})"
        )
        drains.append(out)
        floors.append(floor)
        h.drop_schema(h.schema_of(url))
        h.drop_schema(h.schema_of(floor_url))
    h.results["flusher_drain"] = {"drains": drains, "copy_floor": floors}


#: Steps per ReserveBatch/CommitBatch in the lag test when single pairs cannot reach the rate.
LAG_BATCH = 10


def flusher_lag(h: Harness, sidecar: procs.Child) -> None:
    """The flusher's own loop beside the sidecar at a steady committed-step rate; the lag is
    the age of the oldest event still in an outbox, sampled every 50 ms."""
    cfg = h.cfg
    best = max(
        (r["ops_per_s"] for r in h.results["runs"]
         if r["section"] == "sidecar" and r["mode"] == "commit"),
        default=0.0,
    )  # fmt: skip
    # Steps are committed one per Reserve→Commit pair when this machine sustains the target
    # rate that way (with 30 % to spare), else in ReserveBatch→CommitBatch groups of
    # LAG_BATCH steps: the outbox gets the same two events per step either way, and it is the
    # flusher that is measured here, not the sidecar's RPC rate.
    rate = cfg.lag_rate
    steps = cfg.lag_steps or (1 if best == 0 or 0.7 * best >= rate else LAG_BATCH)
    if steps > 1 and not cfg.lag_steps:
        h.results["notes"].append(
            f"flusher lag: {rate:,.0f} committed steps/s as single Reserve→Commit pairs is "
            f"beyond this machine (the best pairs run committed {best:,.0f} steps/s); the steps "
            f"were committed in ReserveBatch→CommitBatch groups of {steps} (the same two outbox "
            "events per step)."
        )
    out = lag_once(h, sidecar, rate, steps, best)
    if steps == 1 and not cfg.lag_steps and out["committed_steps_per_s"] < 0.95 * rate:
        # The pairs runs had the machine to themselves; beside the flusher the sidecar fell
        # short of the rate. Measure the flusher again at the rate, in batches.
        h.results["notes"].append(
            f"flusher lag: as single Reserve→Commit pairs beside the flusher the sidecar "
            f"committed {out['committed_steps_per_s']:,.0f} steps/s, short of {rate:,.0f} "
            f"(lag max {out['lag_s'].get('max', 0):.3f}s); measured again in "
            f"ReserveBatch→CommitBatch groups of {LAG_BATCH} (the same two outbox events per "
            "step)."
        )
        out = lag_once(h, sidecar, rate, LAG_BATCH, best)
    h.results["flusher_lag"] = out


def lag_once(
    h: Harness, sidecar: procs.Child, rate: float, steps: int, best: float
) -> dict[str, Any]:
    cfg = h.cfg
    prefix = sidecar.info["prefix"]
    dropped = h.drop_keys(f"{prefix}:*:outbox")  # earlier sections' events: not this test's
    # Organizations of this attempt's own: their grants write the first outbox events (so the
    # flusher finds every outbox when it starts, and the fresh ledger has the grants).
    orgs = [f"lag{steps}-{i:03d}" for i in range(cfg.lag_orgs)]
    h.fund(prefix, orgs)
    url = h.new_schema()
    seconds = cfg.seconds * (1 if cfg.smoke else 2)
    start_at = time.time() + cfg.start_margin_s
    m0 = start_at + cfg.warmup_s
    m1 = m0 + seconds
    fspec = {
        "mode": "run",
        "name": "flusher run",
        "redis_url": cfg.redis_url,
        "prefix": prefix,
        "orgs": orgs,
        "ledger_url": url,
        "until": m1 + 0.5,
    }
    fproc, fspec = procs.spawn_child("flushing", fspec, h.work)
    flusher = procs.Child("flusher", fproc, 0)
    keys = [f"{prefix}:{{{o}}}:outbox" for o in orgs]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        import redis

        client = redis.Redis.from_url(cfg.redis_url, socket_timeout=5)
        try:
            while not stop.is_set() and time.time() < m1 + 5:
                pipe = client.pipeline(transaction=False)
                for k in keys:
                    pipe.xrange(k, count=1)
                replies = pipe.execute()
                now = time.time()
                oldest = [int(r[0][0].split(b"-")[0]) for r in replies if r]
                lag = max(0.0, now - min(oldest) / 1000) if oldest else 0.0
                if m0 <= now <= m1:
                    samples.append((now, lag))
                time.sleep(0.05)
        finally:
            client.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    how = "pairs" if steps == 1 else f"steps/s in batches of {steps}"
    run = h.measure(
        f"sidecar paced {rate:,.0f} {how} + flusher",
        "flusher_lag",
        "grpc_paced",
        sidecar,
        {
            "target": sidecar.target,
            "concurrency": 16,
            "orgs": orgs,
            "rate": rate,
            "steps": steps,
        },
        extra=[flusher],
        seconds=seconds,
        start_at=start_at,
    )
    stop.set()
    sampler.join(10)
    fout = procs.collect_child(fproc, fspec, 120)
    lags = [lag * 1e6 for _, lag in samples]  # summarize takes µs
    summary = summarize(lags)
    # The window's noise, from one run: the largest lag in each third of it.
    thirds = [lags[i * len(lags) // 3 : (i + 1) * len(lags) // 3] for i in range(3)]
    out = {
        "target_rate": cfg.lag_rate,
        "paced_rate": rate,
        "steps_per_call": steps,
        "best_pairs_per_s": best,
        "committed_steps_per_s": run["ops_per_s"],
        "interval_ms": fout["interval_ms"],
        "lag_s": {k: (v / 1000 if k != "n" else v) for k, v in summary.items()},
        "samples": len(samples),
        "max_s_by_third": [max(t) / 1e6 for t in thirds if t],
        "flusher_cpu_s": fout["cpu_s"],
        "flusher_cpu_util": (run.get("other_cpu_util") or {}).get("flusher"),
        "final_drain_events": fout["final_drain"],
        "ledger_events": h.ledger_count(url),
        "earlier_outbox_streams_dropped": dropped,
        "run": run["id"],
    }
    h.log(
        f"flusher lag at {run['ops_per_s']:,.0f} committed steps/s: "
        f"p50 {summary['p50']:.0f} ms, p99 {summary['p99']:.0f} ms, max {summary['max']:.0f} ms"
    )
    return out
