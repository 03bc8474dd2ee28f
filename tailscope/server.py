"""The composition root: one process that owns the store and serves everything.

Kept thin on purpose (datasette's god object is the thing not to copy): each
part builds itself from the store and the config; this module only wires
them in data-flow order — collector → store → analyzer → dashboard/alerts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailscope.config import Config

log = logging.getLogger("tailscope.server")


@dataclass
class Server:
    """A built server: its parts and the FastAPI app that exposes them."""

    config: Config
    store: Any
    app: Any
    parts: dict[str, Any] = field(default_factory=dict)
    _uvicorn: Any = None
    _thread: threading.Thread | None = None

    _started: bool = False
    _closed: bool = False

    # --- lifecycle --------------------------------------------------------
    # Parts start and stop through the app's lifespan: uvicorn re-raises SIGTERM
    # after its graceful shutdown, so code placed after ``uvicorn.run`` may never
    # run, while the lifespan's shutdown always does (after the last response).
    def start_background(self) -> None:
        """Start every background part (writer, gRPC, retention, alerts) once, in order."""
        if self._started:
            return
        self._started = True
        for name in ("ingest", "grpc", "retention", "alerts"):
            part = self.parts.get(name)
            if part is not None and hasattr(part, "start"):
                part.start()

    def close(self) -> None:
        """Stop in reverse order (the ingest writer drains its queue last), then close the store."""
        if self._closed:
            return
        self._closed = True
        for name in ("alerts", "retention", "grpc", "ingest"):
            part = self.parts.get(name)
            if part is not None and hasattr(part, "stop"):
                try:
                    part.stop()
                except Exception:  # one part failing must not keep the others running
                    log.exception("stopping %s failed", name)
        self.store.close()

    def serve(self) -> None:
        """Run in the foreground until SIGINT/SIGTERM (the CLI's ``serve``)."""
        import uvicorn

        uvicorn.run(
            self.app,
            host=self.config.host,
            port=self.config.port,
            log_level=self.config.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )

    def serve_in_thread(self) -> int:
        """Serve on a thread (tests, demo); returns the bound port (0 picks a free one)."""
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        port = sock.getsockname()[1]
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._uvicorn = uvicorn.Server(cfg)
        # Signal handlers can only be installed on the main thread.
        self._uvicorn.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="tailscope-http", daemon=True)
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("HTTP server failed to start (see the log above)")
            threading.Event().wait(0.01)
        return port

    def shutdown_thread(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=30)
        self.close()


def build_server(config: Config) -> Server:
    """Build (not start) the whole server from resolved settings."""
    from fastapi import FastAPI

    from collector.store import Store

    from contextlib import asynccontextmanager

    from starlette.concurrency import run_in_threadpool

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        await run_in_threadpool(server.start_background)
        try:
            yield
        finally:
            await run_in_threadpool(server.close)

    store = Store(config.db)
    app = FastAPI(
        title="tailscope", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json", lifespan=lifespan
    )
    server = Server(config=config, store=store, app=app)

    from tailscope.errors import install_error_handlers

    install_error_handlers(app)

    # --- collector: OTLP/HTTP, OTLP/gRPC, profiler uploads -------------------
    from collector.ingest import Ingest
    from collector.http import make_router as collector_router

    ingest = Ingest(store, config)
    server.parts["ingest"] = ingest
    app.include_router(collector_router(ingest, config))
    if config.grpc_port:
        from collector.grpc_server import GrpcReceiver

        server.parts["grpc"] = GrpcReceiver(ingest, config)

    # --- retention and the SQL console -------------------------------------
    from collector.retention import Retention
    from collector.sql import make_router as sql_router

    if config.retention_hours:
        server.parts["retention"] = Retention(store, config.retention_hours)
    app.include_router(sql_router(store, config))

    # --- analyzer API ------------------------------------------------------
    from analyzer.api import make_router as analyzer_router
    from analyzer.service import Analyzer

    analyzer = Analyzer(store, config)
    server.parts["analyzer"] = analyzer
    app.include_router(analyzer_router(analyzer))

    # --- alerts ------------------------------------------------------------
    from analyzer.alerts.api import make_router as alerts_router
    from analyzer.alerts.service import AlertService

    alerts = AlertService(config, analyzer)
    alerts.register_metrics(ingest.metrics)
    server.parts["alerts"] = alerts
    # Alert configuration can make the server send requests (webhooks), so when
    # tokens are configured, changing it needs one, like ingest does.
    from fastapi import Depends

    from collector.auth import BearerAuth, changes_need_token

    guard = changes_need_token(BearerAuth(config.tokens))
    app.include_router(alerts_router(alerts), dependencies=[Depends(guard)])

    # --- dashboard ---------------------------------------------------------
    if config.dashboard:
        from dashboard.app import mount as mount_dashboard

        mount_dashboard(app, analyzer=analyzer, store=store, config=config)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "db": str(Path(config.db)), "schema_version": store.schema_version,
                "decoder": ingest.decoder.active}

    return server
