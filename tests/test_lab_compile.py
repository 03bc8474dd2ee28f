"""Real torch.compile in the lab: a new padded shape really recompiles, and the
compile span reaches the real server with dynamo's own guard-failure reason."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")

from lab.model import Executor, build_model, compile_limit, restore_compile_limit  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    prev = compile_limit(64)
    threads = torch.get_num_threads()
    yield
    restore_compile_limit(prev)
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def wait_rows(srv: Any, query: str, want: Callable[[list[tuple]], bool], timeout_s: float = 30.0) -> list[tuple]:
    deadline = time.monotonic() + timeout_s
    rows = srv.sql(query)
    while not want(rows) and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = srv.sql(query)
    return rows


def test_weights_come_from_the_seed() -> None:
    a, b, c = build_model(0), build_model(0), build_model(1)
    assert torch.equal(a.tok.weight, b.tok.weight)
    assert not torch.equal(a.tok.weight, c.tok.weight)


def test_a_new_padded_length_recompiles_and_a_seen_one_does_not() -> None:
    ex = Executor(build_model(0), "test-replica", backend="eager")
    first = ex.run(8, 32)
    assert first.compile is not None and first.compile.kind == "first"
    again = ex.run(8, 32)
    assert again.compile is None
    new = ex.run(8, 64)
    assert new.compile is not None
    assert new.compile.kind == "recompile"
    assert "size mismatch at index 1" in new.compile.reason and "32" in new.compile.reason and "64" in new.compile.reason
    assert new.compile.seconds > 0
    assert new.compile.shape == (8, 64)


def test_replicas_compile_independently_and_restart_starts_cold() -> None:
    model = build_model(0)
    a, b = Executor(model, "replica-a"), Executor(model, "replica-b")
    assert a.run(8, 32).compile is not None
    assert b.run(8, 32).compile is not None  # its own code object: its own cache
    assert a.run(8, 32).compile is None
    a.restart()
    assert a.run(8, 32).compile is not None


def test_recompile_becomes_a_compile_span_in_the_real_server(make_server: Any) -> None:
    """The instrumentation's own compile hook, real time: the lab's forward under a batch span."""
    from agents.torch import instrument

    srv = make_server()
    h = instrument("lab-compile", srv.url, instance_id="replica-0", compile_events=True, schedule_delay_s=0.1)
    try:
        ex = Executor(build_model(0), "hooked-replica", backend="eager")
        for k, length in enumerate((32, 32, 48)):
            req = h.start_request(model="tiny-lm", input_tokens=length)
            b = h.start_batch(f"b-{k}", members=[req], size=1, max_len=length, min_len=length, real_tokens=length, padded_tokens=8 * length)
            with h.active(b):
                ex.run(8, length)
            b.end()
            req.end()
        assert h.flush(30)
    finally:
        h.shutdown()
    q = "select compile_kind, compile_reason, compile_shape, compile_backend, parent_span_id from spans where role = 'compile' order by start_time"
    rows = wait_rows(srv, q, lambda r: len(r) >= 2)
    assert [r[0] for r in rows] == ["first", "recompile"]
    kind, reason, shape, backend, parent = rows[1]
    assert "expected 32, actual 48" in reason
    assert json.loads(shape) == [8, 48]
    assert backend == "eager"
    batches = srv.sql("select span_id from spans where role = 'batch' and batch_id = 'b-2'")
    assert parent == batches[0][0]


def test_serving_loop_runs_real_compiles_when_a_window_turns_bucketing_off() -> None:
    """The actual run: every batch's forward really runs (execute_all), and the
    stall a new padded length causes is the compile dynamo really did."""
    from lab.model import CostModel
    from lab.sim import ReplicaSpec, Request, Window, simulate

    cost = CostModel(a=0.0003, b=2e-6, c=1e-8, step={1: 0.0004, 8: 0.0005})
    spec = ReplicaSpec(max_batch=8, buckets=(64, 128), pad_multiple=16, no_bucketing=[Window(10.0, 60.0)])
    times = [1.0, 11.0, 40.0, 80.0]  # the window is long enough for any real compile stall x 10
    rs = [Request(i, t, 40, 3) for i, t in enumerate(times)]
    ex = Executor(build_model(0), "loop-replica")
    run = simulate(0, rs, spec, cost, scale=10.0, executor=ex, execute_all=True)
    shapes = [b.shape for b in run.batches]
    assert shapes == [(8, 64), (8, 48), (8, 48), (8, 64)]  # 40 tokens: bucket 64, or 48 (x16) in the window
    compiled = [b for b in run.batches if b.compile is not None]
    assert [b.shape for b in compiled] == [(8, 48)]  # 64 was warmed before the scenario; 48 is new, once
    c = compiled[0].compile
    assert c.kind == "recompile" and "actual 48" in c.reason
    assert compiled[0].compile_end - compiled[0].compile_start == pytest.approx(c.seconds * 10.0)
    assert run.compile_costs[(8, 48)] == c.seconds
