"""/metrics of a running sidecar and of a running flusher, after real traffic.

The sidecar is a SidecarServer on real Redis serving ECU_METRICS_LISTEN; the flusher is the real
``ecu-sidecar flush`` process (its own registry, its own store) writing a SQLite ledger. Both
are scraped over HTTP before and after the traffic, and every counter must have moved by
exactly what was sent. When promtool is installed (``make promtool``), the scrapes also pass
``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.ledger import open_ledger
from ecu_sidecar.metrics import FlusherMetrics, Metrics, StoreMetrics
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings, SettingsError
from tests.conftest import ADMIN_METADATA, drop_keys, make_settings, require_redis, wait_until

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def promtool() -> str | None:
    local = ROOT / ".tools" / "bin" / "promtool"
    return str(local) if local.exists() else shutil.which("promtool")


def check_with_promtool(text: str) -> None:
    tool = promtool()
    if tool is None:
        return  # `make metrics-check` runs promtool on a live scrape in CI
    proc = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest_asyncio.fixture
async def sidecar() -> AsyncIterator[SidecarServer]:
    require_redis()
    settings = make_settings(
        "redis",
        metrics_listen="127.0.0.1:0",
        sweep_interval_ms="3600000",  # the test expires holds itself
        rate_card_poll_ms="0",
    )
    server = SidecarServer(settings, registry=CollectorRegistry())
    await server.start()
    yield server
    await drop_keys(settings)
    await server.stop(grace=0)


def flusher_env(settings: Settings, ledger_url: str, port: int, org: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env.update(
        ECU_REDIS_URL=settings.redis_url,
        ECU_KEY_PREFIX=settings.key_prefix,
        ECU_LEDGER_URL=ledger_url,
        ECU_METRICS_LISTEN=f"127.0.0.1:{port}",
        ECU_METRICS_ORGS=org,
        ECU_FLUSHER_INTERVAL_MS="20",
        ECU_FLUSHER_DISCOVERY_INTERVAL_MS="0",
        ECU_RECONCILE_INTERVAL_MS="50",
        ECU_FLUSHER_OBSERVE_INTERVAL_MS="50",  # the gauges the test waits for (10 s otherwise)
        ECU_LOG_LEVEL="WARNING",
    )
    return env


def start_flusher(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The real `ecu-sidecar flush` process."""
    return subprocess.Popen(
        [sys.executable, "-m", "ecu_sidecar", "flush"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_flusher(flusher: subprocess.Popen[bytes]) -> str:
    """SIGTERM (graceful: a final flush), then its stderr."""
    flusher.terminate()
    try:
        _, err = flusher.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        flusher.kill()
        _, err = flusher.communicate()
    return err.decode()


def scraped(port: int, until: Callable[[str], bool] = lambda text: True) -> Callable[[], Any]:
    """For wait_until: a scrape of ``port`` that ``until`` accepts, or None (not yet serving,
    or not yet there)."""

    def scrape() -> str | None:
        try:
            text = scrape_text(port)
        except OSError:
            return None
        return text if until(text) else None

    return scrape


async def test_counters_move_by_exactly_the_traffic(sidecar: SidecarServer, tmp_path: Path) -> None:
    org = "metrics-" + uuid.uuid4().hex[:8]
    ledger_url = f"sqlite://{tmp_path}/ledger.db"
    ledger = open_ledger(ledger_url)
    ledger.migrate()
    ledger.close()
    port = free_port()
    flusher = start_flusher(flusher_env(sidecar.settings, ledger_url, port, org))
    try:
        flusher_before_text = await wait_until(scraped(port), "the flusher serving /metrics")
        side_before = parse(scrape_text(sidecar.metrics_port))
        flush_before = parse(flusher_before_text)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    organization=org,
                    grant_id="g1",
                    amount_uecu=10_000_000,
                    kind=pb.GRANT_KIND_TOP_UP,
                ),
                metadata=ADMIN_METADATA,
            )
            await stub.SetCap(
                pb.SetCapRequest(
                    organization=org, scope=pb.CAP_SCOPE_TEAM, id="small", cap_uecu=100_000
                ),
                metadata=ADMIN_METADATA,
            )

            def reserve(rid: str, amount: int, job: int, model: str = "", **kw: Any) -> Any:
                account = pb.Account(organization=org, team=kw.pop("team", ""))
                return stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id=rid,
                        account=account,
                        amount_uecu=amount,
                        job_type=job,
                        model=model,
                        **kw,
                    )
                )

            await reserve("inf", 2_000_000, pb.JOB_TYPE_INFERENCE, "gpt-4o")
            await reserve("inf", 2_000_000, pb.JOB_TYPE_INFERENCE, "gpt-4o")  # a replay
            await reserve("jdg", 1_000_000, pb.JOB_TYPE_JUDGE, "gpt-4o")
            await reserve("gep", 500_000, pb.JOB_TYPE_GEPA)
            await reserve("eng", 250_000, pb.JOB_TYPE_ENGINE, ttl_ms=1_000)
            await reserve("trc", 300_000, pb.JOB_TYPE_TRACE_EVAL)  # stays outstanding
            for rid, amount, team in (("big", 50_000_000, ""), ("capped", 200_000, "small")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await reserve(rid, amount, pb.JOB_TYPE_ENGINE, team=team)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await stub.Commit(
                pb.CommitRequest(organization=org, reservation_id="inf", actual_uecu=1_500_000)
            )
            await stub.Commit(  # 10 % over its hold: billed, counted as overage
                pb.CommitRequest(organization=org, reservation_id="jdg", actual_uecu=1_100_000)
            )
            await stub.Release(pb.ReleaseRequest(organization=org, reservation_id="gep"))
            sidecar.store.clock_offset_ms = 5_000  # "eng" is now overdue
            await stub.GetBalance(pb.GetBalanceRequest(organization=org))  # sweeps it

        side_text = scrape_text(sidecar.metrics_port)
        side = parse(side_text)
        rpc = "ecu_rpc_requests_total"
        assert delta(side_before, side, rpc, method="Reserve", code="OK") == 6
        assert delta(side_before, side, rpc, method="Reserve", code="RESOURCE_EXHAUSTED") == 2
        assert delta(side_before, side, rpc, method="Commit", code="OK") == 2
        assert delta(side_before, side, rpc, method="Release", code="OK") == 1
        assert delta(side_before, side, rpc, method="Grant", code="OK") == 1
        assert delta(side_before, side, rpc, method="SetCap", code="OK") == 1
        assert delta(side_before, side, rpc, method="GetBalance", code="OK") == 1
        assert delta(side_before, side, "ecu_rpc_duration_seconds_count", method="Reserve") == 8
        reason = "INSUFFICIENT_ECU"
        assert (
            delta(side_before, side, "ecu_rpc_errors_total", method="Reserve", reason=reason) == 2
        )
        assert delta(side_before, side, "ecu_insufficient_ecu_total", scope="organization") == 1
        assert delta(side_before, side, "ecu_insufficient_ecu_total", scope="team") == 1
        scripts = {"reserve": 8, "commit": 2, "release": 1, "grant": 1, "set_cap": 1, "balance": 1}
        for script, calls in scripts.items():
            count = "ecu_redis_script_duration_seconds_count"
            assert delta(side_before, side, count, script=script) == calls, script
        assert not any(name == "ecu_redis_script_errors_total" for name, _ in side)
        assert value(side, "ecu_rate_card_info", version=sidecar.rates.current.version) == 1
        assert org not in side_text  # no organization label by default
        check_with_promtool(side_text)

        def flushed(text: str) -> bool:
            s = parse(text)
            return (
                value(s, "ecu_expired_uecu_total", job_type="engine") > 0
                and value(s, "ecu_holds_outstanding") == 1
                and value(s, "ecu_organization_held_uecu", organization=org) == 300_000
            )

        flush_text = await wait_until(scraped(port, flushed), "the flusher's gauges and counters")
        after = parse(flush_text)

        def money(name: str, job: str) -> float:
            return delta(flush_before, after, f"ecu_{name}_uecu_total", job_type=job)

        assert money("reserved", "inference") == 2_000_000  # the replay moved nothing
        assert money("reserved", "judge") == 1_000_000
        assert money("reserved", "gepa") == 500_000
        assert money("reserved", "engine") == 250_000
        assert money("reserved", "trace_eval") == 300_000
        assert money("committed", "inference") == 1_500_000
        assert money("committed", "judge") == 1_100_000
        assert money("released", "inference") == 500_000
        assert money("released", "gepa") == 500_000
        assert money("released", "judge") == 0
        assert money("overage", "judge") == 100_000
        assert money("expired", "engine") == 250_000
        assert sum(money("expired", j) for j in ("inference", "judge", "gepa", "trace_eval")) == 0
        # grant, cap, 5 reserves, 2 commits, release, expire: 11 events, each written once
        assert delta(flush_before, after, "ecu_flusher_events_total", result="written") == 11
        assert delta(flush_before, after, "ecu_flusher_events_total", result="duplicate") == 0
        assert value(after, "ecu_held_uecu") == 300_000
        balance = 10_000_000 - 1_500_000 - 1_100_000
        assert value(after, "ecu_organization_balance_uecu", organization=org) == balance
        assert (
            value(after, "ecu_organization_available_uecu", organization=org) == balance - 300_000
        )
        assert value(after, "ecu_reconcile_drift_uecu") == 0
        assert value(after, "ecu_flusher_last_success_timestamp_seconds") > 0
        # The flusher's own store is instrumented: its reconcile and balance script calls.
        assert value(after, "ecu_redis_script_duration_seconds_count", script="balance") >= 1
        check_with_promtool(flush_text)
    finally:
        err = await asyncio.to_thread(stop_flusher, flusher)
    assert flusher.returncode == 0, err


async def test_redis_errors_are_counted_by_script_and_kind() -> None:
    dead = free_port()  # nothing listens there: connections are refused at once
    settings = make_settings("redis", redis_url=f"redis://127.0.0.1:{dead}/0", metrics_listen="")
    server = SidecarServer(settings, registry=CollectorRegistry())
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=0)
    r = server.registry
    labels = {"script": "balance", "error": "unreachable"}
    assert r.get_sample_value("ecu_redis_script_errors_total", labels) == 2
    assert r.get_sample_value("ecu_redis_script_duration_seconds_count", {"script": "balance"}) == 2
    codes = {"method": "GetBalance", "code": "UNAVAILABLE"}
    assert r.get_sample_value("ecu_rpc_requests_total", codes) == 2


def test_every_family_is_registered_once_per_registry() -> None:
    """Sidecar and flusher metrics share one registry inside `serve` (the embedded default)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    flusher = FlusherMetrics(registry)
    assert StoreMetrics.of(registry) is metrics.store
    assert flusher.registry is registry
    # Alertable from the first scrape: these exist at 0 before anything happened.
    assert registry.get_sample_value("ecu_rate_card_reloads_total", {"result": "failed"}) == 0
    quarantined = {"result": "quarantined"}
    assert registry.get_sample_value("ecu_flusher_events_total", quarantined) == 0
    assert registry.get_sample_value("ecu_expired_uecu_total", {"job_type": "gepa"}) == 0


def test_event_counting_keeps_labels_bounded() -> None:
    from ecu_sidecar.ledger.events import Event

    def event(etype: str, **values: Any) -> Event:
        return Event(etype, "e", "o", 1, values, {}, "", "")

    registry = CollectorRegistry()
    m = FlusherMetrics(registry)
    m.count_events([event("reserve", job="", amount=7)])  # no job type: "other"
    m.count_events([event("notify", kind="free text")])  # not a kind this sidecar knows
    m.count_events([event("commit", job="judge", committed=0, released=5, overage=0, unbilled=0)])
    assert registry.get_sample_value("ecu_reserved_uecu_total", {"job_type": "other"}) == 7
    assert registry.get_sample_value("ecu_notifications_total", {"kind": "free text"}) is None
    assert registry.get_sample_value("ecu_committed_uecu_total", {"job_type": "judge"}) == 0
    assert registry.get_sample_value("ecu_released_uecu_total", {"job_type": "judge"}) == 5


def test_metrics_orgs_is_bounded_and_validated() -> None:
    ok = Settings.from_mapping({"metrics_orgs": ("t", "acme, beta ,acme")})
    assert ok.metrics_org_list == ("acme", "beta")
    too_many = ",".join(f"org{i}" for i in range(101))
    with pytest.raises(SettingsError, match="ECU_METRICS_ORGS: at most 100"):
        Settings.from_mapping({"metrics_orgs": ("t", too_many)})
    with pytest.raises(SettingsError, match="ECU_METRICS_ORGS: 'a:b'"):
        Settings.from_mapping({"metrics_orgs": ("t", "a:b")})


def test_rpc_and_script_series_count_through_their_kept_children() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.rpc_done("Reserve", "OK", 0.002)
    m.rpc_done("Reserve", "OK", 0.002)
    m.rpc_done("Reserve", "INVALID_ARGUMENT", 0.1)
    m.store.script_done("reserve", 0.001)
    m.store.script_done("reserve", 0.003)
    m.store.script_done("commit", 0.5)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("ecu_rpc_requests_total", method="Reserve", code="OK") == 2
    assert value("ecu_rpc_requests_total", method="Reserve", code="INVALID_ARGUMENT") == 1
    assert value("ecu_rpc_duration_seconds_count", method="Reserve") == 3
    assert value("ecu_rpc_duration_seconds_sum", method="Reserve") == pytest.approx(0.104)
    assert value("ecu_redis_script_duration_seconds_count", script="reserve") == 2
    assert value("ecu_redis_script_duration_seconds_sum", script="reserve") == pytest.approx(0.004)
    assert value("ecu_redis_script_duration_seconds_count", script="commit") == 1
    assert value("ecu_redis_script_duration_seconds_bucket", script="commit", le="0.4096") == 0
    assert value("ecu_redis_script_duration_seconds_bucket", script="commit", le="0.8192") == 1


class _AbortingContext:
    """What a grpc.aio context does on abort: send the status (here: read the counter the
    caller could scrape at that moment), then raise AbortError."""

    def __init__(self, registry: CollectorRegistry, code: str) -> None:
        self.registry, self.code = registry, code
        self.seen_at_abort: float | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing: Any = ()) -> None:
        self.seen_at_abort = self.registry.get_sample_value(
            "ecu_rpc_requests_total", {"method": "Reserve", "code": self.code}
        )
        raise grpc.aio.AbortError()


@pytest.mark.parametrize("failure", ["INVALID_ARGUMENT", "INTERNAL"])
async def test_a_refused_rpc_is_counted_before_its_status_is_sent(
    sidecar: SidecarServer, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """grpc.aio's abort sends the status before it raises: a count made after it could reach
    the caller (and a scrape) later than the refusal itself."""
    from ecu_sidecar.service import QuotaService

    service = QuotaService(sidecar.engine, sidecar.metrics)
    request = pb.ReserveRequest(
        reservation_id="bad id" if failure == "INVALID_ARGUMENT" else "r-1",
        account=pb.Account(organization="org-1"),
        amount_uecu=10,
        job_type=pb.JOB_TYPE_INFERENCE,
        model="gpt-4o",
    )
    if failure == "INTERNAL":

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the engine broke")

        monkeypatch.setattr(sidecar.engine, "reserve", broken)
    context = _AbortingContext(sidecar.registry, failure)
    with pytest.raises(grpc.aio.AbortError):
        await service.Reserve(request, context)  # type: ignore[arg-type]
    assert context.seen_at_abort == 1.0
    assert (
        sidecar.registry.get_sample_value(
            "ecu_rpc_requests_total", {"method": "Reserve", "code": failure}
        )
        == 1.0
    )  # and not counted twice


def test_a_step_refused_beyond_its_job_is_counted_under_scope_job() -> None:
    """A step beyond its approved job's room is refused with scope job (docs/jobs.md): it is
    counted as such, not folded into organization; an unknown scope still is."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.rejected_insufficient("job")
    m.rejected_insufficient("galaxy")
    sample = registry.get_sample_value
    assert sample("ecu_insufficient_ecu_total", {"scope": "job"}) == 1
    assert sample("ecu_insufficient_ecu_total", {"scope": "organization"}) == 1
