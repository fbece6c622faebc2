"""The gRPC server: quota service, health checking, reflection, sweeper, graceful shutdown.

Shutdown order: health NOT_SERVING -> keep serving while the worker is connected (at most
ECU_SHUTDOWN_DELAY_S) -> stop accepting -> drain in-flight RPCs (grace) -> stop the sweeper ->
close the Redis pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from ecu_sidecar.api.v1 import quota_pb2, quota_pb2_grpc
from ecu_sidecar.engine import Journal, QuotaEngine
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.metrics import FlusherMetrics, Metrics, process_metrics
from ecu_sidecar.pricing import RateCardError, RateCardRegistry, tokens
from ecu_sidecar.reflection import enable_reflection
from ecu_sidecar.service import QuotaService, tolerant_deserializer
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore

__all__ = ["SERVICE_NAME", "SidecarServer", "add_quota_service", "load_rates"]

log = logging.getLogger(__name__)

#: How long shutdown waits for the background loops (sweeper, flusher, reloads) to stop.
LOOP_STOP_TIMEOUT_S = 10.0
#: Where client connections cannot be read: serve this long after NOT_SERVING, so calls
#: already on the wire are answered.
ON_THE_WIRE_S = 0.5
#: /proc/net/tcp's state code of an established connection.
_TCP_ESTABLISHED = "01"


def established_connections(port: int) -> int | None:
    """How many established TCP connections have ``port`` as their local port in this network
    namespace (the pod's): the clients connected to the gRPC server. None when the kernel's
    tables cannot be read (not Linux)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                rows = lines.read().splitlines()[1:]
        except OSError:
            if table.endswith("6"):
                continue  # IPv6 disabled
            return None
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == _TCP_ESTABLISHED:
                count += 1
    return count


#: /proc/net/unix's state code of a connected stream socket.
_UNIX_CONNECTED = "03"


def unix_socket_connections(path: str) -> int | None:
    """How many connections to the Unix socket at ``path`` are open (server side: accepted
    sockets carry the listener's path). None when the kernel's table cannot be read."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as lines:
            rows = lines.read().splitlines()[1:]
    except OSError:
        return None
    return sum(
        1
        for row in rows
        if len(fields := row.split(None, 7)) == 8
        and os.path.normpath(fields[7]) == os.path.normpath(path)
        and fields[5] == _UNIX_CONNECTED
    )


SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["Quota"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _HandlerTable:
    """Stands in for a server to catch the method handlers a generated add_*_to_server builds."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)


def add_quota_service(service: QuotaService, server: grpc.aio.Server) -> None:
    """The generated add_QuotaServicer_to_server, except that every method's request
    deserializer is tolerant (service.tolerant_deserializer): bytes that do not parse as the
    request message get a counted INVALID_ARGUMENT with details from the handler, not grpc's
    UNKNOWN and a logged traceback."""
    table = _HandlerTable()
    quota_pb2_grpc.add_QuotaServicer_to_server(service, table)
    methods = quota_pb2.DESCRIPTOR.services_by_name["Quota"].methods_by_name
    if set(table.handlers) != set(methods):
        raise RuntimeError("the generated Quota handlers do not match the service descriptor")
    handlers = {
        name: handler._replace(
            request_deserializer=tolerant_deserializer(
                name, methods[name].input_type.full_name, handler.request_deserializer
            )
        )
        for name, handler in table.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def load_rates(settings: Settings) -> RateCardRegistry | None:
    """The rate cards of ECU_RATE_CARD_FILE (current) and ECU_RATE_CARD_ARCHIVE_DIR (older
    versions, for commits pinned to them). Raises RateCardError: a bad card stops start-up."""
    if not settings.rate_card_file:
        return None
    rates = RateCardRegistry()
    if settings.rate_card_archive_dir:
        for path in sorted(Path(settings.rate_card_archive_dir).glob("*.toml")):
            rates.register(path)
    rates.load(settings.rate_card_file)
    return rates


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with a client CA) from the settings; None for plaintext."""
    if not settings.tls:
        return None
    with open(settings.tls_key_file, "rb") as fh:
        key = fh.read()
    with open(settings.tls_cert_file, "rb") as fh:
        chain = fh.read()
    ca = None
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as fh:
            ca = fh.read()
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def _bind(
    server: grpc.aio.Server, var: str, address: str, creds: grpc.ServerCredentials | None
) -> int:
    try:
        if creds is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:  # grpcio raises instead of returning 0 on bind failure
        raise OSError(f"cannot bind {var}={address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot bind {var}={address}")
    return port


class SidecarServer:
    """One sidecar process: owns the store, the engine and the gRPC server."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: RedisStore | None = None,
        registry: CollectorRegistry | None = None,
        ledger: Any = None,
        rates: RateCardRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or RedisStore.from_settings(settings)
        tokens.set_threads(settings.tokenizer_threads)
        self.rates = rates if rates is not None else load_rates(settings)
        self._owns_ledger = ledger is None and bool(settings.ledger_url)
        if self._owns_ledger:
            from ecu_sidecar.ledger import open_configured

            ledger = open_configured(settings, bounded=True)
        self.ledger = ledger
        """The ledger (ecu_sidecar.ledger.Ledger), when ECU_LEDGER_URL is set."""
        self.journal = (
            Journal.open(settings.degraded_journal, settings.degraded_allowance_uecu)
            if settings.degraded_allowance_uecu
            else None
        )
        self.engine = QuotaEngine(
            self.store, settings, ledger=ledger, rates=self.rates, journal=self.journal
        )
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.engine.hydrator.on_rebuild = lambda result: self.metrics.rebuilds.labels(result).inc()
        process_metrics(self.registry, "sidecar", settings.store_target)
        if self.journal is not None:
            self.metrics.degraded_pending.set_function(self.journal.pending)
            self.journal.on_failed = self.metrics.degraded_replay_failures.inc
        self.store.metrics = self.metrics.store
        if ledger is None:
            # No ledger, so no flusher exports the outbox length: the sidecar does (from 0).
            self.metrics.export_outbox_length()
        self.flusher: Flusher | None = None
        if ledger is not None and settings.run_flusher_in_serve:
            self.flusher = Flusher(self.store, ledger, settings, FlusherMetrics(self.registry))
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        """The bound health-only port (ECU_HEALTH_LISTEN)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        if self.rates is not None:
            self.metrics.rate_card_loaded(self.rates.current.version)
        self.port = 0
        """The bound gRPC port (useful when ECU_LISTEN asks for port 0)."""
        self.serving = True
        """False once shutdown began: health answers NOT_SERVING from then on."""
        self._metrics_http: Any = None
        self.metrics_port = 0
        """The bound /metrics port (ECU_METRICS_LISTEN; useful with port 0)."""

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
            self._metrics_http, _ = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
            self.metrics_port = self._metrics_http.server_port
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
        self.quota_service = QuotaService(
            self.engine,
            self.metrics,
            self.settings.admin_token,
            max_concurrent=self.settings.max_concurrent_rpcs,
        )
        add_quota_service(self.quota_service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(
            server,
            {SERVICE_NAME: quota_pb2.DESCRIPTOR, HEALTH_SERVICE_NAME: health_pb2.DESCRIPTOR},
        )
        socket_path = self.settings.unix_socket
        # grpc keeps unix:///x as the name "///x": bind the plain path, as the kernel lists it.
        address = f"unix:{socket_path}" if socket_path else self.settings.listen
        self.port = _bind(server, "ECU_LISTEN", address, _credentials(self.settings))
        if socket_path:
            # The file's permissions are the access control: owner and group only.
            os.chmod(self.settings.unix_socket, int(self.settings.unix_socket_mode, 8))
            self.port = 0
        await server.start()
        if self.settings.health_listen:
            # Health only, plaintext: kubelet probes reach the pod IP, never the quota service.
            # Its reflection lists and describes health and itself, nothing of the quota API.
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            enable_reflection(self._health_server, {HEALTH_SERVICE_NAME: health_pb2.DESCRIPTOR})
            self.health_port = _bind(
                self._health_server, "ECU_HEALTH_LISTEN", self.settings.health_listen, None
            )
            await self._health_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="ecu-sweeper"))
        if self.journal is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="ecu-degraded"))
        if self.rates is not None and self.settings.rate_card_poll_ms:
            self._tasks.append(asyncio.create_task(self._rate_card_loop(), name="ecu-rate-card"))
        if self.flusher is not None:
            self._tasks.append(
                asyncio.create_task(self.flusher.run(self._stopping), name="ecu-flusher")
            )
        return self.port

    async def reload_rate_card(self, *, force: bool = False) -> None:
        """Load the rate card file again if it changed (or always, with force: SIGHUP). A bad
        new card is refused: the old one keeps pricing, the failure is logged and counted."""
        if self.rates is None:
            return
        try:
            card = await asyncio.to_thread(self.rates.reload if force else self.rates.maybe_reload)
        except RateCardError as exc:
            self.metrics.rate_card_reloads.labels("failed").inc()
            log.error(
                "rate card reload refused, still pricing with %s: %s",
                self.rates.current.version,
                exc,
            )
            return
        if card is not None:
            self.metrics.rate_card_reloads.labels("ok").inc()
            self.metrics.rate_card_loaded(card.version)
            log.info("rate card %s loaded", card.version)

    async def _rate_card_loop(self) -> None:
        interval = self.settings.rate_card_poll_ms / 1000
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            await self.reload_rate_card()

    async def _replay_loop(self) -> None:
        """Replay degraded-mode decisions into Redis as soon as it answers again."""
        interval = self.settings.sweep_interval_ms / 1000
        while not self._stopping.is_set():
            try:
                replayed = await self.engine.replay_degraded()
                if replayed:
                    log.warning("replayed %d degraded-mode entries into Redis", replayed)
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("degraded-mode replay failed; retrying next interval")
            await asyncio.sleep(interval)

    async def _sweep_loop(self) -> None:
        interval = self.settings.sweep_interval_ms / 1000
        while not self._stopping.is_set():
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
            await self.bound_outboxes()

    async def bound_outboxes(self) -> int | None:
        """Without a ledger, trim the outboxes of the organizations served recently to about
        ECU_OUTBOX_MAX_LEN events (nothing else ever removes them) and export their length as
        ``ecu_outbox_length``; the sweeper runs this after every pass. Returns the events left
        in those outboxes; None when a ledger is configured (its flushers drain the outboxes,
        and every event must reach it) or Redis did not answer."""
        if self.ledger is None:
            try:
                left, trimmed = await self.store.bound_outboxes(
                    self.engine.recent_organizations(), self.settings.outbox_max_len
                )
            except StoreUnavailable as exc:
                log.warning("outbox bound: %s", exc.message)
            except Exception:
                log.exception("outbox bound failed; retrying next interval")
            else:
                self.metrics.export_outbox_length().set(left)
                if trimmed:
                    log.debug("trimmed %d outbox events (no ledger)", trimmed)
                return left
        return None

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, stop accepting, drain, then close the store."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.serving = False
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self._stopping.set()
        # The loops check _stopping each turn; cancel them too, and bound the wait: on Python
        # 3.11 a cancellation landing as a write completes can be swallowed (CPython
        # gh-86296), and shutdown must not hang on a background loop.
        for task in self._tasks:
            if task.get_name() != "ecu-flusher":
                task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=LOOP_STOP_TIMEOUT_S)
            for task in pending:
                log.error(
                    "background task %s did not stop in %.0fs; abandoning it",
                    task.get_name(),
                    LOOP_STOP_TIMEOUT_S,
                )
        if self.flusher is not None:
            # The final flush: everything acknowledged so far goes to the ledger before exit.
            try:
                moved = await self.flusher.drain()
                log.info("final flush moved %d events into the ledger", moved)
            except Exception as exc:
                log.error("final flush failed; events stay in the outbox: %s", exc)
        await self.store.close()
        self.engine.close()
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)  # waits out one poll (0.5 s)
            self._metrics_http.server_close()
        if self._owns_ledger:
            self.ledger.close()
        self._stopped.set()
        log.info("ecu-sidecar stopped")

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_rate_card(force=True))
        )
        await self.start()
        loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        if self.store.kind == "embedded":
            log.warning(
                "ecu-sidecar serving gRPC on %s (port %d, %s) with the EMBEDDED in-process "
                "store: state lives in this process only; set ECU_REDIS_URL for production",
                self.settings.listen,
                self.port,
                loop_name,
            )
        else:
            log.info(
                "ecu-sidecar serving gRPC on %s (port %d, %s) with %s Redis",
                self.settings.listen,
                self.port,
                loop_name,
                self.store.kind,
            )
        if self.ledger is None:
            log.info(
                "no ledger (ECU_LEDGER_URL): outboxes are kept to about %s events each "
                "(ECU_OUTBOX_MAX_LEN); their events reach no ledger",
                self.settings.outbox_max_len or "unbounded",
            )
        await stop.wait()
        log.info(
            "signal received: NOT_SERVING, draining (delay %.1fs, grace %.1fs)",
            self.settings.shutdown_delay_s,
            self.settings.shutdown_grace_s,
        )
        await self.health.enter_graceful_shutdown()
        await self.serve_while_connected(self.settings.shutdown_delay_s)
        await self.stop()

    async def serve_while_connected(self, limit_s: float) -> None:
        """After NOT_SERVING, keep serving while a client still holds a TCP connection to the
        gRPC port, at most ``limit_s``: all containers of a pod get SIGTERM at once, and the
        worker beside us may be finishing its step and about to commit. Calls already on the
        wire come over such a connection too, so they are answered rather than cancelled by
        server.stop(). Where connections cannot be read (no /proc), ON_THE_WIRE_S passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            socket_path = self.settings.unix_socket
            clients = (
                unix_socket_connections(socket_path)
                if socket_path
                else established_connections(self.port)
            )
            if clients == 0:
                return
            if clients is None:
                await asyncio.sleep(min(limit_s, ON_THE_WIRE_S))
                return
            await asyncio.sleep(0.05)
        log.warning(
            "a client was still connected after ECU_SHUTDOWN_DELAY_S (%.1fs): stopping",
            limit_s,
        )
