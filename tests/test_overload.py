"""ECU_MAX_CONCURRENT_RPCS: a sidecar already working on that many calls answers one more
UNAVAILABLE OVERLOADED at once (retryable, with retry_after_ms), and that call changes nothing;
calls are served again as soon as the ones in flight finish."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.server import SidecarServer
from tests.conftest import ADMIN_METADATA, REDIS_PORT, make_settings, require_redis, wait_until
from tests.tcp_proxy import TcpProxy
from tests.test_service import details

ORG = "overload-org"


async def test_one_call_beyond_the_bound_is_refused_and_changes_nothing() -> None:
    require_redis()
    with TcpProxy(REDIS_PORT) as proxy:
        settings = make_settings(
            "redis",
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            max_concurrent_rpcs=2,
            redis_timeout_ms=5_000,
        )
        server = SidecarServer(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = quota_pb2_grpc.QuotaStub(ch)
                await stub.Grant(
                    pb.GrantRequest(
                        grant_id="g",
                        organization=ORG,
                        amount_uecu=10_000,
                        kind=pb.GRANT_KIND_TOP_UP,
                    ),
                    metadata=ADMIN_METADATA,
                )
                proxy.swallow_replies = True  # Redis runs what it gets; no reply comes back

                async def balance() -> pb.GetBalanceResponse:
                    return await stub.GetBalance(pb.GetBalanceRequest(organization=ORG))

                stuck = [asyncio.create_task(balance()) for _ in range(2)]
                await wait_until(lambda: server_in_flight(server) == 2, "two calls in flight")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Reserve(
                        pb.ReserveRequest(
                            reservation_id="r1",
                            account=pb.Account(organization=ORG),
                            amount_uecu=1_000,
                            job_type=pb.JOB_TYPE_ENGINE,
                        ),
                        timeout=2,
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                info = details(refused.value)["ErrorInfo"]
                assert info.reason == "OVERLOADED"
                assert int(info.metadata["retry_after_ms"]) > 0
                assert "ECU_MAX_CONCURRENT_RPCS" in (refused.value.details() or "")
                proxy.swallow_replies = False
                proxy.cut()  # the stuck calls fail over a fresh connection or time out
                await asyncio.gather(*stuck, return_exceptions=True)
                await wait_until(lambda: server_in_flight(server) == 0, "the stuck calls ended")
                balance = (await stub.GetBalance(pb.GetBalanceRequest(organization=ORG))).balance
                assert (balance.held_uecu, balance.outstanding_holds) == (0, 0)
                assert balance.reserved_uecu == 0, "the refused reserve changed state"
                served = await stub.Reserve(
                    pb.ReserveRequest(
                        reservation_id="r1",
                        account=pb.Account(organization=ORG),
                        amount_uecu=1_000,
                        job_type=pb.JOB_TYPE_ENGINE,
                    )
                )
                assert served.hold.amount_uecu == 1_000 and not served.replayed
        finally:
            await server.stop(grace=0)


def server_in_flight(server: SidecarServer) -> int:
    return server.quota_service.in_flight
