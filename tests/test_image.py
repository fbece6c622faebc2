"""The image's build inputs and its health command: dependencies installed exactly as locked
(requirements/image.txt: every runtime dependency pinned with hashes, nothing of the embedded
store), no pip left in the runtime image, and a HEALTHCHECK that runs `ecu-sidecar health`,
which answers for a real sidecar and a real flusher."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from ecu_sidecar.server import SidecarServer
from tests.conftest import REDIS_URL, make_settings, require_redis, wait_until
from tests.test_flusher_process import flush_env, flushing

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "image.txt"
DOCKERFILE = ROOT / "Dockerfile"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def locked() -> dict[str, str]:
    """name -> pinned version of every package of the lock, each with at least one hash."""
    text = LOCK.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", text, re.MULTILINE))
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        if "==" in block.split("\n", 1)[0]:
            assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]}"
    return {k.lower().replace("_", "-"): v for k, v in pins.items()}


def test_the_lock_pins_every_runtime_dependency_and_not_the_embedded_store() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for requirement in project["dependencies"]:
        assert _name(requirement) in pins, f"{requirement} is not in {LOCK.name}: run make lock"
    embedded = {_name(r) for r in project["optional-dependencies"]["embedded"]}
    assert embedded and not embedded & set(pins), "the image must not carry the embedded store"
    assert "fakeredis" not in LOCK.read_text()


def test_the_dockerfile_installs_the_lock_drops_pip_and_checks_health() -> None:
    text = DOCKERFILE.read_text()
    assert "--require-hashes" in text and "requirements/image.txt" in text
    assert re.search(r"pip install --no-deps \.", text)
    assert "pip uninstall --yes pip setuptools" in text
    health = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[[^\n]*\])$", text, re.MULTILINE)
    assert health, "no HEALTHCHECK"
    assert json.loads(health.group(1)) == ["ecu-sidecar", "health"]


async def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`ecu-sidecar health` in its own process (off the event loop the server runs on)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ecu_sidecar", "health", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_health_answers_for_a_sidecar_then_fails_once_it_stopped() -> None:
    settings = make_settings("embedded", health_listen="127.0.0.1:0")
    server = SidecarServer(settings)
    await server.start()
    env = {"ECU_LISTEN": f"127.0.0.1:{server.port}"}
    try:
        via_health_port = await health(
            {**env, "ECU_HEALTH_LISTEN": f"127.0.0.1:{server.health_port}"}
        )
        assert via_health_port.returncode == 0, via_health_port.stdout + via_health_port.stderr
        assert via_health_port.stdout.strip().endswith("SERVING")
        via_listen = await health(env, "--service", "ecu_sidecar.api.v1.Quota")
        assert via_listen.returncode == 0 and "SERVING" in via_listen.stdout
        unknown = await health(env, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
    finally:
        await server.stop(grace=0)
    gone = await health(env, "--timeout", "1")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout


async def test_health_flusher_reads_livez(tmp_path: Path) -> None:
    require_redis()
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = flush_env(REDIS_URL, "t" + os.urandom(6).hex(), ledger)
    migrate = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ecu_sidecar", "migrate"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    with flushing(env) as proc:
        listen = {"ECU_METRICS_LISTEN": f"127.0.0.1:{proc.metrics_port}"}

        async def alive() -> bool:
            return (await health(listen, "--flusher")).returncode == 0

        await wait_until(alive, "/livez 200")
        assert "/livez: 200" in (await health(listen, "--flusher")).stdout
    stopped = await health(listen, "--flusher", "--timeout", "1")
    assert stopped.returncode == 1
    no_metrics = await health({}, "--flusher")
    assert no_metrics.returncode == 2 and "ECU_METRICS_LISTEN" in no_metrics.stderr


def test_without_the_embedded_extra_serve_asks_for_a_redis_url() -> None:
    """The image leaves the embedded store out: `serve` without ECU_REDIS_URL then says what
    to do (exit 2, one line), instead of a traceback about a missing module."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    blocked = (
        "import sys; sys.modules['fakeredis'] = None; "
        "from ecu_sidecar.cli import main; sys.exit(main(['serve']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked], env=clean, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ECU_REDIS_URL is not set and the embedded store is not installed" in proc.stderr
