"""How long each dashboard page takes to render over a big store.

Builds (once, in SQL) a DuckDB store with ``--requests`` request spans spread
over 24 hours — each with queue/prefill/decode children, batches, a compile
storm, provider calls and GPU gauges every 15 s — then renders every page
through the same function the routing callback calls, for the last 24 hours
and the last hour, and prints JSON:

    {"spans": ..., "metric_points": ..., "pages": {"overview": {"24h_ms": ..., "1h_ms": ...}, ...}}

Usage: ``python benchmarks/dashboard_pages.py [--requests 1000000] [--db PATH] [--repeat 2]``
(the first render of a range includes the analyzer's cold cache; the figure
reported is the median of ``--repeat`` renders after one warm-up).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(db: Path, requests: int, now: dt.datetime) -> dict[str, int]:
    from collector.store import Store

    store = Store(db)
    start = (now - dt.timedelta(hours=24)).replace(tzinfo=None)
    secs = 24 * 3600
    sql = [
        # Requests: 3 services, 8 replicas on 2 hosts x 4 GPUs, lognormal lengths and latencies.
        f"""
        CREATE TEMP TABLE r AS
        SELECT i,
               lpad(format('{{:x}}', i), 32, '0') AS trace_id,
               lpad(format('{{:x}}', i), 16, '0') AS span_id,
               TIMESTAMP '{start:%Y-%m-%d %H:%M:%S}' + to_microseconds(CAST(i * {secs}e6 / {requests} AS BIGINT)) AS t0,
               ['chat-api', 'chat-api', 'embed-api', 'rerank'][1 + i % 4] AS service,
               'replica-' || (i % 8) AS instance,
               'gpu-node-' || (i % 8 // 4) AS host,
               CAST(i % 4 AS INTEGER) AS gpu,
               CAST(greatest(8, exp(4.2 + 0.8 * sqrt(-2 * ln(random() + 1e-9)) * cos(6.283 * random()))) AS BIGINT) AS input_tokens,
               CAST(8 + random() * 120 AS BIGINT) AS output_tokens,
               5 + random() * 30 AS queue_ms,
               'b' || (i // 4) AS batch_id
        FROM range({requests}) t(i)
        """,
        """
        INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, start_time, end_time, duration_ms,
                           service_name, service_instance_id, host_name, role, model, input_tokens, output_tokens,
                           shape_len, batch_id, gpu_index)
        SELECT trace_id, span_id, NULL, 'POST /v1/chat/completions', 'SERVER', t0,
               t0 + to_microseconds(CAST((queue_ms + 0.05 * input_tokens + 14 * output_tokens) * 1000 AS BIGINT)),
               queue_ms + 0.05 * input_tokens + 14 * output_tokens,
               service, instance, host, 'request', 'llama-3-8b', input_tokens, output_tokens,
               CAST(pow(2, ceil(log2(input_tokens))) AS BIGINT), batch_id, gpu
        FROM r
        """,
        """
        INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, start_time, end_time, duration_ms,
                           service_name, service_instance_id, host_name, role)
        SELECT trace_id, lpad(format('{:x}', i * 4 + k), 16, 'f'), span_id, stage, 'INTERNAL',
               t0 + to_microseconds(CAST(off_ms * 1000 AS BIGINT)),
               t0 + to_microseconds(CAST((off_ms + d_ms) * 1000 AS BIGINT)), d_ms,
               service, instance, host, stage
        FROM (
            SELECT r.*, k, ['queue', 'prefill', 'decode'][k] AS stage,
                   [0, queue_ms, queue_ms + 0.05 * input_tokens][k] AS off_ms,
                   [queue_ms, 0.05 * input_tokens, 14 * output_tokens][k] AS d_ms
            FROM r, range(1, 4) s(k)
        )
        """,
        """
        INSERT INTO spans (trace_id, span_id, name, kind, start_time, end_time, duration_ms, service_name,
                           service_instance_id, host_name, role, batch_id, batch_size, batch_max_len, batch_min_len,
                           batch_real_tokens, batch_padded_tokens, batch_wait_s)
        SELECT 'b' || lpad(format('{:x}', min(i)), 31, '0'), lpad(format('{:x}', min(i)), 16, 'b'), 'forward_batch', 'INTERNAL',
               min(t0), max(t0) + INTERVAL 1 SECOND, 1000, any_value(service), any_value(instance), any_value(host), 'batch',
               batch_id, count(*), max(input_tokens), min(input_tokens), sum(input_tokens),
               count(*) * max(CAST(pow(2, ceil(log2(input_tokens))) AS BIGINT)), random() * 0.02
        FROM r GROUP BY batch_id
        """,
        # A compile storm on replica-3 three hours ago.
        f"""
        INSERT INTO spans (trace_id, span_id, name, kind, start_time, end_time, duration_ms, service_name,
                           service_instance_id, host_name, role, compile_kind, compile_reason, compile_shape)
        SELECT lpad(format('{{:x}}', 900000000 + k), 32, 'c'), lpad(format('{{:x}}', k), 16, 'c'), 'torch.compile', 'INTERNAL',
               TIMESTAMP '{(now - dt.timedelta(hours=3)).replace(tzinfo=None):%Y-%m-%d %H:%M:%S}' + to_seconds(k * 20),
               TIMESTAMP '{(now - dt.timedelta(hours=3)).replace(tzinfo=None):%Y-%m-%d %H:%M:%S}' + to_seconds(k * 20 + 3), 3000,
               'chat-api', 'replica-3', 'gpu-node-0', 'compile', 'recompile',
               'tensor ''x'' size mismatch at index 1. expected ' || (60 + k) || ', actual ' || (61 + k), '[1, ' || (61 + k) || ']'
        FROM range(40) t(k)
        """,
        # GPU gauges every 15 s for 8 GPUs.
        f"""
        INSERT INTO metrics (time, name, type, value, host_name, gpu_index, point_pid)
        SELECT TIMESTAMP '{start:%Y-%m-%d %H:%M:%S}' + to_seconds(s * 15), m, 'gauge',
               CASE m WHEN 'tailscope.gpu.utilization' THEN random()
                      WHEN 'tailscope.gpu.memory.used' THEN 5e10 + random() * 1e10
                      WHEN 'tailscope.gpu.memory.total' THEN 8.5e10
                      WHEN 'tailscope.gpu.sm_clock' THEN 1950 + random() * 30
                      WHEN 'tailscope.gpu.sm_clock.max' THEN 1980
                      WHEN 'tailscope.gpu.power' THEN 400 + random() * 250
                      WHEN 'tailscope.gpu.power.limit' THEN 700
                      WHEN 'tailscope.gpu.temperature' THEN 60 + random() * 10
                      WHEN 'tailscope.gpu.clock_event_reasons' THEN CASE WHEN random() < 0.01 THEN 4 ELSE 0 END
                      ELSE 5e10 END,
               'gpu-node-' || (g // 4), CAST(g % 4 AS INTEGER),
               CASE WHEN m = 'tailscope.gpu.process.memory.used' THEN 4000 + g END
        FROM range({secs // 15}) a(s), range(8) b(g),
             (SELECT unnest(['tailscope.gpu.utilization', 'tailscope.gpu.memory.used', 'tailscope.gpu.memory.total',
                             'tailscope.gpu.sm_clock', 'tailscope.gpu.sm_clock.max', 'tailscope.gpu.power',
                             'tailscope.gpu.power.limit', 'tailscope.gpu.temperature', 'tailscope.gpu.clock_event_reasons',
                             'tailscope.gpu.process.memory.used']) AS m)
        """,
    ]
    for statement in sql:
        store.execute_write(statement)
    store.checkpoint()
    cur = store.cursor()
    spans = cur.execute("SELECT count(*) FROM spans").fetchone()[0]
    points = cur.execute("SELECT count(*) FROM metrics").fetchone()[0]
    cur.close()
    store.close()
    return {"spans": int(spans), "metric_points": int(points)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=None, help="reuse/keep the store here (built if missing)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from analyzer.service import Analyzer
    from collector.store import Store
    from dashboard.app import render_page
    from tailscope.config import load

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "bench.duckdb"
    built: dict[str, object] = {}
    if not db.exists():
        t = time.perf_counter()
        built = build(db, args.requests, now)
        built["build_s"] = round(time.perf_counter() - t, 1)
    store = Store(db, read_only=True)
    config = load({"db": str(db)}, environ={})
    analyzer = Analyzer(store, config)
    cur = store.cursor()
    newest = cur.execute("SELECT max(start_time) FROM spans").fetchone()[0]
    built["spans"] = int(cur.execute("SELECT count(*) FROM spans").fetchone()[0])
    built["metric_points"] = int(cur.execute("SELECT count(*) FROM metrics").fetchone()[0])
    cur.close()
    now = newest.replace(tzinfo=dt.timezone.utc) + dt.timedelta(seconds=1)

    pages = ["", "gpus", "shapes", "batching", "hours", "sql"]
    out: dict[str, dict[str, float]] = {}
    for page in pages:
        name = page or "overview"
        out[name] = {}
        for rng in ("24h", "1h"):
            times = []
            for i in range(args.repeat + 1):
                t = time.perf_counter()
                component = render_page("/dashboard/" + page, f"?range={rng}", analyzer=analyzer, store=store, config=config, now=now)
                elapsed = (time.perf_counter() - t) * 1000
                if "ts-error" in str(component):
                    raise SystemExit(f"{name} {rng} rendered an error: {component}")
                if i == 0:
                    out[name][f"{rng}_cold_ms"] = round(elapsed, 1)
                else:
                    times.append(elapsed)
            out[name][f"{rng}_ms"] = round(statistics.median(times), 1)
    # The overview's slowest-requests table is a second callback (after the page shows).
    from dashboard.app import overview_slow_callback

    out["overview_slow_requests"] = {}
    for rng in ("24h", "1h"):
        t = time.perf_counter()
        overview_slow_callback(f"?range={rng}", analyzer=analyzer, store=store, config=config, now=now)
        out["overview_slow_requests"][f"{rng}_cold_ms"] = round((time.perf_counter() - t) * 1000, 1)
    print(json.dumps({"requests": args.requests, **built, "pages": out}, indent=2))
    store.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
