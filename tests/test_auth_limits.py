"""Auth, size limits and bad input on the OTLP/HTTP endpoints: right status, clear message, server stays up, nothing lost."""

from __future__ import annotations

import gzip
import socket
import time

import httpx
import pytest

from ingest_payloads import request_spans

PB = {"content-type": "application/x-protobuf"}


def _post(srv, body: bytes, headers: dict[str, str] | None = None, signal: str = "traces") -> httpx.Response:
    return httpx.post(srv.url + f"/v1/{signal}", content=body, headers={**PB, **(headers or {})}, timeout=15)


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["ok"] is False and body["status"] == status and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


def test_open_when_no_tokens(make_server):
    srv = make_server()
    req, _ = request_spans(3)
    assert _post(srv, req.SerializeToString()).status_code == 200
    assert _post(srv, req.SerializeToString(), {"authorization": "Bearer whatever"}).status_code in (200,)


def test_bearer_token_required_when_configured(make_server):
    srv = make_server(tokens="tok-a,tok-b")
    req, ids = request_spans(4)
    body = req.SerializeToString()
    assert "missing bearer token" in _error(_post(srv, body), 401)
    r = _post(srv, body, {"authorization": "Bearer wrong"})
    assert "invalid bearer token" in _error(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    _error(_post(srv, body, {"authorization": "Basic dG9rLWE6"}), 401)
    _error(_post(srv, body, {"authorization": "Bearer"}), 401)
    assert srv.sql("SELECT count(*) FROM spans") == [(0,)]
    assert _post(srv, body, {"authorization": "Bearer tok-b"}).status_code == 200
    assert _post(srv, request_spans(2)[0].SerializeToString(), {"authorization": "bearer tok-a"}).status_code == 200
    assert srv.sql("SELECT count(*) FROM spans") == [(6,)]
    # The profiler upload is ingest too: same token rule.
    r = httpx.post(srv.url + "/api/v1/profiler-traces?filename=t.json", content=b'{"traceEvents": []}', timeout=10)
    _error(r, 401)


def test_declared_body_over_limit_is_413_before_reading(make_server):
    srv = make_server(max_body_bytes=50_000)
    req, _ = request_spans(400)
    body = req.SerializeToString()
    assert len(body) > 50_000
    assert "over the limit" in _error(_post(srv, body), 413)


def test_streamed_body_over_limit_is_413(make_server):
    """Chunked upload without Content-Length: the cap applies while reading."""
    srv = make_server(max_body_bytes=50_000)

    def chunks():
        for _ in range(100):
            yield b"\x00" * 4096

    r = httpx.post(srv.url + "/v1/traces", content=chunks(), headers=PB, timeout=15)
    _error(r, 413)
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


def test_gzip_bomb_is_refused(make_server):
    srv = make_server(max_body_bytes=1_000_000)
    bomb = gzip.compress(b"\x00" * 50_000_000, compresslevel=9)
    assert len(bomb) < 1_000_000
    assert "limit" in _error(_post(srv, bomb, {"content-encoding": "gzip"}), 413)
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


def test_bad_input_gets_clear_errors_and_accepted_data_survives(make_server):
    srv = make_server()
    req, ids = request_spans(20)
    good = req.SerializeToString()
    assert _post(srv, good).status_code == 200

    _error(_post(srv, b"\x0a\xff\xff\xff\xff\x0f garbage that is not protobuf"), 400)
    _error(_post(srv, good[: len(good) // 2]), 400)  # truncated protobuf
    _error(_post(srv, b'{"resourceSpans": 5}', {"content-type": "application/json"}), 400)  # JSON, not OTLP
    _error(_post(srv, b"{not json", {"content-type": "application/json"}), 400)
    _error(_post(srv, good, {"content-encoding": "gzip"}), 400)  # claims gzip, is not
    _error(_post(srv, good, {"content-encoding": "br"}), 400)
    _error(_post(srv, good, {"content-type": "text/plain"}), 415)
    # Deeply nested JSON must not crash the decoder (RecursionError → 400).
    deep = b'{"resourceSpans": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    r = _post(srv, deep, {"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text

    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
    assert {r[0] for r in srv.sql("SELECT span_id FROM spans")} == set(ids)
    # And it still takes data.
    assert _post(srv, request_spans(5)[0].SerializeToString()).status_code == 200
    assert srv.sql("SELECT count(*) FROM spans") == [(25,)]


def test_client_that_hangs_up_mid_body_does_not_hurt(make_server):
    srv = make_server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 100000\r\n\r\n"
            + b"\x0a" * 1000
        )
    req, ids = request_spans(3)
    assert _post(srv, req.SerializeToString()).status_code == 200
    assert {r[0] for r in srv.sql("SELECT span_id FROM spans")} == set(ids)
    # The abandoned request is counted as a client error, not a server error.
    for _ in range(100):
        text = httpx.get(srv.url + "/metrics", timeout=5).text
        if 'status="400"' in text:
            break
        time.sleep(0.05)  # the server notices the hang-up asynchronously; bounded poll
    assert 'transport="http",status="400"' in text and 'status="500"' not in text


def test_bad_content_length(make_server):
    srv = make_server()
    for length in ("abc", "-5"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode())
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400"), reply
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_fuzzed_bodies_never_get_a_500(make_server):
    """Random mutations of a valid request: every answer is 200 or a 4xx with a message, never a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    srv = make_server(flush_interval_ms=1)
    req, _ = request_spans(20)
    valid = req.SerializeToString()
    seen: dict[int, int] = {}

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        cuts=st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=8),
        truncate=st.one_of(st.none(), st.integers(0, len(valid))),
        ctype=st.sampled_from(["application/x-protobuf", "application/json"]),
    )
    def check(cuts, truncate, ctype):
        body = bytearray(valid)
        for pos, byte in cuts:
            body[pos] = byte
        if truncate is not None:
            body = body[:truncate]
        r = httpx.post(srv.url + "/v1/traces", content=bytes(body), headers={"content-type": ctype}, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400), (r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]

    check()
    assert seen.get(400, 0) > 0
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
    assert srv.sql("SELECT count(*) FROM spans WHERE trace_id IS NULL OR span_id IS NULL") == [(0,)]


def test_alert_configuration_changes_need_the_token_when_tokens_are_set(make_server):
    """Webhooks make the server send requests: with auth on, only token holders may add them."""
    srv = make_server(tokens=("s3cret",))
    body = {"url": "http://127.0.0.1:9/hook", "secret": "k", "format": "generic"}
    r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json=body, timeout=10)
    assert r.status_code == 401 and r.json()["ok"] is False
    r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert r.status_code == 201, r.text
    assert httpx.get(srv.url + "/api/v1/alerts/webhooks", timeout=10).status_code == 200
