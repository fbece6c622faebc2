"""``python -m bench``: run the benchmark, print the table, write the results.

python -m bench                      # full run (BENCH_SECONDS or --seconds per measured run)
python -m bench --smoke              # every section for a fraction of a second
python -m bench --profile            # also py-spy the sidecar at the highest concurrency
python -m bench --patch NAME         # also measure a bench.levers prototype patch
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench import report
from bench.harness import Config, Harness
from bench.levers import PATCHES
from bench.sections import run_all


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("BENCH_SECONDS") or 4),
        help="measured seconds per run (default: $BENCH_SECONDS or 4)",
    )
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per run")
    p.add_argument("--smoke", action="store_true", help="a few seconds in all, small matrix")
    p.add_argument("--out", type=Path, default=None, help="results JSON (bench/results.json)")
    p.add_argument("--doc", type=Path, default=None, help="markdown (docs/benchmarks.md)")
    p.add_argument("--no-doc", action="store_true", help="do not touch the markdown")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument(
        "--private-redis",
        action="store_true",
        help="start a throw-away redis-server on 127.0.0.1 for the whole run (no other client "
        "of the shared Redis can disturb the figures)",
    )
    p.add_argument("--client-procs", type=int, default=1, help="load-generator processes")
    p.add_argument(
        "--repeats", type=int, default=1, help="repeat the floors/sidecar matrix; keep medians"
    )
    p.add_argument(
        "--asyncio",
        action="store_true",
        help="run the servers on asyncio's loop (default: uvloop, the product's default)",
    )
    p.add_argument("--no-levers", action="store_true", help="skip the levers section")
    p.add_argument(
        "--patch",
        action="append",
        default=[],
        choices=sorted(PATCHES),
        help="the patches the levers section measures (repeatable; default: all)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the sidecar (bench/profiles)")
    return p


def _check_local(url: str) -> None:
    """Only 127.0.0.1/localhost is ever a target of this benchmark."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to benchmark against {host!r}: 127.0.0.1 only")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    _check_local(args.redis_url)
    _check_local(args.pg_url)
    common = {
        "redis_url": args.redis_url,
        "pg_url": args.pg_url,
        "client_procs": args.client_procs,
        "uvloop": not args.asyncio,
        "profile": args.profile,
        "repeats": max(1, args.repeats),
    }
    if args.patch:
        common["lever_patches"] = tuple(args.patch)
    if args.smoke:
        cfg = Config.for_smoke(**common)
    else:
        cfg = Config(seconds=args.seconds, levers=not args.no_levers, **common)
    if args.warmup is not None:
        cfg.warmup_s = args.warmup
    root = Path(__file__).resolve().parent.parent
    out = args.out or (
        Path(tempfile.gettempdir()) / "ecu-bench-smoke.json"
        if args.smoke
        else root / "bench" / "results.json"
    )
    doc = None if args.no_doc or (args.smoke and args.doc is None) else args.doc
    if doc is None and not args.smoke and not args.no_doc:
        doc = root / "docs" / "benchmarks.md"

    started = time.time()
    h = Harness(cfg)
    try:
        if args.private_redis:
            private = h.private_redis()
            if private is None:
                raise SystemExit("--private-redis: no redis-server binary on this machine")
            import redis

            cfg.redis_url = private[1]
            h.redis = redis.Redis.from_url(cfg.redis_url, socket_timeout=10)
            h.log(f"private Redis at {cfg.redis_url}")
        env = report.environment(h.redis, cfg.pg_url)
        env["redis_private"] = args.private_redis
        run_all(h)
    finally:
        h.close()
    results = h.results
    results["config"] = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(cfg).items()
        if k != "out_dir"
    }
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "command": report.command_line(argv),
        "duration_s": time.time() - started,
        "loadavg_end": list(os.getloadavg()),
        "environment": env,
        "config": results["config"],
    }
    results["targets"] = report.evaluate(results)
    print()
    print(report.render_text(results))
    report.dump_json(results, out)
    print(f"\nresults: {out}")
    if doc is not None:
        report.update_doc(doc, report.render_markdown(results))
        print(f"markdown: {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
