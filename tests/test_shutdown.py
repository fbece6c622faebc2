"""Pod termination: every container of a pod gets SIGTERM at once, so the sidecar must keep
serving while its worker is still there, finishing a step, and stop once the worker is gone.

A real `ecu-sidecar serve` process (embedded store) and a worker on a real gRPC channel."""

from __future__ import annotations

import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.server import established_connections
from tests.chaos.support import SidecarProcess, sidecar_env
from tests.conftest import ADMIN_METADATA, wait_until

ORG = "acme-shutdown"


async def test_established_connections_counts_the_clients_of_a_port() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    assert established_connections(port) == 0
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert established_connections(port) == 1
    client.close()
    accepted.close()
    await wait_until(lambda: established_connections(port) == 0, "the closed connection gone")
    server.close()


async def test_a_worker_commits_after_sigterm_then_the_sidecar_stops_when_it_leaves() -> None:
    proc = SidecarProcess(sidecar_env(SHUTDOWN_DELAY_S=60, SHUTDOWN_GRACE_S=5))
    try:
        await proc.wait_serving()
        async with grpc.aio.insecure_channel(proc.target) as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    organization=ORG,
                    grant_id="g1",
                    amount_uecu=1_000_000,
                    kind=pb.GRANT_KIND_TOP_UP,
                ),
                metadata=ADMIN_METADATA,
            )
            await stub.Reserve(
                pb.ReserveRequest(
                    account=pb.Account(organization=ORG),
                    reservation_id="step-1",
                    amount_uecu=400_000,
                    job_type=pb.JOB_TYPE_INFERENCE,
                    model="gpt-4o",
                )
            )
            proc.signal(signal.SIGTERM)

            async def not_serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_until(not_serving, "NOT_SERVING after SIGTERM")
            # The worker finishes its step after SIGTERM: its sidecar still serves it.
            assert proc.proc.poll() is None, "the sidecar left while its worker was connected"
            done = await stub.Commit(
                pb.CommitRequest(organization=ORG, reservation_id="step-1", actual_uecu=250_000)
            )
            assert done.committed_uecu == 250_000
            reply = await stub.GetBalance(pb.GetBalanceRequest(organization=ORG))
            balance = reply.balance
            assert balance.balance_uecu == 750_000
            assert balance.held_uecu == 0
        # The worker is gone: the sidecar stops by itself, long before its 60 s limit (a fixed
        # delay, the old rule, would keep it 60 s).
        assert await proc.wait_exit(timeout_s=15) == 0, proc.stderr()
        assert "still connected" not in proc.stderr()
    finally:
        proc.close()


async def test_without_a_connected_worker_sigterm_stops_at_once() -> None:
    proc = SidecarProcess(sidecar_env(SHUTDOWN_DELAY_S=60, SHUTDOWN_GRACE_S=5))
    try:
        await proc.wait_serving()
        await wait_until(
            lambda: established_connections(proc.port) == 0, "the readiness check's channel gone"
        )
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout_s=15) == 0, proc.stderr()
    finally:
        proc.close()
