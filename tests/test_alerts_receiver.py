"""A real HTTP webhook receiver on loopback, shared by the alerts tests.

``Receiver`` runs ``http.server`` in a thread, records every POST (path,
headers, body) and answers from a script (e.g. ``[500, 500]`` then 200, or a
redirect). The tests at the bottom check the receiver itself.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    late: bool = False  # answered after a delay (the client may have given up)
    at: float = 0.0  # wall-clock unix time it arrived

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


class Receiver:
    """Loopback HTTP server recording POSTs.

    Args:
        script: responses to give first, in order: an int status,
            ``("redirect", status, location)`` or ``("delay", status, seconds)``
            (answer late, to trip a client timeout); afterwards ``default_status``.
    """

    def __init__(self, script: list[Any] | None = None, default_status: int = 200) -> None:
        self.script: list[Any] = list(script or [])
        self.default_status = default_status
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with receiver._cond:
                    action = receiver.script.pop(0) if receiver.script else receiver.default_status
                    status = action[1] if isinstance(action, tuple) else int(action)
                    late = isinstance(action, tuple) and action[0] == "delay"
                    receiver.received.append(Received(self.path, dict(self.headers.items()), body, status, late, time.time()))
                    receiver._cond.notify_all()
                if isinstance(action, tuple) and action[0] == "delay":
                    time.sleep(float(action[2]))
                try:
                    self.send_response(status)
                    if isinstance(action, tuple) and action[0] == "redirect":
                        self.send_header("Location", action[2])
                    self.send_header("Content-Type", "application/json")
                    payload = b'{"ok": true}' if status < 300 else b'{"ok": false}'
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-receiver", daemon=True)
        self._thread.start()

    def ok(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300 and not r.late]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 30.0) -> list[Received]:
        """Block until ``predicate(received)`` holds; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.received)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver: condition not met in {timeout}s; got {[(r.path, r.status) for r in self.received]}")
                self._cond.wait(min(left, 0.2))
            return list(self.received)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def test_receiver_scripts_responses_then_defaults() -> None:
    r = Receiver([500, ("redirect", 307, "/elsewhere")])
    try:
        codes = [httpx.post(r.url + "/hook", content=b"{}", follow_redirects=False).status_code for _ in range(3)]
        assert codes == [500, 307, 200]
        assert [x.status for x in r.received] == [500, 307, 200]
        assert len(r.ok()) == 1 and r.ok()[0].path == "/hook"
    finally:
        r.close()
