"""Shared fixtures: real servers on loopback, a clean environment, the shared data.

Tests start the real app (datasette's ``make_app_client`` pattern): a real
DuckDB file under ``tmp_path`` and a real uvicorn server on a free port.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees TAILSCOPE_* or OTEL_* settings from the machine it runs on."""
    for key in list(os.environ):
        if key.startswith(("TAILSCOPE_", "OTEL_")):
            monkeypatch.delenv(key, raising=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real server on loopback: ``url``, ``port``, ``grpc_port``, ``server`` (parts, store)."""

    def __init__(self, server: Any, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.grpc_port = server.config.grpc_port

    @property
    def store(self) -> Any:
        return self.server.store

    def sql(self, query: str) -> list[tuple]:
        """Read through the public SQL endpoint, as a user would."""
        import httpx

        r = httpx.post(self.url + "/api/v1/sql", json={"sql": query}, timeout=30)
        assert r.status_code == 200, r.text
        return [tuple(row) for row in r.json()["rows"]]

    def stop(self) -> None:
        self.server.shutdown_thread()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory: ``make_server(**settings)`` starts a real server; stopped at teardown."""
    from tailscope.config import load
    from tailscope.server import build_server

    started: list[RunningServer] = []

    def factory(**settings: Any) -> RunningServer:
        settings.setdefault("db", str(tmp_path / f"store{len(started)}.duckdb"))
        settings.setdefault("port", 0)
        settings.setdefault("grpc_port", 0)
        settings.setdefault("dashboard", False)
        server = build_server(load(settings, environ={}))
        port = server.serve_in_thread()
        running = RunningServer(server, port)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared test data is missing: expected {SHARED_DATA} beside the repo")
    return SHARED_DATA
