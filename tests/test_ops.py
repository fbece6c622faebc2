"""Operations artifacts: alert rules, dashboard, Helm chart files, Dockerfile and its entrypoint.

The heavy checks run as make targets in CI (`make promtool-check helm-check`); these tests keep
the artifacts consistent with the code: every metric a rule or panel queries is one the code
registers, every alert has a unit test and a runbook section, the chart's copies are identical,
and the image's entrypoint command works (run here in the venv: no container engine exists on
the project machines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from ecu_sidecar import __version__
from ecu_sidecar.metrics import FlusherMetrics, Metrics, process_metrics
from ecu_sidecar.settings import Settings
from tests.conftest import FAST_RECONNECT, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "ecu-sidecar.rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "ecu-sidecar.rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "ecu-sidecar.json"
CHART = ROOT / "helm" / "ecu-sidecar"
OPERATIONS = ROOT / "docs" / "operations.md"
DOCKERFILE = ROOT / "Dockerfile"
METRIC = re.compile(r"\becu_[a-z0-9_]+\b")


def registered() -> tuple[set[str], set[str]]:
    """(metric family names, sample names) of everything the sidecar and flusher register."""
    registry = CollectorRegistry()
    Metrics(registry)
    process_metrics(registry, "sidecar", "embedded")
    flusher = FlusherMetrics(registry)
    flusher.organization("acme", 1, 0)
    families, samples = set(), set()
    for family in registry.collect():
        families.add(family.name)
        samples |= {s.name for s in family.samples}
        if family.type == "counter":  # labelled counters have no sample before first use
            samples.add(f"{family.name}_total")
        elif family.type == "gauge":
            samples.add(family.name)
        elif family.type == "histogram":
            samples |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
    return families, samples


def alerts() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_rules_and_dashboard_query_only_metrics_the_code_registers() -> None:
    _, samples = registered()
    used = set(METRIC.findall(RULES.read_text())) | set(METRIC.findall(RULE_TESTS.read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used |= {m for e in exprs for m in METRIC.findall(e)}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            used |= set(METRIC.findall(var["definition"]))
    assert used, "no metric found in the rules or the dashboard"
    assert used <= samples, f"not registered by Metrics/FlusherMetrics: {sorted(used - samples)}"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "ecu-sidecar"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # Every alert's signal is on the dashboard.
    text = DASHBOARD.read_text()
    for name in ("EcuStoreUnavailable", "EcuFlusherLag", "EcuReconcileDrift"):
        assert name in text


def test_every_metric_family_is_documented() -> None:
    families, _ = registered()
    doc = OPERATIONS.read_text()
    missing = sorted(f for f in families if f"`{f}" not in doc)
    assert not missing, f"docs/operations.md does not list {missing}"


def test_every_alert_is_unit_tested_and_has_a_runbook_section() -> None:
    names = alerts()
    assert len(names) >= 10 and len(names) == len(set(names))
    tests = RULE_TESTS.read_text()
    doc = OPERATIONS.read_text()
    for name in names:
        firing = re.search(
            rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests, re.MULTILINE
        )
        assert firing, f"{name} is never shown firing in {RULE_TESTS.name}"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests), (
            f"{name} is never shown quiet in {RULE_TESTS.name}"
        )
        assert f"### {name}" in doc, f"docs/operations.md has no section for {name}"
        assert f"runbook: docs/operations.md#{name.lower()}" in RULES.read_text()


def test_the_chart_carries_identical_copies_of_rules_and_dashboard() -> None:
    for source in (RULES, DASHBOARD):
        copy = CHART / "files" / source.name
        assert copy.read_bytes() == source.read_bytes(), f"{copy}: run make ops-sync"


def test_chart_metadata_and_schema() -> None:
    chart = (CHART / "Chart.yaml").read_text()
    assert re.search(rf'^appVersion: "{re.escape(__version__)}"$', chart, re.MULTILINE)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert schema["properties"]["metrics"]["properties"]["orgs"]["maxItems"] == 100
    scenarios = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
    assert scenarios == [
        "bitnami-redis-values.yaml",
        "embedded-dev-values.yaml",
        "redis-cluster-tls-values.yaml",
        "standalone-values.yaml",
    ]
    templates = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in ("sidecarContainer", "sidecarVolumes", "sidecarPodLabels", "sidecarPodAnnotations"):
        assert f'define "ecu-sidecar.{name}"' in templates
    for crd in ("servicemonitor", "podmonitor", "prometheusrule"):
        text = (CHART / "templates" / f"{crd}.yaml").read_text()
        assert '.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"' in text


def chart_config_settings() -> dict[str, str]:
    """{values key under `config`: the ECU_* variable the chart renders it into}."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    pairs = re.findall(r"- name: (ECU_\w+)\n  value: \{\{ \.Values\.config\.(\w+) ", helpers)
    return {key: var for var, key in pairs}


def test_chart_config_defaults_and_bounds_are_the_settings() -> None:
    block = re.search(r"^config:\n((?:  .*\n|\n)+)", (CHART / "values.yaml").read_text(), re.M)
    assert block
    defaults = dict(re.findall(r"^  (\w+): (\S+)$", block.group(1), re.MULTILINE))
    schema = json.loads((CHART / "values.schema.json").read_text())
    bounds = schema["properties"]["config"]["properties"]
    fields = {"ECU_" + f.name.upper(): f for f in dataclasses.fields(Settings)}
    exposed = chart_config_settings()
    assert {"jobTtlMs", "jobMaxTtlMs", "defaultTtlMs"} <= exposed.keys()
    for key, var in exposed.items():
        field = fields[var]
        assert float(defaults[key]) == field.default, f"config.{key}: default is not {var}'s"
        lo_hi = (bounds[key]["minimum"], bounds[key]["maximum"])
        assert lo_hi == (field.metadata["lo"], field.metadata["hi"]), f"config.{key}: bounds"


# -- the image -------------------------------------------------------------------------------


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_is_multi_stage_slim_pinned_and_non_root() -> None:
    text = dockerfile()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base, "the base image is an ARG with a default"
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base.group(1))
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert [s for _, s in stages] == ["build", "runtime"]
    assert all(image == "${PYTHON_IMAGE}" for image, _ in stages)
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r"^COPY --from=build /opt/ecu /opt/ecu$", text, re.MULTILINE)
    values = (CHART / "values.yaml").read_text()
    assert "repository: ghcr.io/ecu-platform/ecu-sidecar" in values
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!ecu_sidecar/" in ignored


def entrypoint() -> list[str]:
    text = dockerfile()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))
    return entry + cmd


def image_env() -> dict[str, str]:
    """The ECU_* defaults the image sets (ENV lines of the runtime stage)."""
    runtime = dockerfile().split("AS runtime", 1)[1]
    env_block = re.search(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.MULTILINE).group(1)
    pairs = shlex.split(env_block.replace("\\\n", " "))
    return dict(p.split("=", 1) for p in pairs if p.startswith("ECU_"))


def venv_command(argv: list[str]) -> list[str]:
    """The image's command, run with this venv's console script."""
    binary = Path(sys.executable).parent / argv[0]
    assert binary.exists(), f"{argv[0]} is not installed in the venv"
    return [str(binary), *argv[1:]]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env.update(image_env())
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_image_defaults_pass_check_config() -> None:
    assert image_env() == {"ECU_LISTEN": "127.0.0.1:50051", "ECU_LOG_FORMAT": "json"}
    proc = subprocess.run(
        venv_command(["ecu-sidecar", "check-config"]),
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ECU_LISTEN=127.0.0.1:50051" in proc.stdout


def test_image_entrypoint_serves_health_and_metrics_then_stops_on_sigterm() -> None:
    assert entrypoint() == ["ecu-sidecar", "serve"]
    health, metrics = free_port(), free_port()
    env = base_env(
        ECU_LISTEN=f"127.0.0.1:{free_port()}",
        ECU_HEALTH_LISTEN=f"127.0.0.1:{health}",
        ECU_METRICS_LISTEN=f"127.0.0.1:{metrics}",
    )
    proc = subprocess.Popen(
        venv_command(entrypoint()), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health}", options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def answered() -> int | None:
                assert proc.poll() is None, proc.communicate()[1].decode()
                try:
                    return stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                except grpc.RpcError:
                    return None

            status = wait_until_sync(answered, "the entrypoint's health endpoint")
        assert status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            assert b'ecu_build_info{component="sidecar",version="' in resp.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in err.decode().splitlines()]  # ECU_LOG_FORMAT=json
    assert any("ecu-sidecar stopped" in ln["msg"] for ln in lines)


@pytest.mark.parametrize("command", [["migrate"], ["flush", "--once"]])
def test_image_ledger_commands_run_in_the_venv(command: list[str], tmp_path: Path) -> None:
    """The flusher Deployment runs `migrate` (init container) then `flush`, same image."""
    env = base_env(ECU_LEDGER_URL=f"sqlite://{tmp_path}/ledger.db")
    if command[0] == "flush":
        migrated = subprocess.run(
            venv_command(["ecu-sidecar", "migrate"]), env=env, capture_output=True, timeout=60
        )
        assert migrated.returncode == 0, migrated.stderr
    proc = subprocess.run(
        venv_command(["ecu-sidecar", *command]),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
