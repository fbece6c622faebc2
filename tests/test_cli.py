"""The ``ecu-sidecar`` command line, run as real subprocesses against a real ``serve``.

The sidecar under test is ``python -m ecu_sidecar serve`` on the embedded store, started with
ECU_* variables exactly as an operator would (the example rate card as ECU_RATE_CARD_FILE), and
awaited on gRPC health.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import ParseDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.cli import format_ecu, parse_uecu
from ecu_sidecar.convert import job_from_pb
from ecu_sidecar.pricing import load_rate_card, preview
from tests.conftest import ADMIN_TOKEN, EXAMPLE_RATE_CARD, FAST_RECONNECT, wait_until_sync

EXAMPLE_JOB = Path(__file__).resolve().parent.parent / "examples" / "job.json"
CARD = load_rate_card(EXAMPLE_RATE_CARD)

STARTUP_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**ecu: str) -> dict[str, str]:
    """The test's environment without any ECU_* of the developer's, plus ``ecu``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    return {**env, **ecu}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecu_sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(),
    )


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def start_serve(log: Path, **ecu: str) -> Serve:
    """``serve`` in a subprocess; returns once gRPC health says SERVING (bounded polling)."""
    port = free_port()
    env = clean_env(ECU_LISTEN=f"127.0.0.1:{port}", ECU_ADMIN_TOKEN=ADMIN_TOKEN, **ecu)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ecu_sidecar", "serve"],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )
    serve = Serve(proc, port, log)
    with grpc.insecure_channel(serve.target, options=FAST_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING

        try:
            wait_until_sync(serving, "serve healthy", limit_s=STARTUP_S)
        except AssertionError as exc:
            proc.kill()
            pytest.fail(f"{exc}:\n{log.read_text()}")
    return serve


def stop_serve(serve: Serve) -> int:
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGTERM)
    try:
        return serve.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        serve.proc.kill()
        raise


@pytest.fixture(scope="module")
def sidecar_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    serve = start_serve(
        tmp_path_factory.mktemp("serve") / "serve.log",
        ECU_LOG_FORMAT="json",
        ECU_RATE_CARD_FILE=EXAMPLE_RATE_CARD,
    )
    yield serve
    stop_serve(serve)


def cli(serve: Serve, *args: str, **ecu: str) -> subprocess.CompletedProcess[str]:
    """Run a client command against ``serve`` (target and admin token from ECU_* variables)."""
    env = clean_env(ECU_LISTEN=serve.target, ECU_ADMIN_TOKEN=ADMIN_TOKEN)
    return run_cli(*args, env={**env, **ecu})


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- against a running sidecar -----------------------------------------------------------------


def test_grant_reserve_commit_balance(sidecar_proc: Serve) -> None:
    org = "cli-flow"
    out = ok(cli(sidecar_proc, "grant", org, "2.5ECU", "--grant-id", "g1", "--kind", "starter"))
    assert re.search(r"^balance\s+2500000 uECU \(2\.5 ECU\)$", out, re.M), out

    reserved = json.loads(
        ok(
            cli(
                sidecar_proc,
                "reserve",
                org,
                "1ECU",
                "--job-type",
                "inference",
                "--model",
                "gpt-4o",
                "--team",
                "t1",
                "--ttl-ms",
                "60000",
                "--json",
            )
        )
    )
    rid = reserved["reservation_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert (reserved["amount_uecu"], reserved["available_uecu"]) == (1_000_000, 1_500_000)
    assert reserved["state"] == "active" and reserved["deadline_unix_ms"] > 0

    committed = ok(cli(sidecar_proc, "commit", org, rid, "400000", "--tokens-in", "1200"))
    assert re.search(r"^committed\s+400000 uECU \(0\.4 ECU\)$", committed, re.M), committed
    assert re.search(r"^released\s+600000 uECU", committed, re.M), committed
    assert re.search(r"^available\s+2100000 uECU \(2\.1 ECU\)$", committed, re.M), committed

    balance = json.loads(ok(cli(sidecar_proc, "balance", org, "--json")))
    assert (balance["granted_uecu"], balance["committed_uecu"]) == (2_500_000, 400_000)
    assert (balance["held_uecu"], balance["available_uecu"]) == (0, 2_100_000)
    assert balance["teams"] == [
        {"id": "t1", "cap_uecu": None, "held_uecu": 0, "used_uecu": 400_000, "available_uecu": 0}
    ]
    human = ok(cli(sidecar_proc, "balance", org))
    assert re.search(r"^available\s+2100000 uECU \(2\.1 ECU\)$", human, re.M), human


def test_hold_release_extend_and_caps(sidecar_proc: Serve) -> None:
    org = "cli-more"
    ok(cli(sidecar_proc, "grant", org, "1000", "--grant-id", "g1"))
    ok(cli(sidecar_proc, "reserve", org, "300uECU", "--job-type", "gepa", "--id", "r1"))
    extended = json.loads(
        ok(cli(sidecar_proc, "extend", org, "r1", "--sequence", "1", "--ttl-ms", "90000", "--json"))
    )
    assert extended["reservation_id"] == "r1" and not extended["replayed"]
    released = json.loads(ok(cli(sidecar_proc, "release", org, "r1", "--json")))
    assert (released["released_uecu"], released["state"]) == (300, "released")
    assert released["available_uecu"] == 1000

    capped = json.loads(ok(cli(sidecar_proc, "set-cap", org, "project", "p1", "250", "--json")))
    assert (capped["cap_uecu"], capped["available_uecu"]) == (250, 250)
    refused = cli(sidecar_proc, "reserve", org, "251", "--job-type", "gepa", "--project", "p1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: RESOURCE_EXHAUSTED INSUFFICIENT_ECU: "), refused.stderr
    cleared = json.loads(
        ok(cli(sidecar_proc, "set-cap", org, "project", "p1", "--clear", "--json"))
    )
    assert cleared["cap_uecu"] is None
    ok(cli(sidecar_proc, "reserve", org, "251", "--job-type", "gepa", "--project", "p1"))


def test_client_errors_exit_1_with_code_and_reason(sidecar_proc: Serve) -> None:
    missing = cli(sidecar_proc, "release", "cli-errors", "nope")
    assert missing.returncode == 1 and missing.stdout == ""
    assert re.fullmatch(r"error: NOT_FOUND ACCOUNT_NOT_FOUND: .+\n", missing.stderr), missing.stderr

    no_token = cli(sidecar_proc, "grant", "cli-errors", "5", "--grant-id", "g", ECU_ADMIN_TOKEN="")
    assert no_token.returncode == 1
    assert no_token.stderr.startswith("error: UNAUTHENTICATED UNAUTHENTICATED: "), no_token.stderr
    wrong = cli(sidecar_proc, "grant", "cli-errors", "5", "--grant-id", "g", ECU_ADMIN_TOKEN="x")
    assert wrong.stderr.startswith("error: PERMISSION_DENIED PERMISSION_DENIED: "), wrong.stderr

    bad_model = cli(sidecar_proc, "reserve", "cli-errors", "5", "--job-type", "judge")
    assert bad_model.returncode == 1
    assert bad_model.stderr.startswith("error: INVALID_ARGUMENT INVALID_ARGUMENT: model"), (
        bad_model.stderr
    )


def test_the_admin_token_comes_from_a_file_never_the_command_line(
    sidecar_proc: Serve, tmp_path: Path
) -> None:
    """A token on argv is readable by every user (ps, /proc/<pid>/cmdline): refused before
    anything is sent. --admin-token-file (or '-' for stdin) and ECU_ADMIN_TOKEN are the ways."""
    on_argv = cli(
        sidecar_proc, "grant", "cli-token", "5", "--grant-id", "g0", "--admin-token", "anything"
    )
    assert on_argv.returncode == 2 and on_argv.stdout == ""
    assert "visible to every user" in on_argv.stderr and "anything" not in on_argv.stderr
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    granted = cli(
        sidecar_proc,
        "grant",
        "cli-token",
        "5",
        "--grant-id",
        "g1",
        "--admin-token-file",
        str(token_file),
        ECU_ADMIN_TOKEN="",
    )
    ok(granted)
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("not-the-token")
    refused = cli(
        sidecar_proc,
        "grant",
        "cli-token",
        "5",
        "--grant-id",
        "g2",
        "--admin-token-file",
        str(wrong_file),
    )
    assert refused.stderr.startswith("error: PERMISSION_DENIED"), refused.stderr
    missing = cli(
        sidecar_proc,
        "grant",
        "cli-token",
        "5",
        "--grant-id",
        "g3",
        "--admin-token-file",
        str(tmp_path / "absent"),
    )
    assert missing.returncode == 2 and "--admin-token-file: cannot read" in missing.stderr
    balance = json.loads(ok(cli(sidecar_proc, "balance", "cli-token", "--json")))
    assert balance["granted_uecu"] == 5


def test_target_defaults_to_ecu_listen(sidecar_proc: Serve) -> None:
    ok(cli(sidecar_proc, "grant", "cli-target", "7", "--grant-id", "g"))
    listen = f"localhost:{sidecar_proc.port}"
    out = json.loads(ok(cli(sidecar_proc, "balance", "cli-target", "--json", ECU_LISTEN=listen)))
    assert out["available_uecu"] == 7
    # A wildcard address without TLS is refused before anything is sent.
    refused = cli(sidecar_proc, "balance", "cli-target", ECU_LISTEN=f"0.0.0.0:{sidecar_proc.port}")
    assert refused.returncode == 2 and "ECU_LISTEN" in refused.stderr and "TLS" in refused.stderr


# -- pricing: preview, rates, auto-top-up -------------------------------------------------------


def example_total(org: str) -> int:
    job = ParseDict(json.loads(EXAMPLE_JOB.read_text()), pb.JobSpec())
    return preview(CARD, org, job_from_pb(job)).total_uecu


def test_preview_prints_the_breakdown_and_the_total(sidecar_proc: Serve) -> None:
    org = "cli-preview"
    ok(cli(sidecar_proc, "grant", org, "20ECU", "--grant-id", "g1"))
    total = example_total(org)
    out = ok(cli(sidecar_proc, "preview", str(EXAMPLE_JOB), "--org", org, "--team", "t1"))
    table, _, summary = out.partition("\n\n")
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["description", "quantity", "unit"]
    assert header.rstrip().endswith("subtotal (uECU)") and "discount" not in header
    # Aligned: the right-aligned subtotal column ends every line at the same place.
    assert len({len(line) for line in [header, *rows]}) == 1, table
    subtotals = [int(row.rsplit(None, 1)[1]) for row in rows]
    assert sum(subtotals) == total and len(rows) >= 4 * 3
    assert any(" / 1M tokens " in row for row in rows) and any(" / call " in row for row in rows)
    assert re.search(rf"^total \(worst case\)\s+{total} uECU \(", summary, re.M), summary
    assert re.search(rf"^rate card\s+{re.escape(CARD.version)}$", summary, re.M), summary
    assert re.search(r"^available\s+20000000 uECU \(20 ECU\)$", summary, re.M), summary
    assert re.search(rf"^covered\s+yes \(available after: {20_000_000 - total} uECU", summary, re.M)
    # Nothing was held.
    balance = json.loads(ok(cli(sidecar_proc, "balance", org, "--json")))
    assert (balance["held_uecu"], balance["available_uecu"]) == (0, 20_000_000)


def test_preview_json_discounts_and_not_covered(sidecar_proc: Serve) -> None:
    # acme has a volume discount in the example card, and no account on this sidecar.
    assert CARD.organizations["acme"].discount_percent
    data = json.loads(ok(cli(sidecar_proc, "preview", str(EXAMPLE_JOB), "--org", "acme", "--json")))
    total = example_total("acme")
    assert (data["total_uecu"], data["rate_card_version"]) == (total, CARD.version)
    assert (data["covered"], data["available_uecu"], data["available_after_uecu"]) == (
        False,
        0,
        -total,
    )
    assert sum(line["subtotal_uecu"] for line in data["lines"]) == total
    assert {line["job_type"] for line in data["lines"]} == {
        "inference",
        "judge",
        "gepa",
        "trace_eval",
    }
    assert any(line["byok"] and line["subtotal_uecu"] == 0 for line in data["lines"])
    human = ok(cli(sidecar_proc, "preview", str(EXAMPLE_JOB), "--org", "acme"))
    assert "discount (uECU)" in human.splitlines()[0]
    assert re.search(r"^covered\s+NO \(available after: -", human, re.M), human


def test_preview_reads_stdin_and_refuses_bad_files(sidecar_proc: Serve, tmp_path: Path) -> None:
    job = '{"items": [{"judge": {"judgeModel": "gpt-4o-mini", "promptTokensPerCall": 10}}]}'
    env = clean_env(ECU_LISTEN=sidecar_proc.target)
    piped = subprocess.run(
        [sys.executable, "-m", "ecu_sidecar", "preview", "-", "--org", "x", "--json"],
        input=job,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["total_uecu"] > 0

    missing = cli(sidecar_proc, "preview", str(tmp_path / "nope.json"), "--org", "x")
    assert missing.returncode == 2 and "nope.json: cannot read the job file" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"items": [\n  {"inference": }\n]}')
    result = cli(sidecar_proc, "preview", str(broken), "--org", "x")
    assert result.returncode == 2
    assert re.match(r"error: .*broken\.json: is not valid JSON: .* \(line 2, column", result.stderr)
    typo = tmp_path / "typo.json"
    typo.write_text('{"items": [{"inference": {"modle": "gpt-4o"}}]}')
    result = cli(sidecar_proc, "preview", str(typo), "--org", "x")
    assert result.returncode == 2 and "is not a job spec" in result.stderr
    assert "modle" in result.stderr
    # The sidecar's own refusals: exit 1 naming the field; an unknown model is never priced.
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"items": [{"inference": {"model": "gpt-5", "promptTokens": 9}}]}')
    result = cli(sidecar_proc, "preview", str(unknown), "--org", "x")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(
        "error: INVALID_ARGUMENT INVALID_ARGUMENT: job.items[0].inference.model: unknown model"
    ), result.stderr


def test_preview_yaml(sidecar_proc: Serve, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    # Flow-style YAML (JSON is YAML): the test's stand-in parser below can read it too.
    job.write_text(EXAMPLE_JOB.read_text())
    try:
        import yaml  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        result = cli(sidecar_proc, "preview", str(job), "--org", "x")
        assert result.returncode == 2
        assert "job.yaml: reading YAML needs PyYAML" in result.stderr, result.stderr
        assert "give the job as JSON" in result.stderr
    # With a yaml module importable, the file is read through yaml.safe_load.
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "yaml.py").write_text(
        "import json\nYAMLError = ValueError\ndef safe_load(text):\n    return json.loads(text)\n"
    )
    result = cli(sidecar_proc, "preview", str(job), "--org", "x", "--json", PYTHONPATH=str(stub))
    assert json.loads(ok(result))["total_uecu"] == example_total("x")


def test_rates_shows_the_loaded_card(sidecar_proc: Serve) -> None:
    data = json.loads(ok(cli(sidecar_proc, "rates", "--json")))
    assert (data["version"], data["versions"]) == (CARD.version, [CARD.version])
    assert data["fees"] == {
        "engine_call_uecu": CARD.fees.engine_call_uecu,
        "judge_call_uecu": CARD.fees.judge_call_uecu,
        "gepa_iteration_uecu": CARD.fees.gepa_iteration_uecu,
        "trace_uecu": CARD.fees.trace_uecu,
        "byok_engine_call_uecu": CARD.fees.engine_call_uecu,  # the card sets none
    }
    assert {m["name"]: m["input_uecu_per_mtok"] for m in data["models"]} == {
        name: m.input_uecu_per_mtok for name, m in CARD.models.items()
    }
    assert data["organizations_with_terms"] == sorted(CARD.organizations)
    human = ok(cli(sidecar_proc, "rates"))
    assert re.search(rf"^rate card\s+{re.escape(CARD.version)}$", human, re.M), human
    assert re.search(rf"^engine call\s+{CARD.fees.engine_call_uecu} uECU", human, re.M), human
    models = human.split("\n\n", 1)[1].splitlines()
    assert models[0].startswith("model ")
    gpt4o = CARD.models["gpt-4o"]
    row = next(line for line in models if line.startswith("gpt-4o "))
    assert row.split() == [
        "gpt-4o",
        str(gpt4o.input_uecu_per_mtok),
        str(gpt4o.output_uecu_per_mtok),
        gpt4o.encoding,
        str(gpt4o.context_window),
        str(gpt4o.max_output_tokens),
        f"{gpt4o.estimate_factor_percent}%",
    ]
    assert len(models) == 1 + len(CARD.models)


def test_auto_top_up_on_and_off(sidecar_proc: Serve) -> None:
    org = "cli-topup"
    ok(cli(sidecar_proc, "grant", org, "10ECU", "--grant-id", "g1"))
    out = ok(cli(sidecar_proc, "auto-top-up", org, "2ECU", "5000000"))
    assert re.search(r"^below\s+2000000 uECU \(2 ECU\)$", out, re.M), out
    balance = json.loads(ok(cli(sidecar_proc, "balance", org, "--json")))
    assert (balance["auto_topup_threshold_uecu"], balance["auto_topup_amount_uecu"]) == (
        2_000_000,
        5_000_000,
    )
    off = json.loads(ok(cli(sidecar_proc, "auto-top-up", org, "--off", "--json")))
    assert off == {"organization": org, "enabled": False}
    balance = json.loads(ok(cli(sidecar_proc, "balance", org, "--json")))
    assert balance["auto_topup_threshold_uecu"] is None

    for args in ((org,), (org, "1ECU"), (org, "1ECU", "2ECU", "--off")):
        result = cli(sidecar_proc, "auto-top-up", *args)
        assert result.returncode == 2 and "THRESHOLD AMOUNT" in result.stderr, args
    denied = cli(sidecar_proc, "auto-top-up", org, "--off", ECU_ADMIN_TOKEN="")
    assert denied.returncode == 1
    assert denied.stderr.startswith("error: UNAUTHENTICATED "), denied.stderr


def test_unreachable_sidecar_exits_1_promptly() -> None:
    started = time.monotonic()
    result = run_cli("balance", "acme", "--target", f"127.0.0.1:{free_port()}", "--timeout", "0.3")
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE "), result.stderr
    assert time.monotonic() - started < 15


def test_amounts_that_are_not_whole_uecu_are_usage_errors() -> None:
    for amount in ("0.0000001ECU", "1.5", "-3", "2.5 eth", "ECU"):
        result = run_cli("reserve", "acme", amount, "--job-type", "gepa", "--target", "x:1")
        assert result.returncode == 2, amount
        assert "amount" in result.stderr, result.stderr


def test_parse_and_format_amounts() -> None:
    assert parse_uecu("2500000") == parse_uecu("2500000uECU") == parse_uecu("2.5ECU") == 2_500_000
    assert parse_uecu("0.000001ECU") == 1 and parse_uecu("12 ecu") == 12_000_000
    assert parse_uecu("123456789.123456ECU") == 123_456_789_123_456
    for bad in ("1.0000001ECU", "1e3", "1.5", "1,5ECU", "", "NaNECU", "InfinityECU"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_uecu(bad)
    assert [format_ecu(n) for n in (0, 1, 2_500_000, 10_000_000, -1_500_000)] == [
        "0",
        "0.000001",
        "2.5",
        "10",
        "-1.5",
    ]


# -- configuration and the serve process -------------------------------------------------------


def test_check_config_prints_masked_settings() -> None:
    result = run_cli(
        "check-config",
        env=clean_env(
            ECU_ADMIN_TOKEN="s3cret-token",
            ECU_REDIS_URL="redis://app:hunter2@redis:6379/0",
            ECU_REDIS_TIMEOUT_MS="125",
        ),
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert lines["ECU_REDIS_TIMEOUT_MS"] == "125"
    assert lines["ECU_ADMIN_TOKEN"] == "(set)"
    assert lines["ECU_REDIS_URL"] == "redis://app:***@redis:6379/0"
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout


def test_check_config_bad_value_exits_2_naming_the_variable() -> None:
    result = run_cli("check-config", env=clean_env(ECU_REDIS_TIMEOUT_MS="abc"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: ECU_REDIS_TIMEOUT_MS: expected an integer, got 'abc'\n"


def test_serve_with_bad_settings_exits_2() -> None:
    result = run_cli("serve", env=clean_env(ECU_LOG_FORMAT="xml"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ECU_LOG_FORMAT: must be one of text, json"), (
        result.stderr
    )


def test_serve_runs_on_the_standard_loop_when_asked(tmp_path: Path) -> None:
    serve = start_serve(tmp_path / "serve.log", ECU_EVENT_LOOP="asyncio")
    try:
        first = serve.log_lines()[0]
    finally:
        code = stop_serve(serve)
    assert f"port {serve.port}, asyncio)" in first
    assert code == 0, serve.log.read_text()


def test_serve_logs_json_says_embedded_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    serve = start_serve(tmp_path / "serve.log", ECU_LOG_FORMAT="json")
    try:
        first = json.loads(serve.log_lines()[0])
    finally:
        code = stop_serve(serve)
    assert set(first) == {"ts", "level", "logger", "msg"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert (first["level"], first["logger"]) == ("WARNING", "ecu_sidecar.server")
    assert "EMBEDDED" in first["msg"] and f"port {serve.port}, uvloop)" in first["msg"]
    assert code == 0, serve.log.read_text()
    records = [json.loads(line) for line in serve.log_lines()]
    assert records[-1]["msg"] == "ecu-sidecar stopped"
    assert any("signal received" in r["msg"] for r in records)
