"""Instructions (valgrind) per Reserve, Commit, ReserveBatch and CommitBatch, in the sidecar's
process and inside Redis: figures that do not move with the machine's noise, for changes too
small for the timed runs to resolve (a timed run here moves by 10-30 % between two windows).

    python -m bench.icount [--redis-server PATH] [--low 20] [--high 120]    (make bench-icount)

valgrind (cachegrind, no cache simulation) counts every instruction of one process, its start-up
included, so each figure is a difference: the same loop runs LOW and then HIGH times, each in a
fresh process, and (I(HIGH) - I(LOW)) / (HIGH - LOW) is one iteration's count.

- **sidecar**: a child process runs the QuotaService handlers in-process against a private
  redis-server (no gRPC: the request is parsed from its bytes and the answer serialized, as
  grpc.aio does around a handler), under valgrind.
- **redis**: the same child, not under valgrind, against a redis-server started under valgrind:
  the scripts, and Redis reading the calls and writing the replies.

An iteration is one operation: ``reserve`` (Reserve of one step), ``pair`` (Reserve then
Commit of one step), ``reserve-batch`` (ReserveBatch of BATCH steps), ``batch-pair``
(ReserveBatch then CommitBatch), ``job-reserve`` and ``job-pair`` (the same step drawn from an
approved job, issue 16); Commit, CommitBatch and a job step's Commit are the differences.

- **flusher**: the flusher's process (``Flusher.flush_once`` in a loop: read the outboxes,
  validate, write the ledger, acknowledge) under valgrind, over a backlog of reserve and commit
  events written beforehand by the product's scripts into the private redis-server (100
  outboxes, FLUSH_EVENTS per cycle, into a fresh PostgreSQL schema): an iteration is one cycle,
  and the figure is per event. PostgreSQL's own work is not in it.

Writes bench/icount.json and prints a table. Needs valgrind (apt-get install valgrind), a
redis-server binary and, for the flusher, PostgreSQL (--pg-url); targets 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.procs import ROOT, free_port

__all__ = ["main"]

#: Steps of a batch operation.
BATCH = 100
#: Events per flusher cycle (ECU_FLUSHER_BATCH's default), over FLUSH_ORGS outboxes.
FLUSH_EVENTS = 2_000
FLUSH_ORGS = 100
#: Flusher cycles of the shorter and the longer run.
FLUSH_LOW, FLUSH_HIGH = 2, 6
OPERATIONS = ("reserve", "pair", "reserve-batch", "batch-pair", "job-reserve", "job-pair")
#: The job the job operations draw from: room for far more steps than a run takes.
JOB_ID, JOB_UECU = "icount-job", 10**12
_VALGRIND = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


# -- the child: the handlers in a loop ------------------------------------------------------------


async def handler_loop(op: str, n: int, redis_url: str, prefix: str = "") -> None:
    from bench.harness import ADMIN_TOKEN, RATE_CARD
    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.jobs import JobApproval
    from ecu_sidecar.model import AccountRef, GrantKind, JobType
    from ecu_sidecar.server import SidecarServer
    from ecu_sidecar.service import QuotaService
    from ecu_sidecar.settings import Settings

    settings = Settings.from_mapping(
        {
            k: ("bench", v)
            for k, v in {
                "redis_url": redis_url,
                "key_prefix": prefix or "ic" + uuid.uuid4().hex[:8],
                "admin_token": ADMIN_TOKEN,
                "rate_card_file": RATE_CARD,
            }.items()
        }
    )
    server = SidecarServer(settings)
    await server.store.connect()
    service = QuotaService(server.engine, server.metrics, settings.admin_token)
    org = "icount-0"
    await server.engine.grant(org, "seed", 10**15, GrantKind.TOP_UP)
    job_id = ""
    if op.startswith("job-"):
        job_id = JOB_ID
        approval = JobApproval(JOB_ID, JOB_UECU, JobType.JUDGE)
        await server.engine.approve_job(AccountRef(org), approval)
    batch = op in ("reserve-batch", "batch-pair")
    steps = BATCH if batch else 1
    # Requests as bytes with a 6-digit slot for the iteration, parsed per call: what the server
    # does with what gRPC hands it (building them in Python would count the client's work).
    reserve = pb.ReserveBatchRequest(
        account=pb.Account(organization=org),
        items=[
            pb.ReserveItem(
                reservation_id=f"r######-{k:03d}",
                amount_uecu=1_000,
                job_type=pb.JOB_TYPE_JUDGE,
                model="gpt-4o-mini",
            )
            for k in range(steps)
        ],
    )
    commit = pb.CommitBatchRequest(
        organization=org,
        items=[
            pb.CommitItem(
                reservation_id=f"r######-{k:03d}",
                actual_uecu=700,
                usage=pb.Usage(tokens_in=900, tokens_out=350, calls=1),
            )
            for k in range(steps)
        ],
    )
    if not batch:
        reserve_bytes = pb.ReserveRequest(
            reservation_id="r######-000",
            account=reserve.account,
            amount_uecu=1_000,
            job_type=pb.JOB_TYPE_JUDGE,
            model="gpt-4o-mini",
            job_id=job_id,
        ).SerializeToString()
        commit_bytes = pb.CommitRequest(
            reservation_id="r######-000",
            organization=org,
            actual_uecu=700,
            usage=pb.Usage(tokens_in=900, tokens_out=350, calls=1),
        ).SerializeToString()
        calls = (
            (pb.ReserveRequest, service.Reserve, reserve_bytes),
            (pb.CommitRequest, service.Commit, commit_bytes),
        )
    else:
        calls = (
            (pb.ReserveBatchRequest, service.ReserveBatch, reserve.SerializeToString()),
            (pb.CommitBatchRequest, service.CommitBatch, commit.SerializeToString()),
        )
    if op in ("reserve", "reserve-batch", "job-reserve"):
        calls = calls[:1]
    context = _Context()
    for i in range(n):
        slot = b"%06d" % i
        for message, handler, template in calls:
            answer = await handler(message.FromString(template.replace(b"######", slot)), context)
            answer.SerializeToString()
    await server.store.close()


async def flush_loop(n: int, redis_url: str, prefix: str, ledger_url: str) -> None:
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.ledger import open_ledger
    from ecu_sidecar.metrics import FlusherMetrics
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore

    raw = {"redis_url": redis_url, "key_prefix": prefix, "ledger_url": ledger_url}
    settings = Settings.from_mapping({k: ("bench", v) for k, v in raw.items()})
    store = RedisStore.from_settings(settings)
    ledger = open_ledger(ledger_url)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))
    try:
        await flusher.discover(force=True)
        moved = [await flusher.flush_once() for _ in range(n)]
        if min(moved) < FLUSH_EVENTS // 2:
            raise RuntimeError(f"the flusher moved {moved} events per cycle: backlog too short")
    finally:
        await store.close()
        ledger.close()


class _Context:
    """What the handlers ask of a grpc.aio context when nothing fails."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


# -- the parent: valgrind, twice per figure -----------------------------------------------------


def _irefs(log: Path) -> int:
    found = _IREFS.search(log.read_text())
    if found is None:
        raise RuntimeError(f"valgrind wrote no instruction count: {log.read_text()[-500:]}")
    return int(found.group(1).replace(",", ""))


def _run_child(
    op: str, n: int, redis_url: str, *, valgrind_log: Path | None, extra: tuple[str, ...] = ()
) -> None:
    cmd = [sys.executable, "-m", "bench.icount", "--child", op, str(n), redis_url, *extra]
    if valgrind_log is not None:
        cmd = [*_VALGRIND, f"--log-file={valgrind_log}", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{op} x{n} failed: {done.stderr[-2000:]}")


class _Redis:
    """A throw-away redis-server on 127.0.0.1, under valgrind when given a log file."""

    def __init__(self, binary: str, valgrind_log: Path | None) -> None:
        self.port = free_port()
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no"]
        if valgrind_log is not None:
            cmd = [*_VALGRIND, f"--log-file={valgrind_log}", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        self.client = redis.Redis(port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        import redis

        try:
            self.client.shutdown(nosave=True)
        except redis.ConnectionError:
            pass  # it closes the connection as it exits
        self.proc.wait(timeout=60)


def count(op: str, n: int, side: str, binary: str, work: Path) -> int:
    log = work / f"{side}-{op}-{n}.log"
    # valgrind runs whichever process the side names: the child or the redis-server.
    redis_server = _Redis(binary, log if side == "redis" else None)
    try:
        _run_child(op, n, redis_server.url, valgrind_log=log if side == "sidecar" else None)
    finally:
        redis_server.stop()
    return _irefs(log)


@contextlib.contextmanager
def flusher_backlog(redis_url: str, pg_url: str, cycles: int) -> Iterator[tuple[str, str, Any]]:
    """A backlog for ``cycles`` flusher cycles and one more (the cycle read ahead): reserve and
    commit events written by the product's scripts into FLUSH_ORGS outboxes under a fresh
    prefix, and a fresh ledger schema. Yields (prefix, ledger URL, the harness); both are
    dropped after."""
    from bench import sections
    from bench.harness import Config, Harness

    h = Harness(Config(redis_url=redis_url, pg_url=pg_url))
    try:
        prefix = h.new_prefix("ic")
        orgs = [f"ic-{i:03d}" for i in range(FLUSH_ORGS)]
        h.fund(prefix, orgs)
        sections.backlog(h, prefix, orgs, (cycles + 1) * FLUSH_EVENTS // 2)
        yield prefix, h.new_schema(), h
    finally:
        h.close()


def count_flusher(n: int, binary: str, pg_url: str, work: Path) -> int:
    """The flusher's instructions over n cycles (the backlog is written before, not counted)."""
    redis_server = _Redis(binary, None)
    log = work / f"flusher-{n}.log"
    try:
        with flusher_backlog(redis_server.url, pg_url, n) as (prefix, url, _):
            _run_child("flush", n, redis_server.url, valgrind_log=log, extra=(prefix, url))
    finally:
        redis_server.stop()
    return _irefs(log)


def measure(
    binary: str, low: int, high: int, log: Any = print, pg_url: str | None = None
) -> dict[str, dict[str, int]]:
    """{side: {operation: instructions per operation}} for both sides and every operation,
    Commit and CommitBatch included; with ``pg_url``, the flusher's per event too."""
    out: dict[str, dict[str, int]] = {"sidecar": {}, "redis": {}}
    with tempfile.TemporaryDirectory(prefix="ecu-icount-") as tmp:
        if pg_url is not None:
            a = count_flusher(FLUSH_LOW, binary, pg_url, Path(tmp))
            b = count_flusher(FLUSH_HIGH, binary, pg_url, Path(tmp))
            per_event = (b - a) // ((FLUSH_HIGH - FLUSH_LOW) * FLUSH_EVENTS)
            out["flusher"] = {"event": per_event}
            log(f"flusher  {'event':14s} {per_event:>12,} instructions per event")
        for side in ("sidecar", "redis"):
            for op in OPERATIONS:
                a = count(op, low, side, binary, Path(tmp))
                b = count(op, high, side, binary, Path(tmp))
                out[side][op] = (b - a) // (high - low)
                log(f"{side:8s} {op:14s} {out[side][op]:>12,} instructions per operation")
            ops = out[side]
            ops["commit"] = ops["pair"] - ops["reserve"]
            ops["commit-batch"] = ops["batch-pair"] - ops["reserve-batch"]
            ops["job-commit"] = ops["job-pair"] - ops["job-reserve"]
    return out


def render(result: dict[str, Any]) -> str:
    sides = result["instructions"]
    rows = [
        ("Reserve", "reserve"),
        ("Commit", "commit"),
        (f"ReserveBatch of {BATCH}", "reserve-batch"),
        (f"CommitBatch of {BATCH}", "commit-batch"),
        ("Reserve, a job's step", "job-reserve"),
        ("Commit, a job's step", "job-commit"),
    ]
    lines = [
        "| operation | sidecar process (handler in-process) | Redis (scripts) |",
        "| --- | ---: | ---: |",
    ]
    for name, key in rows:
        lines.append(f"| {name} | {sides['sidecar'][key]:,} | {sides['redis'][key]:,} |")
    for side in ("sidecar", "redis"):
        s = sides[side]
        lines.append(
            f"\n{side}: ReserveBatch of {BATCH} = {s['reserve-batch'] / s['reserve']:.2f} × "
            f"Reserve; CommitBatch of {BATCH} = {s['commit-batch'] / s['commit']:.2f} × Commit; "
            f"a job's step (Reserve + Commit) = {s['job-pair'] / s['pair']:.3f} × a wallet step"
        )
    if "flusher" in sides:
        lines.append(
            f"\nflusher process: {sides['flusher']['event']:,} instructions per event "
            f"(reserve and commit events, {FLUSH_EVENTS:,} per cycle)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        op, n, url = argv[1], int(argv[2]), argv[3]
        if op == "flush":
            from ecu_sidecar import eventloop

            # On the loop `ecu-sidecar flush` runs on (ECU_EVENT_LOOP: uvloop by default).
            from ecu_sidecar.settings import Settings

            eventloop.run(flush_loop(n, url, argv[4], argv[5]), Settings.from_mapping({}))
        else:
            asyncio.run(handler_loop(op, n, url))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.icount", description=__doc__.splitlines()[0])
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument("--low", type=int, default=20, help="iterations of the shorter run")
    p.add_argument("--high", type=int, default=120, help="iterations of the longer run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "icount.json")
    p.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for the flusher's ledger (a fresh schema, dropped after)",
    )
    p.add_argument("--no-flusher", action="store_true", help="skip the flusher")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.icount needs valgrind (apt-get install valgrind)")
    if shutil.which(args.redis_server) is None and not Path(args.redis_server).exists():
        raise SystemExit(f"no redis-server binary at {args.redis_server!r}")
    if not 0 < args.low < args.high:
        raise SystemExit("--low must be positive and below --high")
    if not args.no_flusher:
        from bench.procs import check_local

        check_local(args.pg_url)
    started = time.time()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "command": "python -m bench.icount " + " ".join(argv),
        "batch": BATCH,
        "low": args.low,
        "high": args.high,
        "instructions": measure(
            args.redis_server,
            args.low,
            args.high,
            pg_url=None if args.no_flusher else args.pg_url,
        ),
    }
    result["duration_s"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
