"""``python -m bench``: run the benchmark, print the table, write the results.

python -m bench                      # full run (BENCH_SECONDS or --seconds per measured run)
python -m bench --repeats 5          # every floor and target's run 5 times (default 3)
python -m bench --smoke              # every section for a fraction of a second
python -m bench --only flusher       # one section (repeatable); writes no doc unless --doc
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
from bench.procs import check_local
from bench.sections import SECTIONS, run_all


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
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="measure every floor and target's run this many times, in turn (default 3)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        choices=SECTIONS,
        help="run only this section (repeatable); the targets of the others are left out",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    check_local(args.redis_url)
    check_local(args.pg_url)
    common: dict[str, object] = {
        "redis_url": args.redis_url,
        "pg_url": args.pg_url,
    }
    if args.only:
        common["only"] = tuple(args.only)
    if args.repeats is not None:
        common["repeats"] = max(1, args.repeats)
    cfg = Config.for_smoke(**common) if args.smoke else Config(seconds=args.seconds, **common)
    if args.warmup is not None:
        cfg.warmup_s = args.warmup
    root = Path(__file__).resolve().parent.parent
    out = args.out or (
        Path(tempfile.gettempdir()) / "ecu-bench-partial.json"
        if args.smoke or args.only
        else root / "bench" / "results.json"
    )
    doc = None if args.no_doc or ((args.smoke or args.only) and args.doc is None) else args.doc
    if doc is None and not (args.smoke or args.only) and not args.no_doc:
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
        k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
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
