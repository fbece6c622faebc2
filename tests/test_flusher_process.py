"""The real `ecu-sidecar flush` process under faults: stopped (SIGTERM) while the ledger or
Redis is down, `--once` during a ledger outage, and draining what a dead flusher left pending.

Each flusher runs as ``python -m ecu_sidecar flush`` with its settings in the environment, its
stderr in a file; the tests read its /metrics to know where it stands (never a sleep), then
check its exit status and that what it wrote is one line (text) or JSON lines, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.model import GrantKind
from ecu_sidecar.store import RedisStore
from ecu_sidecar.store.outbox import GROUP
from tests.conftest import (
    REDIS_URL,
    direct_client,
    drop_keys,
    make_settings,
    own_pg_database,
    pg_read_only,
    require_redis,
    wait_until,
)
from tests.test_unavailable import PrivateRedis, free_port


class FlushProcess:
    """`python -m ecu_sidecar flush [--once]`, its stderr in a file, /metrics on a free port."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.metrics_port = free_port()
        self.env = {**env, "ECU_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}"}
        self.err = tempfile.NamedTemporaryFile(prefix="ecu-flush-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ecu_sidecar", "flush", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )

    def stderr(self) -> str:
        return Path(self.err.name).read_text(errors="replace")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample of the live process's /metrics (None: not serving yet, or absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == (labels or {}):
                    return sample.value
        return None

    async def until(self, what: str, check: Callable[[], bool], limit_s: float = 30) -> None:
        """Poll ``check`` (bounded); fail with the process's stderr."""

        async def done() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"flusher exited ({self.proc.returncode}):\n{self.stderr()}")
            return await asyncio.to_thread(check)

        try:
            await wait_until(done, what, limit_s)
        except AssertionError as exc:
            if "flusher exited" in str(exc):
                raise
            raise AssertionError(f"{exc}:\n{self.stderr()}") from None

    async def exit(self, limit_s: float = 60) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it exits (bounded)."""
        try:
            await wait_until(lambda: self.proc.poll() is not None, "the flusher exiting", limit_s)
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"flusher did not exit in {limit_s}s:\n{self.stderr()}") from None
        assert self.proc.stdout is not None
        return self.proc.returncode, self.proc.stdout.read().decode(), self.stderr()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


def flush_env(redis_url: str, prefix: str, ledger_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env.update(
        ECU_REDIS_URL=redis_url,
        ECU_KEY_PREFIX=prefix,
        ECU_LEDGER_URL=ledger_url,
        ECU_FLUSHER_INTERVAL_MS="10",
        ECU_FLUSHER_DISCOVERY_INTERVAL_MS="0",
        ECU_FLUSHER_OBSERVE_INTERVAL_MS="50",
        ECU_EVENT_LOOP="asyncio",
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def flushing(env: dict[str, str], *args: str) -> Iterator[FlushProcess]:
    proc = FlushProcess(env, *args)
    try:
        yield proc
    finally:
        proc.close()


def one_error_line(err: str, log_format: str, *needles: str) -> None:
    """What a flusher that could not finish wrote: at ERROR level, one text line, or JSON
    lines whose last is the error; never a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if log_format == "text":
        assert len(lines) == 1, err
        line = lines[0]
    else:
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert records[-1]["level"] == "ERROR", err
        line = records[-1]["msg"]
        assert not any("exc_info" in r or "exception" in r for r in records), err
    for needle in needles:
        assert needle in line, line


class Outboxes:
    """Real Redis with a fresh key prefix, and an engine writing events into it."""

    def __init__(self, redis_url: str, ledger_url: str) -> None:
        self.settings = make_settings("redis", redis_url=redis_url, ledger_url=ledger_url)
        self.store = RedisStore.from_settings(self.settings)
        self.direct = direct_client(self.settings)
        self.ledger = open_ledger(ledger_url)
        self.ledger.migrate()
        self.engine = QuotaEngine(self.store, self.settings, ledger=self.ledger)

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        return flush_env(s.redis_url, s.key_prefix, s.ledger_url, **extra)

    async def events(self, org: str, n: int) -> None:
        """``n`` events in the outbox of ``org``: a grant, then cap changes."""
        await self.engine.grant(org, "g1", 10_000_000, GrantKind.TOP_UP)
        for i in range(n - 1):
            await self.engine.set_cap(org, "team", "t1", 100_000 + i)

    async def length(self, org: str) -> int:
        return int(await self.direct.xlen(self.store.outbox_key(org)))

    async def pending(self, org: str) -> int:
        return int((await self.direct.xpending(self.store.outbox_key(org), GROUP))["pending"])

    async def close(self) -> None:
        await drop_keys(self.settings)
        await self.store.close()
        await self.direct.aclose()
        self.ledger.close()


@pytest_asyncio.fixture
async def sqlite_outboxes(tmp_path: Path) -> AsyncIterator[Outboxes]:
    require_redis()
    boxes = Outboxes(REDIS_URL, f"sqlite://{tmp_path}/ledger.db")
    yield boxes
    await boxes.close()


# -- stopped while a side is down: one line, exit 1, nothing lost -----------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_sigterm_during_a_ledger_outage_exits_1_with_one_error_line(log_format: str) -> None:
    require_redis()
    with own_pg_database() as (name, url):
        boxes = Outboxes(REDIS_URL, url)
        try:
            await boxes.events("outage", 20)
            level = "ERROR" if log_format == "text" else "WARNING"
            env = boxes.env(ECU_LOG_FORMAT=log_format, ECU_LOG_LEVEL=level)
            pg_read_only(name, True)
            with flushing(env) as flusher:
                await flusher.until(
                    "a failed ledger write",
                    lambda: (
                        (
                            flusher.metric("ecu_flusher_failed_cycles_total", {"cause": "ledger"})
                            or 0
                        )
                        >= 1
                    ),
                )
                flusher.proc.send_signal(signal.SIGTERM)
                code, _, err = await flusher.exit()
            assert code == 1, err
            one_error_line(
                err, log_format, "the final flush stopped: ledger failed", "read-only transaction"
            )
            assert await boxes.length("outage") == 20, "every event stays in the outbox"
        finally:
            await boxes.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_flush_once_during_a_ledger_outage_exits_1_with_one_error_line(
    log_format: str,
) -> None:
    require_redis()
    with own_pg_database() as (name, url):
        boxes = Outboxes(REDIS_URL, url)
        try:
            await boxes.events("outage", 5)
            pg_read_only(name, True)
            env = boxes.env(ECU_LOG_FORMAT=log_format, ECU_LOG_LEVEL="INFO")
            with flushing(env, "--once") as flusher:
                code, out, err = await flusher.exit()
            assert (code, out) == (1, ""), err
            one_error_line(err, log_format, "flush --once stopped: ledger failed")
            assert await boxes.length("outage") == 5
        finally:
            await boxes.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_sigterm_while_redis_is_down_exits_1_with_one_error_line(
    private_redis: PrivateRedis, tmp_path: Path, log_format: str
) -> None:
    url = f"sqlite://{tmp_path}/ledger.db"
    with open_ledger(url) as ledger:
        ledger.migrate()
    level = "ERROR" if log_format == "text" else "WARNING"
    env = flush_env(
        f"redis://127.0.0.1:{private_redis.port}/0",
        "t" + uuid.uuid4().hex[:12],
        url,
        ECU_LOG_FORMAT=log_format,
        ECU_LOG_LEVEL=level,
    )
    with flushing(env) as flusher:
        await flusher.until(
            "a successful cycle",
            lambda: (flusher.metric("ecu_flusher_last_success_timestamp_seconds") or 0) > 0,
        )
        private_redis.kill()
        await flusher.until(
            "a cycle failing on Redis",
            lambda: (
                (flusher.metric("ecu_flusher_failed_cycles_total", {"cause": "redis"}) or 0) >= 1
            ),
        )
        flusher.proc.send_signal(signal.SIGTERM)
        code, _, err = await flusher.exit()
    assert code == 1, err
    one_error_line(err, log_format, "the final flush stopped: Redis unavailable")


# -- draining takes over what a dead flusher left pending --------------------------------------


async def dead_flusher_holds(boxes: Outboxes, org: str, n: int) -> None:
    """A flusher read ``n`` entries of the outbox of ``org`` and died (they stay pending)."""
    key = boxes.store.outbox_key(org)
    await boxes.direct.xgroup_create(key, GROUP, id="0", mkstream=True)
    await boxes.direct.xreadgroup(GROUP, "dead-flusher", {key: ">"}, count=n)


async def test_flush_once_moves_a_dead_flushers_pending_entries(sqlite_outboxes: Outboxes) -> None:
    """The runbook's `flush --once`: everything pending moves, not only what a claim round
    takes once its entries have been idle ECU_FLUSHER_CLAIM_IDLE_MS (30 s here)."""
    boxes = sqlite_outboxes
    await boxes.events("stuck", 301)
    await dead_flusher_holds(boxes, "stuck", 250)
    env = boxes.env(ECU_FLUSHER_BATCH="50", ECU_FLUSHER_CLAIM_IDLE_MS="30000")
    with flushing(env, "--once") as flusher:
        code, out, err = await flusher.exit()
    assert code == 0, err
    assert out.startswith("moved 301 events;") and "nothing left in the outboxes" in out, out
    assert (await boxes.length("stuck"), await boxes.pending("stuck")) == (0, 0)
    assert boxes.ledger.balance("stuck") == 10_000_000


async def test_the_final_flush_at_sigterm_moves_a_dead_flushers_pending_entries(
    sqlite_outboxes: Outboxes,
) -> None:
    boxes = sqlite_outboxes
    await boxes.events("stuck", 301)
    await dead_flusher_holds(boxes, "stuck", 250)
    env = boxes.env(
        ECU_FLUSHER_BATCH="50", ECU_FLUSHER_CLAIM_IDLE_MS="3600000", ECU_LOG_LEVEL="INFO"
    )
    with flushing(env) as flusher:
        await flusher.until(
            "the entries nobody held, written",
            lambda: flusher.metric("ecu_flusher_events_total", {"result": "written"}) == 51,
        )
        assert await boxes.pending("stuck") == 250, "not claimable for an hour"
        flusher.proc.send_signal(signal.SIGTERM)
        code, _, err = await flusher.exit()
    assert code == 0, err
    assert "final flush of 250 events; nothing left in the outboxes" in err, err
    assert (await boxes.length("stuck"), await boxes.pending("stuck")) == (0, 0)


# -- a ledger that recovers: no restart needed; /livez tells a stuck flusher apart --------------


def livez(flusher: FlushProcess) -> int | None:
    """The status /livez answers (None: not serving)."""
    url = f"http://127.0.0.1:{flusher.metrics_port}/livez"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


async def test_a_flusher_outlives_a_read_only_database_and_livez_reports_the_stall() -> None:
    """The database turns read-only (a standby after a failover, default_transaction_read_only)
    while the flusher runs, so its pool reconnects to read-only sessions; then it writes again.
    Meanwhile /livez fails (no cycle succeeds), /metrics does not; afterwards the same process
    (no restart) writes every event, and /livez recovers."""
    require_redis()
    with own_pg_database() as (name, url):
        boxes = Outboxes(REDIS_URL, url)
        try:
            await boxes.events("standby", 10)
            env = boxes.env(ECU_FLUSHER_STALL_TIMEOUT_MS="1000", ECU_LOG_LEVEL="ERROR")
            with flushing(env) as flusher:

                def written() -> float:
                    return flusher.metric("ecu_flusher_events_total", {"result": "written"}) or 0

                await flusher.until("the first events written", lambda: written() == 10)
                await flusher.until("/livez passing", lambda: livez(flusher) == 200)
                pg_read_only(name, True)
                for i in range(20):
                    await boxes.engine.set_cap("standby", "team", "t2", 1_000 + i)
                await flusher.until(
                    "/livez failing, the ledger refusing the writes",
                    lambda: (
                        livez(flusher) == 503
                        and (
                            flusher.metric("ecu_flusher_failed_cycles_total", {"cause": "ledger"})
                            or 0
                        )
                        >= 1
                    ),
                )
                assert flusher.metric("ecu_outbox_length") == 20, "observed all the same"
                assert written() == 10
                pg_read_only(name, False)
                await flusher.until("the rest written", lambda: written() == 30)
                await flusher.until("/livez passing", lambda: livez(flusher) == 200)
                assert flusher.proc.poll() is None, "the same process, never restarted"
            assert (await boxes.length("standby"), await boxes.pending("standby")) == (0, 0)
        finally:
            await boxes.close()
