"""The gRPC server: quota service, health checking, reflection, sweeper, graceful shutdown.

Shutdown order: health NOT_SERVING -> stop accepting -> drain in-flight RPCs (grace) ->
stop the sweeper -> close the Redis pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from ecu_sidecar.api.v1 import quota_pb2, quota_pb2_grpc
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.metrics import Metrics
from ecu_sidecar.service import QuotaService
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore

__all__ = ["SERVICE_NAME", "SidecarServer"]

log = logging.getLogger(__name__)

SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["Quota"].full_name


class SidecarServer:
    """One sidecar process: owns the store, the engine and the gRPC server."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: RedisStore | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or RedisStore.from_settings(settings)
        self.engine = QuotaEngine(self.store, settings)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.port = 0
        """The bound gRPC port (useful when ECU_LISTEN asks for port 0)."""

    async def start(self) -> int:
        """Bind, start serving and return the bound port. On failure nothing is left running."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> int:
        if self.settings.metrics_listen:
            host, _, port = self.settings.metrics_listen.rpartition(":")
            start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        try:
            await self.store.connect()
        except StoreUnavailable as exc:
            # Serve anyway: calls answer UNAVAILABLE until Redis is reachable.
            log.warning("store not reachable at start-up: %s", exc.message)
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ]
        )
        self._server = server
        quota_pb2_grpc.add_QuotaServicer_to_server(
            QuotaService(self.engine, self.metrics, self.settings.admin_token), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as exc:  # grpcio raises instead of returning 0 on bind failure
            raise OSError(f"cannot bind ECU_LISTEN={self.settings.listen}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot bind ECU_LISTEN={self.settings.listen}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="ecu-sweeper")
        return self.port

    async def _sweep_loop(self) -> None:
        interval = self.settings.sweep_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await self.engine.sweep_recent()
            except StoreUnavailable as exc:
                log.warning("sweeper: %s", exc.message)
                continue
            except Exception:
                log.exception("sweeper failed; retrying next interval")
                continue
            if expired:
                self.metrics.swept.inc(expired)
                log.info("sweeper expired %d overdue holds", expired)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, stop accepting, drain, then close the store."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.store.close()
        self._stopped.set()
        log.info("ecu-sidecar stopped")

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        if self.store.kind == "embedded":
            log.warning(
                "ecu-sidecar serving gRPC on %s (port %d) with the EMBEDDED in-process store: "
                "state lives in this process only; set ECU_REDIS_URL for production",
                self.settings.listen,
                self.port,
            )
        else:
            log.info(
                "ecu-sidecar serving gRPC on %s (port %d) with %s Redis",
                self.settings.listen,
                self.port,
                self.store.kind,
            )
        await stop.wait()
        log.info("signal received: draining (grace %.1fs)", self.settings.shutdown_grace_s)
        await self.stop()
