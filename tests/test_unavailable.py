"""Redis down or frozen: RPCs answer UNAVAILABLE within the configured bound, never hang,
and the same sidecar process serves again when Redis returns. UNAVAILABLE is an unknown
outcome; a retry with the same id settles it exactly once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.server import SidecarServer
from tests.conftest import ADMIN_METADATA, make_settings, wait_until, wait_until_sync

#: The gRPC deadline each call gets: far above the store bound, so a hung call shows up as
#: DEADLINE_EXCEEDED instead of the UNAVAILABLE the sidecar must answer by itself.
CALL_DEADLINE_S = 5.0
STORE_TIMEOUT_MS = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own on 127.0.0.1, to kill, freeze and restart."""

    def __init__(self, *extra_args: str) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ecu-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args = extra_args

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until_sync(pong, "the private redis-server answering PING", limit_s=10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.thaw()
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def reserve(stub: quota_pb2_grpc.QuotaStub, rid: str) -> pb.ReserveResponse:
    return await stub.Reserve(
        pb.ReserveRequest(
            reservation_id=rid,
            account=pb.Account(organization="acme"),
            amount_uecu=10,
            job_type=pb.JOB_TYPE_GEPA,
        ),
        timeout=CALL_DEADLINE_S,
    )


async def expect_unavailable(stub: quota_pb2_grpc.QuotaStub, rid: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await reserve(stub, rid)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
    status = rpc_status.from_call(ei.value)
    assert status is not None and "Redis" in status.message


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_unavailable_then_recovers(private_redis: PrivateRedis, fault: str) -> None:
    settings = make_settings(
        "redis",
        redis_url=f"redis://127.0.0.1:{private_redis.port}/0",
        redis_timeout_ms=STORE_TIMEOUT_MS,
        redis_connect_timeout_ms=STORE_TIMEOUT_MS,
    )
    server = SidecarServer(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            await stub.Grant(
                pb.GrantRequest(
                    grant_id="g", organization="acme", amount_uecu=1_000, kind=pb.GRANT_KIND_TOP_UP
                ),
                metadata=ADMIN_METADATA,
            )
            assert (await reserve(stub, "before")).available_uecu == 990

            if fault == "killed":
                private_redis.kill()
            else:
                private_redis.freeze()
            for i in range(3):
                await expect_unavailable(stub, f"during-{i}")
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.GetBalance(
                    pb.GetBalanceRequest(organization="acme"), timeout=CALL_DEADLINE_S
                )
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            errors = server.registry.get_sample_value(
                "ecu_rpc_errors_total", {"method": "Reserve", "reason": "STORE_UNAVAILABLE"}
            )
            assert errors == 3

            if fault == "killed":
                private_redis.start()  # same port, empty: the account must be granted again
                await stub.Grant(
                    pb.GrantRequest(
                        grant_id="g",
                        organization="acme",
                        amount_uecu=1_000,
                        kind=pb.GRANT_KIND_TOP_UP,
                    ),
                    metadata=ADMIN_METADATA,
                )
                expected = 1_000 - 10 * 4
            else:
                # State intact. A frozen server may still run the commands that were already in
                # its socket when the sidecar gave up: UNAVAILABLE means "unknown outcome".
                private_redis.thaw()
                expected = 1_000 - 10 * 5
            # The same process recovers by itself: no restart, at most one failed reconnect.
            for attempt in range(20):
                try:
                    await reserve(stub, "after")
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert attempt < 19, "sidecar did not recover after Redis returned"
            # Retrying the unknown outcomes with the same ids resolves them exactly once. A
            # replay answers the balance of the moment it first ran, which depends on whether
            # the frozen server ran it on thawing or the retry did: judge the final balance.
            for i in range(3):
                last = await reserve(stub, f"during-{i}")
                assert last.hold.amount_uecu == 10
            balance = (await stub.GetBalance(pb.GetBalanceRequest(organization="acme"))).balance
            assert balance.balance_uecu - balance.held_uecu == expected
            assert balance.outstanding_holds == (4 if fault == "killed" else 5)
            assert balance.held_uecu == 10 * balance.outstanding_holds
    finally:
        await server.stop(grace=0)


async def test_shutdown_drains_in_flight_calls(private_redis: PrivateRedis) -> None:
    """SIGTERM path: NOT_SERVING first, then in-flight RPCs finish, then new ones are refused."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = make_settings(
        "redis", redis_url=f"redis://127.0.0.1:{private_redis.port}/0", redis_timeout_ms=5_000
    )
    server = SidecarServer(settings)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = quota_pb2_grpc.QuotaStub(channel)
        await stub.Grant(
            pb.GrantRequest(
                grant_id="g", organization="acme", amount_uecu=1_000, kind=pb.GRANT_KIND_TOP_UP
            ),
            metadata=ADMIN_METADATA,
        )
        arrived = asyncio.Event()
        real_reserve = server.engine.reserve

        async def arriving_reserve(*args: Any, **kw: Any) -> Any:
            arrived.set()
            return await real_reserve(*args, **kw)

        server.engine.reserve = arriving_reserve  # type: ignore[method-assign]
        private_redis.freeze()  # the next call is in flight until Redis thaws
        in_flight = asyncio.ensure_future(reserve(stub, "in-flight"))
        # The call has reached the engine (and waits on the frozen Redis): no sleep-and-hope.
        await wait_until(arrived.is_set, "the reservation reaching the engine")
        assert not in_flight.done()
        stopping = asyncio.ensure_future(server.stop(grace=10))
        health = health_pb2_grpc.HealthStub(channel)
        await wait_until(
            lambda: not server.serving,
            "health NOT_SERVING once stopping",
        )
        private_redis.thaw()
        out = await in_flight
        assert out.available_uecu == 990, "the in-flight reservation must complete, not be cut"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
