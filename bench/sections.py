"""The benchmark's sections, in the order one run executes them.

Floors and the sidecar are measured per concurrency back to back (A, then B, then the
sidecar), so that the ratios compare runs made seconds apart on the same machine.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.durability import durability
from bench.harness import Harness
from bench.stats import summarize

__all__ = ["run_all"]

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
    main_prefix = h.new_prefix("m")
    h.log(f"starting the sidecar (prefix {main_prefix}) and floor A")
    sidecar = h.start_sidecar("sidecar", main_prefix, uvloop=cfg.uvloop)
    noop = h.start_noop("floor-a", uvloop=cfg.uvloop)
    h.results["servers"] = {
        "sidecar": {"pid": sidecar.pid, "prefix": main_prefix, "uvloop": cfg.uvloop},
        "floor_a": {"pid": noop.pid, "uvloop": cfg.uvloop},
    }
    orgs = {n: [f"o{n}-{i:05d}" for i in range(n)] for n in cfg.org_counts}
    funded = [o for group in orgs.values() for o in group]
    h.grant(sidecar.target, [*funded, "rt-0", "batch-0", "pv-0"])
    idle(h, sidecar, "sidecar idle (fresh)")

    roundtrips(h, sidecar)
    b_prefix = h.new_prefix("b")
    h.grant_direct(b_prefix, funded)
    ab = h.start_noop("floor-ab", uvloop=cfg.uvloop, scripts_prefix=b_prefix)
    pairs(h, sidecar, noop, ab, b_prefix, orgs)
    ab.stop()
    idle(h, sidecar, f"sidecar idle (after serving {len(funded) + 1} organizations)")
    batches(h, sidecar)
    preview(h, sidecar)
    flusher_drain(h)
    flusher_lag(h, sidecar)
    durability(h)
    if cfg.levers:
        levers(h, noop)


def idle(h: Harness, server: procs.Child, label: str) -> None:
    """The server's own background cost (the sweeper) with no RPC at all."""
    seconds = min(2.0, h.cfg.seconds)
    s0 = server.sample()
    time.sleep(seconds)
    s1 = server.sample()
    h.results.setdefault("idle", []).append(
        {
            "label": label,
            "seconds": seconds,
            "server_cpu_util": (s1.cpu_s - s0.cpu_s) / seconds,
            "rss_mb": s1.rss_mb,
        }
    )
    h.log(f"{label}: cpu {(s1.cpu_s - s0.cpu_s) / seconds:.3f} cores, RSS {s1.rss_mb:.0f} MB")


def roundtrips(h: Harness, sidecar: procs.Child) -> None:
    """Redis commands per RPC from INFO commandstats. On a private redis-server when the
    binary is there (nothing else runs commands on it, and that sidecar's background sweeper
    is slowed to once an hour), so the deltas are exact; else on the shared Redis."""
    h.log("counting Redis round trips per RPC (INFO commandstats)")
    private = h.private_redis()
    target, url, child, where = sidecar.target, h.cfg.redis_url, None, "shared"
    if private is not None:
        _, url = private
        child = h.start_sidecar(
            "sidecar[roundtrips]",
            h.new_prefix("rt"),
            env={"ECU_REDIS_URL": url, "ECU_SWEEP_INTERVAL_MS": "3600000"},
        )
        h.grant(child.target, ["rt-0"])
        target, where = child.target, "private"
    spec = {
        "workload": "roundtrips",
        "name": "roundtrips",
        "target": target,
        "redis_url": url,
        "orgs": ["rt-0"],
        "calls": h.cfg.roundtrip_calls,
        "batch": h.cfg.batch,
        "repeats": 3,
        "rid_prefix": f"rt{h.run_id}-",
    }
    try:
        (out,) = procs.run_children("clients", [spec], h.work, 120)
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
    orgs: dict[int, list[str]],
) -> None:
    cfg = h.cfg
    for rep in range(cfg.repeats):
        _pairs_once(h, sidecar, noop, ab, b_prefix, orgs, f" #{rep + 1}" if cfg.repeats > 1 else "")
    if cfg.repeats > 1:
        _keep_medians(h)


def _keep_medians(h: Harness) -> None:
    """Of the repeats of each run, keep the one with the median RPC/s under the plain id."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in h.results["runs"]:
        base, sep, rep = r["id"].rpartition(" #")
        if sep and rep.isdigit() and r["section"] != "levers":
            groups.setdefault(base, []).append(r)
    for base, group in groups.items():
        ordered = sorted(group, key=lambda r: r["rpc_per_s"])
        median = {**ordered[(len(ordered) - 1) // 2], "id": base}
        median["repeats_rpc_per_s"] = [r["rpc_per_s"] for r in group]
        h.results["runs"] = [r for r in h.results["runs"] if r not in group]
        h.results["runs"].append(median)


def _pairs_once(
    h: Harness,
    sidecar: procs.Child,
    noop: procs.Child,
    ab: procs.Child,
    b_prefix: str,
    orgs: dict[int, list[str]],
    tag: str,
) -> None:
    cfg = h.cfg
    d = h.defaults
    top = max(cfg.concurrencies)
    first = orgs[min(orgs)]
    for c in cfg.concurrencies:
        h.measure(
            f"A c={c}{tag}",
            "floor_a",
            "grpc_pairs",
            noop,
            {"target": noop.target, "concurrency": c, "orgs": ["org-a"], "mode": "commit"},
        )
        h.measure(
            f"AB c={c} orgs={len(first)}{tag}",
            "floor_ab",
            "grpc_pairs",
            ab,
            {"target": ab.target, "concurrency": c, "orgs": first, "mode": "commit"},
        )
        for n, group in orgs.items():
            h.measure(
                f"B c={c} orgs={n}{tag}",
                "floor_b",
                "redis_pairs",
                None,
                {
                    "redis_url": cfg.redis_url,
                    "prefix": b_prefix,
                    "pool_size": d.redis_pool_size,
                    "concurrency": c,
                    "orgs": group,
                    "mode": "commit",
                },
            )
        for n, group in orgs.items():
            for mode in cfg.modes:
                h.measure(
                    f"sidecar {mode} c={c} orgs={n}{tag}",
                    "sidecar",
                    "grpc_pairs",
                    sidecar,
                    {"target": sidecar.target, "concurrency": c, "orgs": group, "mode": mode},
                    profile=cfg.profile and c == top and mode == "commit" and n == 1 and not tag,
                )


#: Single Reserve→Commit pairs after each batch pair in the interleaved batch run.
BATCH_SINGLES = 3


def batches(h: Harness, sidecar: procs.Child) -> None:
    h.measure(
        f"sidecar batch={h.cfg.batch} c=1",
        "batch",
        "grpc_batch",
        sidecar,
        {"target": sidecar.target, "concurrency": 1, "orgs": ["batch-0"], "batch": h.cfg.batch},
    )
    # The target compares a batch with one single Reserve. Measured apart, minutes from each
    # other, the two carry different noise on a shared machine; here each batch pair is
    # followed by single Reserve→Commit pairs of the same organization, in one window.
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
    )
    # The same Preview on a sidecar that counts in one thread (ECU_TOKENIZER_THREADS=1): what
    # the parallel count adds, and what it costs in server CPU.
    one = h.start_sidecar(
        "sidecar[tokenizer-threads-1]",
        h.new_prefix("pv1"),
        uvloop=cfg.uvloop,
        env={"ECU_TOKENIZER_THREADS": "1"},
    )
    h.measure(
        f"sidecar Preview {n:,}-token prompt c=1, tokenizer threads 1",
        "preview",
        "grpc_preview",
        one,
        {
            "target": one.target,
            "concurrency": 1,
            "orgs": ["pv-0"],
            "text_file": str(text_file),
            "model": cfg.preview_model,
            "mode": "tokenizer-threads-1",
        },
    )
    one.stop()
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
    )


def _backlog(h: Harness, prefix: str, orgs: list[str], pairs_n: int) -> int:
    """Fill the outboxes with reserve and commit events, written by the product's own scripts
    with the product's own arguments (pipelined with redis-py: the backlog is the input here,
    not what is measured)."""
    import asyncio

    from bench.scriptargs import capture

    calls = asyncio.run(capture(prefix))
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
    cfg = h.cfg
    prefix = h.new_prefix("f")
    orgs = [f"f-{i:04d}" for i in range(cfg.flusher_orgs)]
    h.grant_direct(prefix, orgs)
    pairs_n = max(1, (cfg.flusher_events - len(orgs)) // 2)
    t0 = time.perf_counter()
    made = _backlog(h, prefix, orgs, pairs_n)
    h.log(f"flusher backlog: {2 * made + len(orgs):,} events in {len(orgs)} outboxes "
          f"({time.perf_counter() - t0:.1f}s to write)")  # fmt: skip
    out = _drain(h, prefix, {})
    out["backlog_events"] = 2 * made + len(orgs)
    out["outboxes"] = len(orgs)
    if not out["complete"]:
        # The defaults did not drain the backlog within the bound: say so, then measure the
        # flusher with a Redis timeout long enough for its bulk reads (and claiming at once
        # what the first flusher left pending).
        failed = out
        h.log(
            f"flusher drain at the defaults: {failed['events']:,} events moved, "
            f"{failed['left']:,} left, {len(failed['store_failures'])} store failures"
        )
        out = _drain(h, prefix, {"redis_timeout_ms": 5_000, "flusher_claim_idle_ms": 0})
        out["backlog_events"] = 2 * made + len(orgs)
        out["outboxes"] = len(orgs)
        out["defaults"] = {
            k: failed[k]
            for k in ("events", "seconds", "left", "redis_timeout_ms", "batch_per_stream")
        }
        out["defaults"]["failures"] = len(failed["store_failures"])
        out["defaults"]["first_failure"] = (failed["store_failures"] or [""])[0]
        h.results["notes"].append(
            f"flusher drain at the defaults (ECU_REDIS_TIMEOUT_MS={failed['redis_timeout_ms']}, "
            f"ECU_FLUSHER_BATCH={failed['batch_per_stream']} per outbox): moved "
            f"{failed['events']:,} of {2 * made + len(orgs):,} events in "
            f"{failed['seconds']:.1f}s ({len(failed['store_failures'])} failures: "
            f"{(failed['store_failures'] or ['none'])[0]}); the figure is measured again with "
            "ECU_REDIS_TIMEOUT_MS=5000 and ECU_FLUSHER_CLAIM_IDLE_MS=0 for the flusher."
        )
    h.results["flusher_drain"] = out
    h.log(
        f"flusher drain: {out['events']:,} events in {out['seconds']:.2f}s = "
        f"{out['events_per_s']:,.0f} ev/s ({out['batches']} batches, cpu {out['cpu_s']:.2f}s)"
    )
    h.drop_keys(f"{prefix}:*")


def _drain(h: Harness, prefix: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One flusher process draining the outboxes of ``prefix`` into a fresh schema."""
    url = h.new_schema()
    spec = {
        "mode": "drain",
        "name": "flusher drain",
        "redis_url": h.cfg.redis_url,
        "prefix": prefix,
        "ledger_url": url,
        "max_seconds": max(10.0, 6 * h.cfg.seconds),
        "settings": settings,
    }
    proc, spec = procs.spawn_child("flushing", spec, h.work)
    out = procs.collect_child(proc, spec, spec["max_seconds"] + 120)
    out["ledger_events"] = h.ledger_count(url)
    out["settings"] = settings
    return out


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
    out = _lag_once(h, sidecar, rate, steps, best)
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
        out = _lag_once(h, sidecar, rate, LAG_BATCH, best)
    h.results["flusher_lag"] = out


def _lag_once(
    h: Harness, sidecar: procs.Child, rate: float, steps: int, best: float
) -> dict[str, Any]:
    cfg = h.cfg
    prefix = sidecar.info["prefix"]
    dropped = h.drop_keys(f"{prefix}:*:outbox")  # earlier sections' events: not this test's
    # Organizations of this attempt's own: their grants write the first outbox events (so the
    # flusher finds every outbox when it starts, and the fresh ledger has the grants).
    orgs = [f"lag{steps}-{i:03d}" for i in range(cfg.lag_orgs)]
    h.grant(sidecar.target, orgs)
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
    out = {
        "target_rate": cfg.lag_rate,
        "paced_rate": rate,
        "steps_per_call": steps,
        "best_pairs_per_s": best,
        "committed_steps_per_s": run["ops_per_s"],
        "interval_ms": fout["interval_ms"],
        "lag_s": {k: (v / 1000 if k != "n" else v) for k, v in summary.items()},
        "samples": len(samples),
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


def levers(h: Harness, noop: procs.Child) -> None:
    """This session's performance changes, before and after, in one run: fresh sidecars on
    the product's defaults (uvloop, the multiplexed script channel), on asyncio's loop, with
    redis-py's pool for scripts (bench.levers), and with both (the store and loop as they were
    before), plus floor A on each loop; one organization, at the lowest and the highest
    concurrency, repeated ``lever_repeats`` times in turn (the median is kept)."""
    cfg = h.cfg
    variants: list[tuple[str, bool, tuple[str, ...]]] = [("baseline", True, ())]
    variants.append(("asyncio", False, ()))
    variants += [(p, True, (p,)) for p in cfg.lever_patches]
    variants += [(f"asyncio+{p}", False, (p,)) for p in cfg.lever_patches]
    noop_other = h.start_noop("floor-a-asyncio", uvloop=False)
    servers: list[tuple[str, procs.Child]] = [("floor A", noop), ("floor A asyncio", noop_other)]
    for name, uv, patches in variants:
        prefix = h.new_prefix(f"l{len(servers)}")
        child = h.start_sidecar(f"sidecar[{name}]", prefix, uvloop=uv, patches=patches)
        h.grant(child.target, ["lever-0"])
        servers.append((f"sidecar {name}", child))
    idle_rss = {label: child.sample().rss_mb for label, child in servers}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(cfg.lever_repeats):
        for c in sorted({min(cfg.concurrencies), max(cfg.concurrencies)}):
            for label, child in servers:
                org = "org-a" if label.startswith("floor") else "lever-0"
                run = h.measure(
                    f"lever {label} c={c} #{rep + 1}",
                    "levers",
                    "grpc_pairs",
                    child,
                    {"target": child.target, "concurrency": c, "orgs": [org], "mode": "commit"},
                    seconds=min(cfg.seconds, cfg.lever_seconds),
                    warmup=min(cfg.warmup_s, 0.5),
                )
                runs.setdefault((label, c), []).append(run)
    for (label, c), group in runs.items():
        h.results["levers"].append(_lever_row(label, c, group, idle_rss[label]))
    for _, child in servers[1:]:
        child.stop()
    store_levers(h)


def store_levers(h: Harness) -> None:
    """The Redis-client side alone (the product's RedisStore, no gRPC, no server): CPU of the
    calling process per reserve → commit pair, per lever, repeated in turn. Steadier than the
    whole-sidecar runs on a shared machine, and it is where the loop and the script channel act."""
    cfg = h.cfg
    prefix = h.new_prefix("sl")
    h.grant_direct(prefix, ["store-0"])
    variants: list[tuple[str, bool, list[str]]] = [
        ("store baseline", True, []),
        ("store asyncio", False, []),
    ]
    variants += [(f"store {p}", True, [p]) for p in cfg.lever_patches]
    variants += [(f"store asyncio+{p}", False, [p]) for p in cfg.lever_patches]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(cfg.lever_repeats + 1):
        for c in sorted({min(cfg.concurrencies), max(cfg.concurrencies)}):
            for label, uv, patches in variants:
                run = h.measure(
                    f"lever {label} c={c} #{rep + 1}",
                    "levers",
                    "store_pairs",
                    None,
                    {"redis_url": cfg.redis_url, "prefix": prefix, "orgs": ["store-0"],
                     "concurrency": c, "uvloop": uv, "patches": patches},
                    seconds=min(cfg.seconds, 2.0),
                    warmup=min(cfg.warmup_s, 0.5),
                )  # fmt: skip
                runs.setdefault((label, c), []).append(run)
    for (label, c), group in runs.items():
        h.results.setdefault("store_levers", []).append(
            {
                "variant": label,
                "concurrency": c,
                "repeats": len(group),
                "pairs_per_s": _median([r["ops_per_s"] for r in group]),
                "client_cpu_us_per_pair": _median(
                    [
                        (r["client_cpu_util"] or 0) / r["ops_per_s"] * 1e6
                        for r in group
                        if r["ops_per_s"]
                    ]
                ),
                "cpu_us_each": [
                    (r["client_cpu_util"] or 0) / r["ops_per_s"] * 1e6
                    for r in group
                    if r["ops_per_s"]
                ],
                "reserve_p50_ms": _median(
                    [r["latency_ms"].get("reserve", {}).get("p50") for r in group]
                ),
            }
        )


def _median(values: list[float | None]) -> float | None:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _lever_row(
    variant: str, c: int, group: list[dict[str, Any]], idle_rss: float
) -> dict[str, Any]:
    def lat(r: dict[str, Any], key: str) -> float | None:
        return r["latency_ms"].get("Reserve", {}).get(key)

    return {
        "variant": variant,
        "concurrency": c,
        "repeats": len(group),
        "rpc_per_s": _median([r["rpc_per_s"] for r in group]),
        "rpc_per_s_all": [r["rpc_per_s"] for r in group],
        "reserve_p50_ms": _median([lat(r, "p50") for r in group]),
        "reserve_p99_ms": _median([lat(r, "p99") for r in group]),
        "server_cpu_s_per_1k_rpc": _median([r.get("server_cpu_s_per_1k_rpc") for r in group]),
        "idle_rss_mb": idle_rss,
        "peak_rss_mb": max((r.get("peak_rss_mb") or 0.0) for r in group),
        "runs": [r["id"] for r in group],
    }
