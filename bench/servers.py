"""The benchmark's floor servers: ``python -m bench.servers noop [options]``.

- ``noop`` (floor A): a ``grpc.aio`` server with the sidecar's server options serving the same
  Quota service, every RPC answered with a canned response: the cost of gRPC in Python alone.
  With ``--redis-url`` (floor A∘B) each handler first makes the operation's call on the
  product's ``RedisStore`` (its public ``reserve``, ``commit``, ``release``).

It prints one JSON line ``{"port": N, "pid": P}`` on stdout when it serves and stops on
SIGTERM. (The sidecar itself runs as ``python -m ecu_sidecar serve``: bench.procs.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

__all__ = ["NOOP_SERVER_OPTIONS", "main"]

#: The options ecu_sidecar.server.SidecarServer passes to grpc.aio.server (kept in step by
#: tests/test_bench_smoke.py, which reads them from the product's source).
NOOP_SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


def _use_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _noop(port: int, redis_url: str = "", prefix: str = "") -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.api.v1 import quota_pb2_grpc

    hold = pb.Hold(
        reservation_id="r" * 24,
        organization="org-000000",
        amount_uecu=1_000,
        deadline_unix_ms=1_900_000_000_000,
        state=pb.HOLD_STATE_ACTIVE,
    )
    reserve = pb.ReserveResponse(hold=hold, available_uecu=999_999_000)
    commit = pb.CommitResponse(
        reservation_id="r" * 24, committed_uecu=700, released_uecu=300, available_uecu=999_999_300
    )
    release = pb.ReleaseResponse(
        reservation_id="r" * 24,
        released_uecu=1_000,
        state=pb.HOLD_STATE_RELEASED,
        available_uecu=999_999_300,
    )

    class Noop(quota_pb2_grpc.QuotaServicer):
        async def Reserve(self, request: pb.ReserveRequest, context: object) -> pb.ReserveResponse:
            return reserve

        async def Commit(self, request: pb.CommitRequest, context: object) -> pb.CommitResponse:
            return commit

        async def Release(self, request: pb.ReleaseRequest, context: object) -> pb.ReleaseResponse:
            return release

    servicer: quota_pb2_grpc.QuotaServicer = Noop()
    if redis_url:
        servicer = await _scripted(redis_url, prefix, reserve, commit, release)
    server = grpc.aio.server(options=NOOP_SERVER_OPTIONS)
    quota_pb2_grpc.add_QuotaServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"port": bound, "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


async def _scripted(redis_url: str, prefix: str, reserve: Any, commit: Any, release: Any) -> Any:
    """Floor A∘B: the same no-op server, whose handlers each make the operation's call on the
    product's ``RedisStore`` (one script round trip, the product's arguments, transport and
    reply parsing) before answering the canned response. Sidecar − A∘B is what the rest of
    the sidecar's code costs: validation, the engine, conversion, metrics."""
    from ecu_sidecar.api.v1 import quota_pb2 as pb
    from ecu_sidecar.api.v1 import quota_pb2_grpc
    from ecu_sidecar.model import AccountRef, CommitItem, JobType, ReserveItem, Usage
    from ecu_sidecar.settings import Settings
    from ecu_sidecar.store import RedisStore

    settings = Settings.from_mapping(
        {"redis_url": ("bench", redis_url), "key_prefix": ("bench", prefix)}
    )
    store = RedisStore.from_settings(settings)
    await store.connect()
    ttl, pct = settings.default_ttl_ms, settings.overage_max_percent

    class Scripted(quota_pb2_grpc.QuotaServicer):
        async def Reserve(self, request: pb.ReserveRequest, context: object) -> pb.ReserveResponse:
            item = ReserveItem(request.reservation_id, 1_000, JobType.INFERENCE, "gpt-4o", ttl)
            await store.reserve(AccountRef(request.account.organization), [item])
            return reserve

        async def Commit(self, request: pb.CommitRequest, context: object) -> pb.CommitResponse:
            item = CommitItem(request.reservation_id, 700, Usage(900, 350, 1))
            await store.commit(request.organization, [item], pct)
            return commit

        async def Release(self, request: pb.ReleaseRequest, context: object) -> pb.ReleaseResponse:
            await store.release(request.organization, request.reservation_id)
            return release

    return Scripted()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("role", choices=("noop",))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--redis-url", default="", help="run the store call (floor A∘B)")
    parser.add_argument("--prefix", default="", help="with --redis-url: the key prefix")
    args = parser.parse_args(argv)
    if args.uvloop:
        _use_uvloop()
    asyncio.run(_noop(args.port, args.redis_url, args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
