"""Logs: one DEBUG line per state change, request ids next to reservation ids, and no secret
(admin token, Redis or database password) in any log line, metric or error message."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.logs import (
    JsonFormatter,
    RedactingFormatter,
    TextFormatter,
    configure,
    secrets_of,
)
from ecu_sidecar.server import SidecarServer
from tests.conftest import REQUIRE_SERVICES, make_settings, wait_until_sync

ADMIN_TOKEN = "adm1n-T0KEN-never-logged"
PASSWORD = "r3dis-PASS-never-logged"
WRONG_TOKEN = "wr0ng-T0KEN-never-logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_with_password() -> Iterator[int]:
    """A throw-away redis-server that requires PASSWORD."""
    server = shutil.which("redis-server")
    if server is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server binary not found and ECU_REQUIRE_SERVICES is set")
        pytest.skip("redis-server binary not found")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until_sync(accepting, f"the private redis-server on port {port} accepting")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


class Captured:
    """Every ecu_sidecar log record at DEBUG, formatted as the CLI would (JSON, redacted)."""

    def __init__(self, secrets: list[str]) -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(RedactingFormatter(JsonFormatter(), secrets))
        self.logger = logging.getLogger("ecu_sidecar")
        self.level = self.logger.level

    def __enter__(self) -> Captured:
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


async def test_state_changes_logged_with_request_ids_and_no_secret_anywhere(
    redis_with_password: int,
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_with_password}/0"
    settings = make_settings(
        "redis", redis_url=url, admin_token=ADMIN_TOKEN, metrics_listen="127.0.0.1:0"
    )
    assert set(secrets_of(settings)) == {ADMIN_TOKEN, PASSWORD}
    wrong = make_settings("redis", redis_url=url.replace(PASSWORD, "not-the-password"))
    errors: list[str] = []
    with Captured(secrets_of(settings)) as logs:
        server = SidecarServer(settings, registry=CollectorRegistry())
        broken = SidecarServer(wrong, registry=CollectorRegistry())
        await server.start()
        await broken.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = quota_pb2_grpc.QuotaStub(channel)
                admin = (("authorization", f"Bearer {ADMIN_TOKEN}"), ("x-request-id", "req-g"))
                await stub.Grant(
                    pb.GrantRequest(
                        organization="acme",
                        grant_id="g1",
                        amount_uecu=5_000_000,
                        kind=pb.GRANT_KIND_TOP_UP,
                    ),
                    metadata=admin,
                )
                account = pb.Account(organization="acme", team="research")
                await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="step-1",
                        account=account,
                        amount_uecu=2_000_000,
                        job_type=pb.JOB_TYPE_GEPA,
                    ),
                    metadata=(("x-request-id", "req-123"),),
                )
                await stub.Commit(
                    pb.CommitRequest(
                        organization="acme", reservation_id="step-1", actual_uecu=1_000_000
                    ),
                    metadata=(("x-request-id", "req-124"),),
                )
                for metadata in (
                    (("authorization", f"Bearer {WRONG_TOKEN}"),),
                    (("x-request-id", "req-big"),),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        if metadata[0][0] == "authorization":
                            await stub.SetCap(
                                pb.SetCapRequest(
                                    organization="acme", scope=pb.CAP_SCOPE_TEAM, id="t", cap_uecu=1
                                ),
                                metadata=metadata,
                            )
                        else:
                            await stub.Reserve(
                                pb.ReserveRequest(
                                    reservation_id="too-big",
                                    account=account,
                                    amount_uecu=50_000_000,
                                    job_type=pb.JOB_TYPE_GEPA,
                                ),
                                metadata=metadata,
                            )
                    errors.append(str(exc.value.details()) + str(exc.value.trailing_metadata()))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{broken.port}") as channel:
                stub = quota_pb2_grpc.QuotaStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))
                assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
                errors.append(str(exc.value.details()) + str(exc.value.trailing_metadata()))
            metrics = await asyncio.to_thread(scrape, server.metrics_port)
        finally:
            await server.stop(grace=0)
            await broken.stop(grace=0)

    lines = logs.lines()
    reserve = [ln for ln in lines if ln["msg"] == "Reserve ok"]
    assert len(reserve) == 1
    assert reserve[0]["request_id"] == "req-123"
    assert reserve[0]["reservation_id"] == "step-1"
    assert reserve[0]["organization"] == "acme"
    assert reserve[0]["amount_uecu"] == 2_000_000
    commit = [ln for ln in lines if ln["msg"] == "Commit ok"]
    assert [(c["request_id"], c["reservation_id"]) for c in commit] == [("req-124", "step-1")]
    assert commit[0]["committed_uecu"] == 1_000_000 and commit[0]["released_uecu"] == 1_000_000
    assert any(ln["msg"] == "Grant ok" and ln["grant_id"] == "g1" for ln in lines)
    refused = [ln for ln in lines if ln["msg"].startswith("Reserve refused: INSUFFICIENT_ECU")]
    assert [(r["request_id"], r["reservation_id"]) for r in refused] == [("req-big", "too-big")]
    assert any(ln["msg"].startswith("SetCap refused: PERMISSION_DENIED") for ln in lines)
    # One line per state change: the three that happened, no more.
    assert sorted(ln["msg"] for ln in lines if ln["msg"].endswith(" ok")) == [
        "Commit ok",
        "Grant ok",
        "Reserve ok",
    ]
    for where, text in (("logs", logs.text), ("metrics", metrics), ("errors", " ".join(errors))):
        for secret in (ADMIN_TOKEN, PASSWORD, WRONG_TOKEN):
            assert secret not in text, f"{secret} leaked into {where}"


def test_check_config_masks_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env.update(
        ECU_ADMIN_TOKEN=ADMIN_TOKEN,
        ECU_REDIS_URL=f"redis://ecu:{PASSWORD}@redis.invalid:6379/0",
        ECU_LEDGER_URL=f"postgresql://ecu:{PASSWORD}@db.invalid:5432/ecu",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ecu_sidecar", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ECU_ADMIN_TOKEN=(set)" in proc.stdout
    assert "redis://ecu:***@redis.invalid:6379/0" in proc.stdout
    assert PASSWORD not in proc.stdout + proc.stderr and ADMIN_TOKEN not in proc.stdout


def test_check_config_masks_passwords_given_as_query_parameters_or_conninfo() -> None:
    """redis-py and libpq take a password as a query parameter too (``?password=``,
    ``sslpassword=``): check-config and the logs mask those as well."""
    for redis_url, ledger_url, shown in (
        (
            f"redis://redis.invalid:6379/0?password={PASSWORD}&socket_keepalive=true",
            f"postgresql://ecu@db.invalid/ecu?sslmode=require&sslpassword={PASSWORD}",
            "redis://redis.invalid:6379/0?password=***&socket_keepalive=true",
        ),
        (
            f"rediss://:{PASSWORD}@redis.invalid:6380/0?token={PASSWORD}",
            f"postgresql://ecu@db.invalid:5432/ecu?password={PASSWORD}&sslmode=require",
            "rediss://***@redis.invalid:6380/0?token=***",
        ),
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
        env.update(ECU_REDIS_URL=redis_url, ECU_LEDGER_URL=ledger_url)
        proc = subprocess.run(
            [sys.executable, "-m", "ecu_sidecar", "check-config"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"ECU_REDIS_URL={shown}" in proc.stdout
        assert PASSWORD not in proc.stdout + proc.stderr
        settings = make_settings("embedded", redis_url=redis_url, ledger_url=ledger_url)
        stream = io.StringIO()
        handler = configure(settings, stream)
        try:
            logging.getLogger("ecu_sidecar.x").error("careless %s %s", redis_url, ledger_url)
        finally:
            logging.getLogger().removeHandler(handler)
        assert PASSWORD not in stream.getvalue() and "careless" in stream.getvalue()


def test_redaction_is_a_last_line_of_defence() -> None:
    settings = make_settings(
        "embedded",
        admin_token=ADMIN_TOKEN,
        redis_url=f"redis://:{PASSWORD.replace('-', '%2D')}@h:1/0",
    )
    record = logging.LogRecord(
        "ecu_sidecar.x", logging.ERROR, __file__, 1, "careless %s %s", (ADMIN_TOKEN, PASSWORD), None
    )
    for inner in (JsonFormatter(), TextFormatter()):
        line = RedactingFormatter(inner, secrets_of(settings)).format(record)
        assert ADMIN_TOKEN not in line and PASSWORD not in line
        assert line.count("***") == 2


def test_text_format_appends_structured_fields() -> None:
    record = logging.LogRecord(
        "ecu_sidecar.service", logging.DEBUG, __file__, 1, "Reserve ok", (), None
    )
    record.request_id = "req-1"
    record.reservation_id = "step-1"
    line = TextFormatter().format(record)
    assert line.endswith("Reserve ok request_id=req-1 reservation_id=step-1")
    data = json.loads(JsonFormatter().format(record))
    assert data["request_id"] == "req-1" and data["msg"] == "Reserve ok"
