"""What the fault and load tests share: the long/short switch, private redis-server processes,
`ecu-sidecar serve` subprocesses, a gRPC load driver that records every acknowledged call, and
the audit that recomputes an organization's counters from its hold records.

The default test run executes every test here in a bounded form (seconds each). Set
``ECU_CHAOS_LONG=1`` (``make chaos`` does) for the long variants: more rounds, more kills,
longer load. Nothing is skipped in either mode, except when the ``redis-server`` binary or a
service is missing (and then, under ``ECU_REQUIRE_SERVICES=1``, it fails instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.model import Balance
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.keys import org_keys
from tests.conftest import (
    ADMIN_METADATA,
    ADMIN_TOKEN,
    FAST_RECONNECT,
    REQUIRE_SERVICES,
    assert_conserved,
    direct_client,
    wait_until,
    wait_until_sync,
)

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("ECU_CHAOS_LONG", "") not in ("", "0", "false", "no")
"""The long variants (``make chaos``): more rounds and longer load; the default is bounded."""

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def scale(short: Any, long: Any) -> Any:
    """``long`` under ECU_CHAOS_LONG=1, else ``short``."""
    return long if LONG else short


def free_port() -> int:
    """A port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str = "redis-server") -> None:
    if shutil.which(name) is None:
        if REQUIRE_SERVICES:
            pytest.fail(f"{name} binary not found and ECU_REQUIRE_SERVICES is set", pytrace=False)
        pytest.skip(f"{name} binary not found")


# -- private redis-server processes --------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own on 127.0.0.1: start, SIGKILL, restart on the same port
    and data directory, send commands. ``aof=True`` runs it with ``appendonly yes`` and
    ``appendfsync always``: every acknowledged write is on disk before the reply."""

    def __init__(self, *, aof: bool = False) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ecu-chaos-redis-")
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", self.dir, "--logfile", "redis.log", "--repl-diskless-sync-delay", "0"]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        proc = self.proc

        def pong() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            try:
                return self.command("PING", timeout=0.2) == b"+PONG"
            except OSError:
                return False

        try:
            wait_until_sync(pong, "redis-server answering PING", timeout_s)
        except AssertionError:
            raise RuntimeError(f"redis-server did not come up: {self.log_tail()}") from None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((Path(self.dir) / "redis.log").read_text().splitlines()[-n:])
        return ""

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command over a fresh connection; the first line of the reply."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(payload.encode())
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(65_536)
                if not chunk:
                    break
                data += chunk
        return data.split(b"\r\n", 1)[0]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_servers() -> Iterator[Any]:
    """A factory of private redis-servers, all killed and removed after the test."""
    require_binary()
    made: list[RedisServer] = []

    def make(*, aof: bool = False, start: bool = True) -> RedisServer:
        server = RedisServer(aof=aof)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        server.close()


# -- `ecu-sidecar serve` as a subprocess ------------------------------------------------------


def spawn(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
    """``python -m <args>`` from the repository root (a subprocess.Popen)."""
    return subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=ROOT, **kw)


def sidecar_env(**settings: str) -> dict[str, str]:
    """The parent's environment without ECU_* variables, plus these (ECU_ prefix optional)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env.update(
        ECU_ADMIN_TOKEN=ADMIN_TOKEN,
        ECU_LOG_LEVEL="WARNING",
        ECU_KEY_PREFIX="c" + uuid.uuid4().hex[:12],
    )
    for key, value in settings.items():
        env[key if key.startswith("ECU_") else "ECU_" + key.upper()] = str(value)
    return env


class SidecarProcess:
    """`python -m ecu_sidecar serve` on 127.0.0.1:<free port>, with its stderr in a file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**env, "ECU_LISTEN": f"127.0.0.1:{self.port}"}
        self.log = tempfile.NamedTemporaryFile(prefix="ecu-chaos-sidecar-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ecu_sidecar", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    async def wait_serving(self, timeout_s: float = 20.0) -> None:
        """Until gRPC health says SERVING (bounded)."""
        async with grpc.aio.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited at start-up:\n{self.stderr()}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            try:
                await wait_until(serving, "sidecar SERVING", timeout_s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}:\n{self.stderr()}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        try:
            await wait_until(lambda: self.proc.poll() is not None, "sidecar exiting", timeout_s)
        except AssertionError:
            stacks = self.stacks()
            self.proc.kill()
            raise AssertionError(
                f"sidecar did not exit in {timeout_s}s:\n{self.stderr()}\n{stacks}"
            ) from None
        return self.proc.returncode

    def stacks(self) -> str:
        """The live process's thread stacks (py-spy, when installed: `make bench` extras)."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            return "(py-spy not installed: no stacks)"
        try:
            out = subprocess.run(
                [str(spy), "dump", "--pid", str(self.proc.pid)],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(py-spy failed: {exc})"
        return out.stdout + out.stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


# -- the load driver: every call recorded ------------------------------------------------------


@dataclass
class Call:
    """One RPC as the client saw it."""

    op: str
    org: str
    rid: str
    request: Any
    started: float
    ended: float = 0.0
    code: str = ""
    """'OK' or the gRPC status name."""
    reason: str = ""
    reply: Any = None
    retried: bool = False
    """The first answer was unknown; code, reason and reply are the retry's."""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a refusal ('' when there is none)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


@dataclass
class Recorder:
    """Every call of a run, with helpers to replay the ones whose outcome is unknown."""

    calls: list[Call] = field(default_factory=list)

    async def call(
        self, stub: quota_pb2_grpc.QuotaStub, op: str, org: str, rid: str, request: Any, **kw: Any
    ) -> Call:
        c = Call(op, org, rid, request, time.monotonic())
        self.calls.append(c)
        try:
            c.reply = await getattr(stub, op)(request, **kw)
            c.code = "OK"
        except grpc.aio.AioRpcError as exc:
            c.code = exc.code().name
            c.reason = reason_of(exc)
        c.ended = time.monotonic()
        return c

    def codes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.calls:
            key = c.code if c.code == "OK" else f"{c.code}/{c.reason}"
            out[key] = out.get(key, 0) + 1
        return out

    def unknown(self) -> list[Call]:
        """Calls whose outcome the client could not learn (UNAVAILABLE, DEADLINE_EXCEEDED)."""
        return [c for c in self.calls if c.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")]

    def acked(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op and c.ok]


def reserve_request(org: str, rid: str, amount: int, ttl_ms: int = 0) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        reservation_id=rid,
        account=pb.Account(organization=org),
        amount_uecu=amount,
        job_type=pb.JOB_TYPE_GEPA,
        ttl_ms=ttl_ms,
    )


def commit_request(org: str, rid: str, actual: int) -> pb.CommitRequest:
    return pb.CommitRequest(
        organization=org, reservation_id=rid, actual_uecu=actual, usage=pb.Usage(calls=1)
    )


def release_request(org: str, rid: str) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(organization=org, reservation_id=rid)


async def grant(stub: quota_pb2_grpc.QuotaStub, org: str, amount: int, gid: str = "g1") -> None:
    await stub.Grant(
        pb.GrantRequest(
            grant_id=gid, organization=org, amount_uecu=amount, kind=pb.GRANT_KIND_TOP_UP
        ),
        metadata=ADMIN_METADATA,
        timeout=5,
    )


async def worker(
    rec: Recorder,
    stub: quota_pb2_grpc.QuotaStub,
    orgs: list[str],
    stop: asyncio.Event,
    seed: int,
    *,
    deadline_s: float = 5.0,
    ttl_ms: int = 0,
    pause_s: float = 0.0,
    max_steps: int = 100_000,
    capped: frozenset[str] = frozenset(),
) -> None:
    """Reserve, then commit (below, at, above the hold), release or abandon, until ``stop``.
    In the ``capped`` organizations a commit never exceeds its hold, so that what they are
    billed can never pass what they were granted. Every call is recorded; a failed call is
    not retried here (tests replay unknowns)."""
    import random

    rng = random.Random(seed)
    for step in range(max_steps):
        if stop.is_set():
            return
        org = orgs[rng.randrange(len(orgs))]
        rid = f"w{seed}-{step}-{uuid.uuid4().hex[:8]}"
        amount = rng.randint(1_000, 20_000)
        r = await rec.call(
            stub, "Reserve", org, rid, reserve_request(org, rid, amount, ttl_ms), timeout=deadline_s
        )
        if r.ok:
            roll = rng.random()
            if roll < 0.55:
                choices = [amount // 2, amount]
                if org not in capped:
                    choices += [amount + amount // 10, 2 * amount]
                actual = rng.choice(choices)
                await rec.call(
                    stub, "Commit", org, rid, commit_request(org, rid, actual), timeout=deadline_s
                )
            elif roll < 0.85:
                await rec.call(
                    stub, "Release", org, rid, release_request(org, rid), timeout=deadline_s
                )
            # else: abandoned; the hold expires
        failed = not r.ok
        # After a failure, back off a little (as the worker client does) instead of spinning.
        await asyncio.sleep(pause_s + (0.05 if failed else 0.0))


# -- the audit: counters recomputed from the hold records -------------------------------------


@dataclass
class Audit:
    """What one organization's hold records add up to."""

    records: dict[str, dict[str, Any]]
    balance: Balance

    def state(self, rid: str) -> str | None:
        rec = self.records.get(rid)
        return None if rec is None else rec["st"]


async def audit(store: RedisStore, org: str, settings: Settings) -> Audit:
    """Read every hold record of ``org`` (with a client of the test's own on the Redis
    ``settings`` name) and check that the account's counters are exactly their sums (nothing
    applied twice, nothing lost), and that conservation holds."""
    b = await store.balance(org)  # sweeps overdue holds first
    direct = direct_client(settings)
    try:
        raw = await direct.hgetall(org_keys(store.key_prefix, org)[1])
    finally:
        await direct.aclose()
    records = {k.decode(): json.loads(v) for k, v in raw.items()}
    assert_conserved(b)
    sums = dict.fromkeys(
        (
            "reserved",
            "held",
            "from_holds",
            "released",
            "overage",
            "unbilled",
            "late_unbilled",
            "late",
            "orphan",
            "expired",
            "expired_holds",
            "committed",
            "active",
        ),
        0,
    )
    for rec in records.values():
        st, amt = rec["st"], int(rec["amt"])
        orphan = rec.get("orphan") == "1"
        late = rec.get("late") == "1"
        # A hold Redis lost and the ledger recorded, committed late against that record
        # (``known``): this Redis never reserved nor expired it.
        known = "known" in rec
        if not orphan and not known:
            sums["reserved"] += amt
        if st == "A":
            sums["held"] += amt
            sums["active"] += 1
        elif st == "R":
            sums["released"] += int(rec["rel"])
        elif st == "E":
            sums["expired"] += amt
            sums["expired_holds"] += 1
        elif st == "C":
            cm = int(rec["cm"])
            sums["committed"] += cm
            # What a late commit used beyond what it could bill is late_unbilled, not an
            # overage left unbilled (commit.lua); an orphan's is an overage's.
            sums["late_unbilled" if late and not orphan else "unbilled"] += int(rec["uov"])
            if orphan:
                sums["orphan"] += cm
            elif late:
                sums["late"] += cm
                if not known:
                    sums["expired"] += amt
                    sums["expired_holds"] += 1
            else:
                sums["from_holds"] += min(cm, amt)
                sums["released"] += int(rec["rel"])
                sums["overage"] += int(rec["ov"])
    got = {
        "reserved": b.reserved_uecu,
        "held": b.held_uecu,
        "from_holds": b.committed_from_holds_uecu,
        "released": b.released_uecu,
        "overage": b.overage_uecu,
        "unbilled": b.unbilled_overage_uecu,
        "late_unbilled": b.late_unbilled_uecu,
        "late": b.late_committed_uecu,
        "orphan": b.orphan_committed_uecu,
        "expired": b.expired_uecu,
        "expired_holds": b.expired_holds,
        "committed": b.committed_uecu - b.carried_committed_uecu,
        "active": b.outstanding_holds,
    }
    assert got == sums, f"{org}: counters {got} != sums of hold records {sums}"
    return Audit(records, b)


def check_acked(a: Audit, rec: Recorder, org: str) -> None:
    """Every call the sidecar acknowledged is reflected in the hold records."""
    for c in rec.calls:
        if c.org != org or not c.ok:
            continue
        hold = a.records.get(c.rid)
        assert hold is not None, f"acknowledged {c.op} {c.rid} has no hold record"
        if c.op == "Reserve":
            assert int(hold["amt"]) == c.request.amount_uecu
        elif c.op == "Commit":
            assert hold["st"] == "C", (c.rid, hold)
            assert int(hold["cm"]) == c.reply.committed_uecu, (c.rid, hold)
        elif c.op == "Release":
            assert hold["st"] in ("R", "E"), (c.rid, hold)


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write a run's measurements to tests/chaos/results/<name>.json (and return the path)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- an in-process sidecar with a gRPC stub ----------------------------------------------------


@contextlib.asynccontextmanager
async def serving(settings: Any) -> Any:
    """A SidecarServer in this process and a stub on it (``async with serving(s) as (srv,
    stub)``); stopped afterwards."""
    from ecu_sidecar.server import SidecarServer

    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, quota_pb2_grpc.QuotaStub(channel)
    finally:
        await server.stop(grace=0)


#: How long a call whose outcome is unknown may keep answering UNAVAILABLE before the test
#: gives up: an organization being rebuilt after a failover answers REBUILDING for up to
#: ECU_REBUILD_FENCE_MS (10 s) per fence, fenced again while its drain cannot finish (no replica
#: yet to confirm it), as the worker client's RetryPolicy.rebuild_wait_s (15 s) allows for.
REPLAY_LIMIT_S = 30.0


async def replay_unknown(
    rec: Recorder, stub: quota_pb2_grpc.QuotaStub, *, deadline_s: float = 5.0
) -> int:
    """Retry every call whose outcome was unknown, with the same request (same ids), until it
    gets a definite answer (within REPLAY_LIMIT_S); the retry's answer replaces the unknown
    one. Returns how many."""
    unknown = rec.unknown()
    for c in unknown:
        give_up = time.monotonic() + REPLAY_LIMIT_S
        attempt = 0
        while True:
            again = Recorder()
            r = await again.call(stub, c.op, c.org, c.rid, c.request, timeout=deadline_s)
            if r.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                c.code, c.reason, c.reply = r.code, r.reason, r.reply
                c.retried = True
                break
            attempt += 1
            if time.monotonic() > give_up:
                raise AssertionError(
                    f"{c.op} {c.rid} still has no definite outcome after {REPLAY_LIMIT_S:g} s "
                    f"({attempt} attempts; last {r.code} {r.reason})"
                )
            await asyncio.sleep(min(0.5, 0.05 * attempt))
    return len(unknown)


async def ledger_agrees(ledger: Any, store: RedisStore, org: str) -> None:
    """After a drain: the ledger's conservation query is ok, its totals equal Redis's, and the
    organization's outbox is empty."""
    b = await store.balance(org)
    assert_conserved(b, await asyncio.to_thread(ledger.conservation, org))
    acct = await asyncio.to_thread(ledger.account, org)
    assert acct is not None
    h = acct.holds
    assert (
        h.reserved_uecu,
        h.released_uecu,
        h.expired_uecu,
        h.expired_holds,
        h.overage_uecu,
        h.late_committed_uecu,
        h.unbilled_uecu,
    ) == (
        b.reserved_uecu,
        b.released_uecu,
        b.expired_uecu,
        b.expired_holds,
        b.overage_uecu,
        b.late_committed_uecu,
        b.unbilled_overage_uecu,
    ), (org, h, b)
    assert (await store.outbox_state(org)).length == 0


def new_flusher(store: RedisStore, ledger: Any, settings: Any) -> Any:
    """A Flusher with its own metrics registry (``.metrics.registry``)."""
    from prometheus_client import CollectorRegistry

    from ecu_sidecar.flusher import Flusher
    from ecu_sidecar.metrics import FlusherMetrics

    return Flusher(store, ledger, settings, FlusherMetrics(CollectorRegistry()))


def check_replies(rec: Recorder) -> None:
    """Every OK answer is the answer to its own request (no reply crossed to another call,
    as a connection reused after a lost or late reply could make happen)."""
    for c in rec.calls:
        if not c.ok:
            continue
        if c.op == "Reserve":
            assert c.reply.hold.reservation_id == c.rid, (c.rid, c.reply)
            assert c.reply.hold.amount_uecu == c.request.amount_uecu, (c.rid, c.reply)
        elif c.op in ("Commit", "Release"):
            assert c.reply.reservation_id == c.rid, (c.rid, c.reply)
