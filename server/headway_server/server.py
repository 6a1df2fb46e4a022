"""Builds the Headway gRPC server: ProgressTracker, health and reflection on one port."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from headway_server import auth, handlers
from headway_server.app.service import OperationService
from headway_server.app.sweeper import Sweeper
from headway_server.app.watch import WatchHub
from headway_server.config import ServerConfig
from headway_server.domain.alerts import AlertThresholds
from headway_server.domain.errors import StoreUnavailable
from headway_server.metrics import Metrics
from headway_server.servicer import ProgressTrackerServicer
from headway_server.store import OperationStore, open_store

log = logging.getLogger("headway.server")

# How often the health check asks the store whether it can serve.
STORE_CHECK_INTERVAL = 1.0
STORE_CLOSE_TIMEOUT = 5.0


class HeadwayServer:
    """A started-on-demand grpc.aio server plus the sweeper that runs beside it."""

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        service: OperationService,
        hub: WatchHub,
        health: HealthServicer,
        port: int,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.grpc_server = grpc_server
        self.service = service
        self.hub = hub
        self.health = health
        self.port = port
        self.metrics = metrics
        self.metrics_port = 0
        self.sweeper = Sweeper(
            service, interval=config.sweep_interval, after_sweep=self._publish_gauges
        )
        self._store_checks: asyncio.Task[None] | None = None
        self.store_available = True
        # The token table calls are checked against (None: no authentication).
        self.credentials: handlers.Credentials | None = None
        # The HTTP/JSON gateway (None: --http-listen not given) and its port.
        self.http: Any = None
        self.http_port = 0

    def reload_credentials(self) -> None:
        """Reads the token file again (SIGHUP); a file that does not load is
        logged and the tokens in use are kept. Open connections stay."""
        if self.credentials is None:
            return
        try:
            tokens = load_credentials(self.config)
            assert tokens is not None  # configured at start, so still configured
        except auth.AuthConfigError as exc:
            log.error(
                "token file not reloaded; keeping the tokens in use", extra={"detail": str(exc)}
            )
            return
        self.credentials.tokens = tokens
        log.info("token file reloaded", extra={"tokens": len(tokens)})

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.http is not None:
            self.http_port = await self.http.start()
            scheme = "https" if self.config.tls_cert else "http"
            host = self.http.host if ":" not in self.http.host else f"[{self.http.host}]"
            log.info(
                "serving HTTP",
                extra={"port": self.http_port, "dashboard": f"{scheme}://{host}:{self.http_port}/"},
            )
        await self._check_store()
        self._store_checks = asyncio.create_task(self._check_store_forever())
        self.sweeper.start()
        if self.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.config.metrics_listen)
            log.info("metrics", extra={"port": self.metrics_port})
        log.info("serving", extra={"port": self.port, "listen": self.config.listen})

    async def _check_store(self) -> None:
        """SERVING while the store answers, NOT_SERVING while it does not (a
        load balancer then sends calls to a replica that can serve them)."""
        try:
            await self.service.store.check()
        except StoreUnavailable as exc:
            available = False
            reason = str(exc)
        else:
            available, reason = True, ""
        if available != self.store_available or self._store_checks is None:
            if available:
                log.info("store available", extra={"store": self.config.store_name})
            else:
                log.error("store unavailable", extra={"detail": reason})
        self.store_available = available
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if available
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", handlers.SERVICE.full_name):
            await self.health.set(name, status)

    async def _check_store_forever(self) -> None:
        while True:
            await asyncio.sleep(STORE_CHECK_INTERVAL)
            try:
                await self._check_store()
            except Exception:
                # Health must keep following the store whatever one check hit.
                log.exception("store check failed")

    async def _publish_gauges(self) -> None:
        if not self.metrics_port:
            return  # only worth counting when something can scrape the result
        # Read on the event loop and handed over whole: the metrics endpoint
        # runs in another thread and must not iterate the store.
        counts = Counter(await self.service.counts())
        self.metrics.set_operation_counts(counts)
        self.metrics.set_open_watchers(self.hub.open_watchers)

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING first, watchers told where to resume, then stop."""
        grace = self.config.shutdown_grace if grace is None else grace
        log.info("shutting down", extra={"grace": grace, "watchers": self.hub.open_watchers})
        if self._store_checks is not None:
            self._store_checks.cancel()
        await self.health.enter_graceful_shutdown()
        self.hub.stop()
        await self.sweeper.stop()
        if self.http is not None:
            await self.http.stop()
        await self.grpc_server.stop(grace)
        try:
            # Bounded: a store that does not answer must not hold the exit up.
            await asyncio.wait_for(self.service.store.close(), STORE_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("store did not close in time", extra={"store": self.config.store_name})
        self.metrics.close()
        log.info("stopped")


def create_server(
    config: ServerConfig,
    store: OperationStore | None = None,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    metrics: Metrics | None = None,
) -> tuple[HeadwayServer, int]:
    """Builds (not starts) the server; call from the event loop it will run on.

    Returns the server and the bound port (useful with port 0).
    """
    # Annotated so that MemoryStore is checked against the protocol here.
    chosen: OperationStore = store or open_store(
        config.store, max_operations=config.max_operations, history_size=config.history_size
    )
    metrics = metrics or Metrics()
    thresholds = AlertThresholds(
        slow_fraction=config.slow_fraction,
        error_rate=config.error_rate_threshold,
        eta_slip_seconds=config.eta_slip_seconds,
    )
    service = OperationService(
        chosen,
        retention=config.retention,
        thresholds=thresholds,
        observer=metrics,
        max_active_per_project=config.max_active_operations_per_project,
    )
    hub = WatchHub(
        chosen,
        bookmark_interval=config.bookmark_interval,
        yield_ratio=config.watch_yield_ratio,
        min_interval=config.watch_min_interval,
    )
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.server.max_pending_requests", config.max_pending_requests),
            # Workers share one port; otherwise a second server on a busy port
            # must fail rather than split the calls.
            ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
            ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
            # Idle watch streams send no data between bookmarks: keep pinging.
            ("grpc.http2.max_pings_without_data", 0),
        ],
        maximum_concurrent_rpcs=None,
        interceptors=interceptors or None,
    )
    table = load_credentials(config)
    credentials = handlers.Credentials(table) if table is not None else None
    servicer = ProgressTrackerServicer(
        service, hub, max_streams_per_principal=config.max_watch_streams_per_principal
    )
    handlers.add_service(grpc_server, handlers.SERVICE, servicer, metrics.counted, credentials)
    health = HealthServicer()
    handlers.add_service(
        grpc_server, health_pb2.DESCRIPTOR.services_by_name["Health"], health, metrics.counted
    )
    described = (
        handlers.SERVICE.full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    if config.auth_reflection and credentials is not None:
        # Registered like the service, so that it asks for a token too (its
        # calls are not counted in the metrics, as before).
        handlers.add_service(
            grpc_server,
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
            ReflectionServicer(described),
            handlers.uncounted,
            credentials,
        )
    else:
        reflection.enable_server_reflection(described, grpc_server)
    # Last, so that only calls no service above answers reach it.
    grpc_server.add_generic_rpc_handlers((metrics.unknown_methods(),))
    try:
        port = (
            grpc_server.add_secure_port(config.listen, _tls(config))
            if config.tls_cert
            else grpc_server.add_insecure_port(config.listen)
        )
    except RuntimeError as exc:  # grpcio reports a failed bind as RuntimeError
        raise OSError(f"cannot listen on {config.listen}: address in use or invalid") from exc
    server = HeadwayServer(config, grpc_server, service, hub, health, port, metrics)
    server.credentials = credentials
    if config.http_listen:
        from headway_server.gateway import Gateway, HttpListener  # only when asked for

        gateway = Gateway(servicer, credentials, config.http_cors_origins)
        server.http = HttpListener(
            gateway,
            config.http_listen,
            config.tls_cert,
            config.tls_key,
            reuse_port=config.workers > 1,
        )
    return server, port


def _tls(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS from the configured PEM files; mTLS when a client CA is given."""

    def read(path: str, flag: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise OSError(f"{flag} {path}: {exc.strerror}") from exc

    client_ca = read(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key, "--tls-key"), read(config.tls_cert, "--tls-cert"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def load_credentials(config: ServerConfig) -> auth.TokenTable | None:
    """The token file and JWT key the configuration names (None: no authentication)."""
    return auth.load(
        config.auth_tokens,
        jwt_key=config.auth_jwt_key,
        jwt_issuer=config.auth_jwt_issuer,
        jwt_audience=config.auth_jwt_audience,
    )
