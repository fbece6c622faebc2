"""Access: loopback by default, TLS (and mutual TLS) required beyond it, a health-only port,
organizations pinned per sidecar, no secret in logs or error messages, READONLY reconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.client import (
    AsyncQuotaClient,
    QuotaClient,
    RetryPolicy,
    Unavailable,
    tls_credentials,
)
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.settings import Settings, SettingsError
from tests.conftest import (
    ADMIN_METADATA,
    ADMIN_TOKEN,
    drop_keys,
    make_settings,
    open_store,
    snapshot,
)


def test_default_listen_is_loopback() -> None:
    assert Settings().listen.startswith("127.0.0.1:")


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"])
def test_listening_beyond_loopback_requires_tls(listen: str) -> None:
    with pytest.raises(SettingsError, match="requires TLS"):
        Settings.from_env({"ECU_LISTEN": listen})


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="set both or neither"):
        Settings.from_env({"ECU_TLS_CERT_FILE": str(tmp_path / "c.pem")})
    with pytest.raises(SettingsError, match="no such file"):
        Settings.from_env(
            {
                "ECU_TLS_CERT_FILE": str(tmp_path / "c.pem"),
                "ECU_TLS_KEY_FILE": str(tmp_path / "k.pem"),
            }
        )


def write_pem(path: Path, blob: trustme.Blob) -> str:
    blob.write_to_path(str(path))
    return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("worker.example")
    return {
        "ca": write_pem(tmp_path / "ca.pem", ca.cert_pem),
        "cert": write_pem(tmp_path / "server.pem", server.cert_chain_pems[0]),
        "key": write_pem(tmp_path / "server.key", server.private_key_pem),
        "client_cert": write_pem(tmp_path / "client.pem", client.cert_chain_pems[0]),
        "client_key": write_pem(tmp_path / "client.key", client.private_key_pem),
    }


def read(path: str) -> bytes:
    return Path(path).read_bytes()


async def test_mutual_tls_on_a_non_loopback_address(pki: dict[str, str]) -> None:
    """0.0.0.0 is allowed with TLS; with a client CA, only clients it signed get in."""
    settings = make_settings(
        "embedded",
        listen="0.0.0.0:0",
        tls_cert_file=pki["cert"],
        tls_key_file=pki["key"],
        tls_client_ca_file=pki["ca"],
    )
    server = SidecarServer(settings)
    await server.start()
    try:
        target = f"localhost:{server.port}"
        good = grpc.ssl_channel_credentials(
            root_certificates=read(pki["ca"]),
            private_key=read(pki["client_key"]),
            certificate_chain=read(pki["client_cert"]),
        )
        async with grpc.aio.secure_channel(target, good) as ch:
            out = await quota_pb2_grpc.QuotaStub(ch).Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=5, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
                timeout=5,
            )
            assert out.balance_uecu == 5
        no_client_cert = grpc.ssl_channel_credentials(root_certificates=read(pki["ca"]))
        async with grpc.aio.secure_channel(target, no_client_cert) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await quota_pb2_grpc.QuotaStub(ch).GetBalance(
                    pb.GetBalanceRequest(organization="acme"), timeout=5
                )
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await quota_pb2_grpc.QuotaStub(ch).GetBalance(
                    pb.GetBalanceRequest(organization="acme"), timeout=5
                )
    finally:
        await server.stop(grace=0)


async def test_the_shipped_client_and_cli_reach_a_mutual_tls_sidecar(
    pki: dict[str, str],
) -> None:
    """Both client flavours and the CLI connect with the CA and a client certificate; without
    the client certificate the handshake fails (UNAVAILABLE), and nothing else changes."""
    settings = make_settings(
        "embedded",
        listen="0.0.0.0:0",
        tls_cert_file=pki["cert"],
        tls_key_file=pki["key"],
        tls_client_ca_file=pki["ca"],
    )
    server = SidecarServer(settings)
    await server.start()
    target = f"localhost:{server.port}"
    try:
        creds = tls_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
        async with AsyncQuotaClient(target, admin_token=ADMIN_TOKEN, credentials=creds) as c:
            await c.grant("tls-org", 7_000, grant_id="g1")
            assert (await c.balance("tls-org")).available_uecu == 7_000
        with QuotaClient(target, credentials=creds) as sync_client:
            assert (await asyncio.to_thread(sync_client.balance, "tls-org")).granted_uecu == 7_000
        no_cert = tls_credentials(pki["ca"])
        once = RetryPolicy(attempts=1)
        async with AsyncQuotaClient(target, credentials=no_cert, timeout_s=1, retry=once) as c:
            with pytest.raises(Unavailable):
                await c.balance("tls-org")
        with pytest.raises(ValueError, match="needs its key"):
            tls_credentials(pki["ca"], cert_file=pki["client_cert"])

        def cli(*extra: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
            command = [sys.executable, "-m", "ecu_sidecar", "balance", "tls-org", "--json"]
            return subprocess.run(
                [*command, "--target", target, "--timeout", "1", *extra],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        mutual = ["--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"]]
        out = await asyncio.to_thread(cli, *mutual, "--tls-key", pki["client_key"])
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["available_uecu"] == 7_000
        refused = await asyncio.to_thread(cli, "--tls-ca", pki["ca"])
        assert refused.returncode == 1 and refused.stderr.startswith("error: UNAVAILABLE")
        half = await asyncio.to_thread(cli, *mutual)
        assert half.returncode == 2 and "--tls-cert and --tls-key" in half.stderr
        plaintext = await asyncio.to_thread(cli)
        assert plaintext.returncode == 1, plaintext.stdout
        assert (await server.engine.balance("tls-org")).granted_uecu == 7_000
    finally:
        await server.stop(grace=0)


async def test_health_only_port_serves_health_and_nothing_else() -> None:
    settings = make_settings("embedded", health_listen="127.0.0.1:0")
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="ecu_sidecar.api.v1.Quota"), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await quota_pb2_grpc.QuotaStub(ch).GetBalance(
                    pb.GetBalanceRequest(organization="acme"), timeout=5
                )
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace=0)


async def reflect(
    port: int, version: str = "v1alpha", **request: str
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One server reflection exchange with 127.0.0.1:port, in protocol ``version`` (v1 or
    v1alpha: the same messages under two package names, so one pair of classes reads both)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        method = ch.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = method(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5)
        return [response async for response in call]


def described_symbols(response: reflection_pb2.ServerReflectionResponse) -> set[str]:
    """The services and messages of the files in a file_descriptor_response."""
    out = set()
    for raw in response.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        out |= {f"{file.package}.{m.name}" for m in (*file.service, *file.message_type)}
    return out


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_health_only_port_reflects_only_what_it_serves(version: str) -> None:
    """grpcurl against the probe port, in reflection v1 (what grpcurl tries first) and
    v1alpha: its reflection lists health and reflection, describes them, and knows nothing of
    the quota API; the main port describes the quota API, health and reflection."""
    settings = make_settings("embedded", health_listen="127.0.0.1:0")
    server = SidecarServer(settings)
    await server.start()
    reflection_services = {
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    try:
        (listed,) = await reflect(server.health_port, version, list_services="")
        assert {s.name for s in listed.list_services_response.service} == {
            "grpc.health.v1.Health",
            *reflection_services,
        }
        (health,) = await reflect(
            server.health_port, version, file_containing_symbol="grpc.health.v1.Health"
        )
        assert "grpc.health.v1.HealthCheckRequest" in described_symbols(health)
        (itself,) = await reflect(
            server.health_port,
            version,
            file_containing_symbol=f"grpc.reflection.{version}.ServerReflection",
        )
        assert f"grpc.reflection.{version}.ServerReflectionRequest" in described_symbols(itself)
        for symbol in ("ecu_sidecar.api.v1.Quota", "ecu_sidecar.api.v1.ReserveRequest"):
            (missing,) = await reflect(server.health_port, version, file_containing_symbol=symbol)
            assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

        (listed,) = await reflect(server.port, version, list_services="")
        assert {s.name for s in listed.list_services_response.service} == {
            "ecu_sidecar.api.v1.Quota",
            "grpc.health.v1.Health",
            *reflection_services,
        }
        (quota,) = await reflect(
            server.port, version, file_containing_symbol="ecu_sidecar.api.v1.Quota"
        )
        assert "ecu_sidecar.api.v1.ReserveRequest" in described_symbols(quota)
    finally:
        await server.stop(grace=0)


async def test_pinned_sidecar_refuses_other_organizations(backend: str) -> None:
    settings = make_settings(backend, allowed_orgs="acme, beta")
    server = SidecarServer(settings, store=open_store(settings))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = quota_pb2_grpc.QuotaStub(ch)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=100, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            before = await snapshot(settings)
            calls = [
                stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r",
                        account=pb.Account(organization="other"),
                        amount_uecu=1,
                        job_type=pb.JOB_TYPE_GEPA,
                    )
                ),
                stub.Commit(pb.CommitRequest(reservation_id="r", organization="other")),
                stub.GetBalance(pb.GetBalanceRequest(organization="other")),
                stub.ApproveJob(
                    pb.ApproveJobRequest(
                        job_id="j",
                        account=pb.Account(organization="other"),
                        approved_total_uecu=1,
                        job_type=pb.JOB_TYPE_GEPA,
                    )
                ),
                stub.GetJob(pb.GetJobRequest(organization="other", job_id="j")),
                stub.HeartbeatJob(pb.HeartbeatJobRequest(organization="other", job_id="j")),
                stub.CloseJob(pb.CloseJobRequest(organization="other", job_id="j")),
                stub.Grant(
                    pb.GrantRequest(
                        grant_id="g", organization="other", amount_uecu=1, kind=pb.GRANT_KIND_TOP_UP
                    ),
                    metadata=ADMIN_METADATA,
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await call
                assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "other" in ei.value.details()
            assert await snapshot(settings) == before
            b = await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))
            assert b.balance.balance_uecu == 100
    finally:
        try:
            await drop_keys(settings)
        finally:
            await server.stop(grace=0)


async def test_no_secret_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    """The admin token and a Redis password never appear in a log line or an error message,
    even when Redis refuses that password and a caller sends a wrong token."""
    from tests.test_unavailable import PrivateRedis

    redis = PrivateRedis()
    redis.start()
    import redis.asyncio as aioredis

    admin = aioredis.Redis(port=redis.port)
    await admin.config_set("requirepass", "the-real-password")
    await admin.aclose()
    password = "s3cret-redis-pass"  # wrong: every Redis call fails authentication
    caplog.set_level(logging.DEBUG)
    try:
        settings = make_settings(
            "redis",
            redis_url=f"redis://default:{password}@127.0.0.1:{redis.port}/0",
            redis_timeout_ms=300,
            redis_connect_timeout_ms=300,
        )
        server = SidecarServer(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = quota_pb2_grpc.QuotaStub(ch)
                for md in (ADMIN_METADATA, (("authorization", "Bearer wrong-token-xyz"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        await stub.Grant(
                            pb.GrantRequest(
                                grant_id="g",
                                organization="acme",
                                amount_uecu=1,
                                kind=pb.GRANT_KIND_TOP_UP,
                            ),
                            metadata=md,
                            timeout=5,
                        )
                    text = ei.value.details() + str(ei.value.trailing_metadata())
                    for secret in (password, ADMIN_TOKEN, "wrong-token-xyz"):
                        assert secret not in text
        finally:
            await server.stop(grace=0)
        from ecu_sidecar.settings import describe

        assert password not in str(describe(settings))
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert logged, "the fault produced no log line at all"
        for secret in (password, ADMIN_TOKEN, "wrong-token-xyz"):
            assert secret not in logged
    finally:
        redis.close()


async def test_readonly_reply_reconnects_instead_of_failing_forever() -> None:
    """The node behind ECU_REDIS_URL is demoted to a replica, then promoted back: calls answer
    UNAVAILABLE meanwhile and succeed again afterwards, in the same process."""
    from tests.test_unavailable import PrivateRedis

    primary, other = PrivateRedis(), PrivateRedis()
    primary.start()
    other.start()
    settings = make_settings("redis", redis_url=f"redis://127.0.0.1:{primary.port}/0")
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = quota_pb2_grpc.QuotaStub(ch)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=100, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            import redis.asyncio as aioredis

            admin = aioredis.Redis(port=primary.port)
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
            await admin.config_set("replica-read-only", "yes")
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r1",
                        account=pb.Account(organization="acme"),
                        amount_uecu=1,
                        job_type=pb.JOB_TYPE_GEPA,
                    ),
                    timeout=5,
                )
            # The replica resynced from an empty primary: either the account is gone
            # (NOT_FOUND) or the write is refused (UNAVAILABLE) -- never INTERNAL.
            assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.aclose()
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g2", organization="acme", amount_uecu=50, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
                timeout=5,
            )
            out = await stub.Reserve(
                pb.ReserveRequest(
                    reservation_id="r2",
                    account=pb.Account(organization="acme"),
                    amount_uecu=1,
                    job_type=pb.JOB_TYPE_GEPA,
                ),
                timeout=5,
            )
            assert out.hold.state == pb.HOLD_STATE_ACTIVE
    finally:
        await server.stop(grace=0)
        primary.close()
        other.close()
