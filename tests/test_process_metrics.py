"""What every process exports whatever it runs: ecu_build_info (version, component),
ecu_store_info (the Redis it uses, never its credentials) and the process_* family. The alert
rules carry ``store`` from ecu_store_info and tell sidecars from flushers by ``component``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ecu_sidecar.server import SidecarServer
from tests.conftest import REDIS_URL, make_settings, require_redis
from tests.test_flusher_process import flush_env, flushing


def samples(text: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def test_the_store_target_never_carries_credentials() -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex[:6]
    cases = {
        f"redis://app:{secret}@10.0.0.7:6379/2?password={secret}": "redis://10.0.0.7:6379/2",
        f"rediss://:{secret}@redis.evals.svc:6380/0": "rediss://redis.evals.svc:6380/0",
        f"redis+sentinel://u:{secret}@s1:26379,s2:26379/main/1": (
            "redis+sentinel://s1:26379,s2:26379/main/1"
        ),
    }
    for url, target in cases.items():
        assert make_settings("embedded", redis_url=url).store_target == target
    cluster = make_settings("embedded", redis_url=f"redis://:{secret}@c1:7000", redis_cluster="1")
    assert cluster.store_target == "redis://c1:7000 (cluster)"
    assert make_settings("embedded").store_target == "embedded"


def test_a_sidecar_says_it_is_one_and_which_redis_it_uses() -> None:
    settings = make_settings("embedded", metrics_listen="127.0.0.1:0")
    server = SidecarServer(settings, registry=CollectorRegistry())
    found = samples(generate_latest(server.registry).decode())
    assert [s["component"] for s in found["ecu_build_info"]] == ["sidecar"]
    assert found["ecu_store_info"] == [{"store": "embedded"}]
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert name in found, f"{name} not exported"


@pytest.mark.asyncio
async def test_a_flusher_process_says_it_is_one(tmp_path: Path) -> None:
    require_redis()
    prefix = "t" + uuid.uuid4().hex[:12]
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = flush_env(REDIS_URL, prefix, ledger)
    migrate = [sys.executable, "-m", "ecu_sidecar", "migrate"]
    await asyncio.to_thread(
        subprocess.run, migrate, env=env, check=True, capture_output=True, timeout=60
    )
    with flushing(env) as proc:
        await proc.until(
            "ecu_build_info on /metrics",
            lambda: proc.metric("ecu_store_info", {"store": REDIS_URL}) == 1.0,
        )
        assert proc.metric("ecu_build_info", {"version": _version(), "component": "flusher"}) == 1
        assert (proc.metric("process_cpu_seconds_total") or 0) > 0
        assert (proc.metric("process_open_fds") or 0) > 0


def _version() -> str:
    from ecu_sidecar import __version__

    return __version__
