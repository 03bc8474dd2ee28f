"""torch.compile compile spans, end to end: real torch.compile on CPU, the real
OTLP exporter, the real server on loopback, read back through /api/v1/sql.

The model is compiled with ``dynamic=False`` so that every new sequence length
is a guard failure and a recompile (60-80 ms each with the eager backend).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")

from agents.torch import instrument  # noqa: E402
from agents.torch import compile_events  # noqa: E402

COMPILE_COLS = (
    "span_id, parent_span_id, trace_id, compile_kind, compile_reason, compile_frame, "
    "compile_shape, compile_cache, compile_backend, duration_ms, service_instance_id"
)


class Tiny(torch.nn.Module):
    """Linear + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def wait_rows(srv: Any, query: str, want: Callable[[list[tuple]], bool], timeout_s: float = 20.0) -> list[tuple]:
    """Poll the SQL endpoint until ``want(rows)``: the server commits ingest asynchronously."""
    deadline = time.monotonic() + timeout_s
    rows = srv.sql(query)
    while not want(rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = srv.sql(query)
    return rows


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts from an empty compile cache (and leaves none behind)."""
    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


@pytest.fixture
def handles():
    made = []

    def factory(**kwargs: Any):
        kwargs.setdefault("schedule_delay_s", 0.1)
        h = instrument(**kwargs)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.shutdown()


@pytest.mark.slow  # the first torch.compile of the session warms dynamo up: ~5-12 s on 2 cores
def test_recompiles_on_new_lengths_become_compile_spans_under_their_requests(make_server, handles):
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-0")
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    stalls: dict[str, float] = {}  # request span id -> stall seen by the caller, ms
    requests: dict[int, str] = {}
    for length in (10, 11, 12, 10, 11):
        x = torch.randn(2, length, 16)
        with h.request(model="tiny", input_tokens=length) as req:
            t0 = time.perf_counter()
            model(x)
            stalls[req.span_id] = (time.perf_counter() - t0) * 1000
        requests.setdefault(length, req.span_id)
    assert h.flush(10)

    rows = wait_rows(
        srv,
        f"SELECT {COMPILE_COLS} FROM spans WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 3,
    )
    assert len(rows) == 3, rows  # the repeats of 10 and 11 hit the cache: no compile
    by_parent = {r[1]: r for r in rows}
    assert set(by_parent) == {requests[10], requests[11], requests[12]}

    first, re11, re12 = by_parent[requests[10]], by_parent[requests[11]], by_parent[requests[12]]
    assert first[3] == "first" and first[4] is None
    assert re11[3] == "recompile"
    assert re11[4] == "tensor 'x' size mismatch at index 1. expected 10, actual 11"
    assert re12[3] == "recompile"
    assert re12[4] == "tensor 'x' size mismatch at index 1. expected 11, actual 12"
    for row, length in ((first, 10), (re11, 11), (re12, 12)):
        assert row[5] == "forward"
        assert json.loads(row[6]) == [2, length, 16]
        assert row[7] == "miss"  # the eager backend has no persistent cache to hit
        assert row[8] == "eager"
        assert row[10] == "replica-0"

    # Same trace as the request, and inside the request span's time window.
    req_rows = srv.sql(
        "SELECT span_id, trace_id, start_time, end_time FROM spans WHERE role = 'request'"
    )
    req_by_id = {r[0]: r for r in req_rows}
    bounds = srv.sql(
        "SELECT c.span_id, c.start_time >= r.start_time, c.end_time <= r.end_time "
        "FROM spans c JOIN spans r ON c.parent_span_id = r.span_id WHERE c.role = 'compile'"
    )
    assert len(bounds) == 3 and all(b[1] and b[2] for b in bounds), bounds
    for row in rows:
        assert row[2] == req_by_id[row[1]][1]

    # Durations come from torch's own start/end and match the caller's stall:
    # the stall also holds the cache lookup, the failing guard check and the
    # forward itself (~0.2 ms cached), so the compile is a little shorter —
    # never longer (1 ms slack: wall clock vs perf_counter rounding).
    for row in rows:
        stall = stalls[row[1]]
        assert row[9] <= stall + 1.0, (row, stall)
        assert row[9] >= 0.6 * stall, (row, stall)
    # Cached calls had no compile and were fast.
    cached = [s for sid, s in stalls.items() if sid not in by_parent]
    assert len(cached) == 2 and all(s < min(r[9] for r in rows) for s in cached)


def test_compile_inside_active_batch_is_parented_on_the_batch(make_server, handles):
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-1")
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    reqs = [h.start_request(model="tiny", input_tokens=n) for n in (5, 7)]
    batch = h.start_batch("b-1", members=reqs, max_len=7, min_len=5, real_tokens=12, padded_tokens=14)
    with h.active(batch):
        model(torch.randn(2, 7, 16))
    batch.end()
    for r in reqs:
        r.end()
    # No active span: still recorded, as a root span on this instance.
    model(torch.randn(2, 9, 16))
    assert h.flush(10)
    rows = wait_rows(
        srv,
        "SELECT parent_span_id, trace_id, compile_kind, compile_shape FROM spans "
        "WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 2,
    )
    assert rows[0][:3] == (batch.span_id, batch.trace_id, "first")
    assert rows[1][0] is None and rows[1][2] == "recompile"
    assert json.loads(rows[1][3]) == [2, 9, 16]


def test_recompile_limit_fallback_is_its_own_event(make_server, handles):
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-2")
    torch._dynamo.config.recompile_limit = 2
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    with h.request(model="tiny") as req:
        for length in (3, 4, 5, 6):  # the third length exceeds the limit: eager from then on
            model(torch.randn(1, length, 16))
    assert h.flush(10)
    events = wait_rows(
        srv,
        "SELECT event_name, trace_id, span_id, attributes, severity_text FROM logs "
        "WHERE event_name = 'tailscope.compile.limit_hit'",
        lambda r: len(r) >= 1,
    )
    assert len(events) == 1, events
    name, trace_id, span_id, attrs, severity = events[0]
    attrs = json.loads(attrs) if isinstance(attrs, str) else attrs
    assert (trace_id, span_id) == (req.trace_id, req.span_id)
    assert attrs["tailscope.compile.frame"] == "forward"
    assert attrs["tailscope.compile.limit"] == 2
    assert attrs["tailscope.compile.limit_type"] == "recompile_limit"
    assert "size mismatch at index 1. expected 4, actual 5" in attrs["tailscope.compile.reason"]
    assert severity == "WARN"
    # Only the two real compiles are compile spans; the refused attempt is not.
    kinds = wait_rows(
        srv, "SELECT compile_kind FROM spans WHERE role = 'compile' ORDER BY start_time", lambda r: len(r) >= 2
    )
    assert [k[0] for k in kinds] == ["first", "recompile"]


def test_survives_dynamo_reset_and_keeps_torch_logging_quiet(make_server, handles, capfd):
    """``torch._dynamo.reset()`` clears torch's compile callbacks; the hooks come back."""
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-3")
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    with h.request() as a:
        model(torch.randn(1, 3, 16))
    torch._dynamo.reset()
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    with h.request() as b:
        model(torch.randn(1, 4, 16))
    assert h.flush(10)
    rows = wait_rows(
        srv,
        "SELECT parent_span_id, compile_backend, compile_shape FROM spans WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 2,
    )
    assert [(r[0], r[1]) for r in rows] == [(a.span_id, "eager"), (b.span_id, "eager")]
    assert json.loads(rows[1][2]) == [1, 4, 16]
    # Lowering torch._utils_internal to INFO must not print torch's INFO records.
    err = capfd.readouterr().err
    assert "CompilationMetrics" not in err and "_utils_internal" not in err


def test_log_path_off_falls_back_to_polling_compilation_metrics(make_server, handles):
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-4")
    model = torch.compile(Tiny(), backend="eager", dynamic=False)
    with torch._dynamo.config.patch(log_compilation_metrics=False):
        with h.request() as a:
            model(torch.randn(1, 3, 16))
        with h.request() as b:
            model(torch.randn(1, 5, 16))
    assert h.flush(10)  # polls the last record, which no later compile picked up
    rows = wait_rows(
        srv,
        "SELECT parent_span_id, compile_kind, compile_reason FROM spans WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 2,
    )
    assert [(r[0], r[1]) for r in rows] == [(a.span_id, "first"), (b.span_id, "recompile")]
    assert rows[1][2] == "tensor 'x' size mismatch at index 1. expected 3, actual 5"


def test_two_handles_in_one_process_each_get_their_own_threads_compiles(make_server, handles):
    srv = make_server()
    h0 = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-a")
    h1 = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-b")
    m0 = torch.compile(Tiny(), backend="eager", dynamic=False)
    m1 = torch.compile(Tiny(), backend="eager", dynamic=False)
    results: dict[str, str] = {}

    def serve(h, model, name, length):
        with h.request(model="tiny") as req:
            model(torch.randn(1, length, 16))
        results[name] = req.span_id

    threads = [
        threading.Thread(target=serve, args=(h0, m0, "a", 6)),
        threading.Thread(target=serve, args=(h1, m1, "b", 8)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert h0.flush(10) and h1.flush(10)
    rows = wait_rows(
        srv,
        "SELECT service_instance_id, parent_span_id, compile_shape FROM spans WHERE role = 'compile' "
        "ORDER BY service_instance_id",
        lambda r: len(r) >= 2,
    )
    assert [(r[0], r[1], json.loads(r[2])) for r in rows] == [
        ("replica-a", results["a"], [1, 6, 16]),
        ("replica-b", results["b"], [1, 8, 16]),
    ]


@pytest.mark.slow
def test_inductor_compile_span_cold_then_warm_persistent_cache(make_server, handles, tmp_path, monkeypatch):
    """One inductor case: backend name and the cache hit/miss come from the real record.

    A fresh inductor cache directory: the first compile misses; after
    ``torch._dynamo.reset()`` (as in a restarted replica) the same graph is
    served from the on-disk FX graph cache: ``hit``, and shorter.
    """
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-5")
    stalls = []
    for _ in range(2):
        torch._dynamo.reset()
        model = torch.compile(Tiny(), backend="inductor", dynamic=False)
        with h.request() as req:
            t0 = time.perf_counter()
            model(torch.randn(2, 10, 16))
            stalls.append((req.span_id, (time.perf_counter() - t0) * 1000))
    assert h.flush(10)
    rows = wait_rows(
        srv,
        "SELECT parent_span_id, compile_backend, compile_kind, compile_cache, duration_ms FROM spans "
        "WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 2,
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [(stalls[0][0], "inductor", "first"), (stalls[1][0], "inductor", "first")]
    assert [r[3] for r in rows] == ["miss", "hit"]
    assert rows[1][4] < rows[0][4]
    for (_, stall_ms), row in zip(stalls, rows):
        assert 0.6 * stall_ms <= row[4] <= stall_ms + 1.0


def test_watcher_unhooks_torch_when_the_last_handle_shuts_down(make_server):
    before = logging.getLogger(compile_events.METRICS_LOGGER).level
    h = instrument(service="x", endpoint=make_server().url, compile_events=True)
    logger = logging.getLogger(compile_events.METRICS_LOGGER)
    assert any(isinstance(f, compile_events._Filter) for f in logger.filters)
    h.shutdown()
    assert not any(isinstance(f, compile_events._Filter) for f in logger.filters)
    assert logger.level == before
    from torch._dynamo.callback import callback_handler

    w = compile_events.watcher()
    assert w._on_start not in callback_handler.start_callbacks


def test_torch_set_logs_after_instrument_still_records(make_server, handles):
    """``torch._logging.set_logs`` resets torch's logger levels; polling still finds the records."""
    srv = make_server()
    h = handles(service="tiny-api", endpoint=srv.url, instance_id="replica-6")
    torch._logging.set_logs(dynamo=logging.WARNING)
    try:
        model = torch.compile(Tiny(), backend="eager", dynamic=False)
        with h.request() as a:
            model(torch.randn(1, 3, 16))
        with h.request() as b:
            model(torch.randn(1, 6, 16))
        assert h.flush(10)
    finally:
        torch._logging.set_logs()
    rows = wait_rows(
        srv,
        "SELECT parent_span_id, compile_kind, compile_shape FROM spans WHERE role = 'compile' ORDER BY start_time",
        lambda r: len(r) >= 2,
    )
    assert [(r[0], r[1], json.loads(r[2])) for r in rows] == [
        (a.span_id, "first", [1, 3, 16]),
        (b.span_id, "recompile", [1, 6, 16]),
    ]
