"""examples/serve_tiny.py runs end to end against the real server."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve_tiny.py"


def _load():
    spec = importlib.util.spec_from_file_location("serve_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait(srv, query, n, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    rows = srv.sql(query)
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = srv.sql(query)
    return rows


@pytest.mark.slow
def test_serve_tiny_example_emits_everything_the_docs_promise(make_server):
    torch._dynamo.reset()
    srv = make_server()
    stats = _load().main(["--endpoint", srv.url, "--requests", "24", "--max-len", "14", "--batch-size", "4",
                          "--kv-blocks", "4", "--instance-id", "example-0"])
    torch._dynamo.reset()
    assert stats["requests"] == 24 and stats["batches"] == 6 and stats["flushed"]
    roles = dict(_wait(srv, "SELECT role, count(*) FROM spans GROUP BY role", 6))
    assert roles["request"] == 24 and roles["batch"] == 6 and roles["model_load"] == 1
    assert roles["prefill"] == 24 and roles["decode"] == 24 and roles["queue"] == 24
    assert roles["compile"] == stats["compile_spans"] >= 2  # new padded lengths recompile
    # every compile span sits under the batch that triggered it
    orphans = srv.sql(
        "SELECT count(*) FROM spans c LEFT JOIN spans b ON c.parent_span_id = b.span_id AND b.role = 'batch' "
        "WHERE c.role = 'compile' AND b.span_id IS NULL"
    )
    assert orphans == [(0,)]
    shapes = [json.loads(r[0]) for r in srv.sql("SELECT compile_shape FROM spans WHERE role = 'compile'")]
    assert all(len(s) == 2 and s[0] == 4 for s in shapes)
    events = dict(_wait(srv, "SELECT event_name, count(*) FROM logs GROUP BY event_name", 2))
    assert events["tailscope.replica.ready"] == 1 and events["tailscope.kv.eviction"] == stats["evictions"] > 0
    assert _wait(srv, "SELECT value FROM metrics WHERE name = 'tailscope.kv.usage'", 1)
