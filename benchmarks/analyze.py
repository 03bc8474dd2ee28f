"""Analyzer speed over 1 M / 3 M / 10 M request spans (24 h), cold and warm. Prints JSON.

A fast synthetic generator writes the store with DuckDB ``INSERT … SELECT``
from ``range()``: request spans with queue/prefill/decode stage spans (so 4
spans per request), GPU samples every 10 s for 16 GPUs, and three injected
causes (a compile-stall storm on one replica, a throttled GPU, a load surge).
Stores are kept under --dir and reused when they already hold the right
number of requests (generating 10 M takes minutes).

    .venv/bin/python benchmarks/analyze.py --sizes 1000000,3000000,10000000

"cold" = the first call on a freshly opened store (DuckDB's buffer pool
empty; the OS page cache may be warm), "warm" = the same call again with the
analyzer's result cache off (DuckDB buffers hot), "cached" = with the
analyzer's result cache on (what a dashboard refresh of unchanged data gets).
Cold and warm compute everything (``Analyzer.incremental`` off: no kept
windows or spike thresholds of ``analyzer/windows.py``, no kept explanations
of ``analyzer/changes.py``). "refresh" is what a live dashboard refresh or an
alert evaluation pays: on a copy of the store, after each call ten seconds of
new requests land in the last minute (the result cache is then stale), and
the incident list is asked again, reusing what no write touched
("refresh_s") and, alternately, computing everything ("refresh_all_windows_s").
With --repeat N every figure is the median of N measurements (each on a
freshly opened store), the spread is kept under "runs_s". "warm_cpu_s" is the
CPU time of the whole process during the warm call: steadier than wall time
on a shared machine whose speed moves between sittings (on 2 cores, wall time
is at least about half of it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.store import Store  # noqa: E402

T0 = "TIMESTAMP '2026-11-20 00:00:00'"
INSTANCES = 16
DAY_S = 86_400


def surge(n: int) -> int:
    return int(n * 300 / DAY_S * 0.6)


def _gen_sql(n: int) -> str:
    """One row per request with every derived field, pseudo-random but reproducible (hash of i)."""
    u = lambda k: f"((hash(i * 7919 + {k}) % 1000003) / 1000003.0 + 0.0000005)"  # noqa: E731
    z = lambda a, b: f"(sqrt(-2 * ln({u(a)})) * cos(2 * pi() * {u(b)}))"  # noqa: E731
    return f"""
    CREATE OR REPLACE TEMP TABLE gen AS
    WITH ids AS (
        SELECT i, i * {DAY_S}.0 / {n} AS t FROM range({n}) r(i)
        UNION ALL  -- the surge: 60 % more arrivals between 18:00 and 18:05
        SELECT {n} + j AS i, 64800 + j * 300.0 / {surge(n)} AS t FROM range({surge(n)}) r(j)
    ),
    base AS (
        SELECT i, t,
            CAST(i % {INSTANCES} AS INTEGER) AS inst,
            CAST(least(4000, greatest(8, exp(ln(300) + 0.8 * {z(1, 2)}))) AS BIGINT) AS inp,
            CAST(least(800, greatest(4, exp(ln(80) + 0.7 * {z(3, 4)}))) AS BIGINT) AS outp,
            -ln({u(5)}) * 4.0 * exp(0.8 * {z(6, 7)}) AS q_ms,
            exp(0.45 * {z(8, 9)}) AS noise,
            exp(0.2 * {z(10, 11)}) AS pnoise
        FROM ids
    ),
    inj AS (
        SELECT *,
            -- a compile-stall storm on replica 3 from 05:00 to 05:05 (3 s stalls every 20 s)
            CASE WHEN inst = 3 AND t >= 18000 AND t < 18300 AND (t - 18000) % 20 < 3
                 THEN (3 - (t - 18000) % 20) * 1000.0 ELSE 0 END AS stall_ms,
            -- GPU 2 of node 1 (instance 10) thermally throttled 12:00-12:05: compute x3
            CASE WHEN inst = 10 AND t >= 43200 AND t < 43500 THEN 3.0 ELSE 1.0 END AS slow_x,
            -- a load surge 18:00-18:05: the queue builds to 4 s
            CASE WHEN t >= 64800 AND t < 65100 THEN (t - 64800) / 300 * 4000.0 ELSE 0 END AS surge_ms
        FROM base
    )
    SELECT i, inst, inp, outp,
        {T0} + to_microseconds(CAST(t * 1e6 AS BIGINT)) AS ts,
        q_ms + stall_ms + surge_ms AS queue_ms,
        (5 + 0.04 * inp) * pnoise * slow_x AS prefill_ms,
        6.0 * outp * noise * slow_x AS decode_ms
    FROM inj
    """


def generate(path: Path, n: int) -> dict[str, Any]:
    t = time.perf_counter()
    store = Store(path)
    con = store.cursor()
    con.execute("SET preserve_insertion_order = false")
    con.execute(_gen_sql(n))
    con.execute(f"""
        INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, start_time, end_time, duration_ms,
            service_name, service_instance_id, host_name, process_pid, role, model, input_tokens, output_tokens,
            gpu_index, shape_len, priority)
        SELECT printf('%032x', i), printf('%016x', i * 4), NULL, 'request', 'SERVER', ts,
            ts + to_microseconds(CAST((queue_ms + prefill_ms + decode_ms) * 1000 AS BIGINT)),
            queue_ms + prefill_ms + decode_ms, 'chat-api', 'replica-' || inst, 'node-' || (inst // 8), 1000 + inst,
            'request', 'tiny', inp, outp, inst % 8, CAST(pow(2, ceil(log2(inp))) AS BIGINT),
            CASE WHEN i % 5 = 0 THEN 'batch' ELSE 'interactive' END
        FROM gen ORDER BY ts""")
    for k, (role, off, dur) in enumerate((("queue", "0", "queue_ms"), ("prefill", "queue_ms", "prefill_ms"),
                                          ("decode", "queue_ms + prefill_ms", "decode_ms")), start=1):
        con.execute(f"""
            INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, start_time, end_time, duration_ms,
                service_name, service_instance_id, host_name, process_pid, role)
            SELECT printf('%032x', i), printf('%016x', i * 4 + {k}), printf('%016x', i * 4), '{role}', 'INTERNAL',
                ts + to_microseconds(CAST(({off}) * 1000 AS BIGINT)),
                ts + to_microseconds(CAST(({off} + {dur}) * 1000 AS BIGINT)), {dur},
                'chat-api', 'replica-' || inst, 'node-' || (inst // 8), 1000 + inst, '{role}'
            FROM gen ORDER BY ts""")
    # the compile spans of the storm
    con.execute(f"""
        INSERT INTO spans (trace_id, span_id, parent_span_id, name, kind, start_time, end_time, duration_ms, service_name,
            service_instance_id, host_name, process_pid, role, compile_kind, compile_reason, compile_shape, compile_cache)
        SELECT printf('%032x', 9000000000 + k), printf('%016x', 9000000000 + k), NULL, 'torch.compile', 'INTERNAL',
            {T0} + to_seconds(18000 + k * 20), {T0} + to_seconds(18003 + k * 20), 3000.0, 'chat-api', 'replica-3', 'node-0',
            1003, 'compile', 'recompile', 'tensor ''x'' size mismatch at index 1. expected 512, actual ' || (600 + k),
            '[1, ' || (600 + k) || ']', 'miss'
        FROM range(15) r(k)""")
    # GPU samples: 16 GPUs every 10 s, the power-capped normal and the throttled one
    con.execute(f"""
        INSERT INTO metrics (time, name, type, value, host_name, gpu_index, point_pid, service_name)
        WITH s AS (
            SELECT {T0} + to_seconds(k * 10) AS time, k * 10 AS t, g FROM range({DAY_S // 10}) a(k), range({INSTANCES}) b(g)
        )
        SELECT time, m.name, 'gauge',
            CASE m.name WHEN 'tailscope.gpu.sm_clock' THEN (CASE WHEN g = 10 AND t >= 43200 AND t < 43500 THEN 470 ELSE 1410 END)
                        WHEN 'tailscope.gpu.sm_clock.max' THEN 1980
                        WHEN 'tailscope.gpu.clock_event_reasons' THEN (CASE WHEN g = 10 AND t >= 43200 AND t < 43500 THEN 68 ELSE 4 END)
                        WHEN 'tailscope.gpu.utilization' THEN 0.7
                        ELSE 3.0e10 END,
            'node-' || (g // 8), g % 8, CASE WHEN m.name = 'tailscope.gpu.process.memory.used' THEN 1000 + g END, NULL
        FROM s, (VALUES ('tailscope.gpu.sm_clock'), ('tailscope.gpu.sm_clock.max'), ('tailscope.gpu.clock_event_reasons'),
                        ('tailscope.gpu.utilization'), ('tailscope.gpu.process.memory.used')) m(name)""")
    con.execute("DROP TABLE gen")
    con.close()
    store.checkpoint()
    store.close()
    return {"generate_s": round(time.perf_counter() - t, 1), "file_mb": round(path.stat().st_size / 2**20, 1)}


def _count(path: Path) -> int:
    try:
        with Store(path, read_only=True) as s:
            return int(s.cursor().execute("SELECT count(*) FROM spans WHERE role = 'request'").fetchall()[0][0])
    except Exception:
        return -1


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - t, 3), out


def measure(path: Path) -> dict[str, Any]:
    from analyzer.service import Analyzer

    results: dict[str, Any] = {}
    calls: dict[str, Callable[[Analyzer], Any]] = {
        "latency_series_60s": lambda a: a.latency(step_s=60),
        "incidents": lambda a: a.incidents(),
        "slow_requests_100": lambda a: a.slow_requests(limit=100),
    }
    for name, call in calls.items():
        store = Store(path, read_only=True)  # a fresh connection: DuckDB's buffer pool is empty
        a = Analyzer(store)
        a.use_cache = False
        a.incremental = False
        cold, out = _time(lambda: call(a))
        cpu = time.process_time()  # every thread of the process (DuckDB's workers, the contrast thread)
        warm, _ = _time(lambda: call(a))
        warm_cpu = round(time.process_time() - cpu, 3)
        a.use_cache = True
        call(a)
        cached, _ = _time(lambda: call(a))
        results[name] = {"cold_s": cold, "warm_s": warm, "cached_s": cached, "warm_cpu_s": warm_cpu}
        if name == "incidents":
            incs = out["incidents"]
            results["found"] = [{"start": i["start"], "end": i["end"], "top_cause": i["causes"][0]["cause"] if i["causes"] else None,
                                 "slow_requests": i["slow_requests"]} for i in incs]
            if incs:
                t_inc, _ = _time(lambda: a.incident(incs[0]["id"]))
                results["incident_detail_s"] = t_inc
                first = (a.incident(incs[0]["id"]).get("requests_detail") or [{}])[0]
                if first.get("trace_id"):
                    # as the dashboard asks (with the time the request ran), and with the id alone
                    results["trace_s"], _ = _time(lambda: a.trace(first["trace_id"], around=first["start"]))
                    results["trace_id_only_s"], _ = _time(lambda: a.trace(first["trace_id"]))
        store.close()
    return results


def refresh(path: Path, rounds: int = 5) -> dict[str, Any]:
    """The incident list asked again after new spans land (see the module docstring), on a copy of the store."""
    import shutil
    import statistics

    import pyarrow as pa

    from analyzer.service import Analyzer

    copy = path.with_name(path.stem + ".refresh.duckdb")
    shutil.copyfile(path, copy)
    try:
        store = Store(copy)
        a = Analyzer(store)
        a.use_cache = False
        con = store.cursor()
        newest, total = con.execute("SELECT max(start_time), count(*) FROM spans WHERE role = 'request'").fetchall()[0]
        per_10s = max(1, int(total / DAY_S * 10))
        a.incidents()
        times: dict[str, list[float]] = {"refresh_s": [], "refresh_all_windows_s": []}
        for k in range(2 * rounds):
            # ten seconds of requests, inside the last minute (the range's end does not move)
            base = newest - timedelta(seconds=30)
            ts = [base + timedelta(seconds=10 * j / per_10s) for j in range(per_10s)]
            ids = [f"f{k:07x}{j:024x}" for j in range(per_10s)]  # not an id the generator uses
            store.write([("spans", pa.table({
                "trace_id": ids, "span_id": [i[-16:] for i in ids], "name": ["request"] * per_10s, "kind": ["SERVER"] * per_10s,
                "start_time": pa.array(ts, pa.timestamp("us")),
                "end_time": pa.array([t + timedelta(milliseconds=700) for t in ts], pa.timestamp("us")),
                "duration_ms": [700.0] * per_10s, "service_name": ["chat-api"] * per_10s,
                "service_instance_id": [f"replica-{j % INSTANCES}" for j in range(per_10s)], "role": ["request"] * per_10s,
                "model": ["tiny"] * per_10s, "input_tokens": [300] * per_10s, "output_tokens": [80] * per_10s,
            }))])
            key = "refresh_s" if k % 2 == 0 else "refresh_all_windows_s"
            a.incremental = key == "refresh_s"
            t, _ = _time(a.incidents)
            times[key].append(t)
        store.close()
        return {key: statistics.median(v) for key, v in times.items()} | {"refresh_runs_s": times}
    finally:
        copy.unlink(missing_ok=True)
        Path(str(copy) + ".wal").unlink(missing_ok=True)


def _median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per timing, the median over repeats (and the raw values); everything else from the first run."""
    import statistics

    out = dict(reps[0])
    for key, val in reps[0].items():
        if isinstance(val, dict):
            out[key] = {k: statistics.median(r[key][k] for r in reps) for k in val}
            out[key]["runs_s"] = {k: [r[key][k] for r in reps] for k in val}
        elif key.endswith("_s") and isinstance(val, (int, float)):
            out[key] = statistics.median(r[key] for r in reps if key in r)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,3000000,10000000")
    parser.add_argument("--repeat", type=int, default=1, help="measure N times, report medians")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp") + "/tailscope-bench")
    args = parser.parse_args()
    out: dict[str, Any] = {"benchmark": "analyze", "threads": os.cpu_count(), "runs": []}
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for n in [int(x) for x in args.sizes.split(",") if x]:
        path = Path(args.dir) / f"analyze-{n}.duckdb"
        run: dict[str, Any] = {"requests": n + surge(n), "spans": 4 * (n + surge(n)), "path": str(path)}
        if _count(path) != n + surge(n):
            if path.exists():
                path.unlink()
            run.update(generate(path, n))
        else:
            run["reused"] = True
        reps = [measure(path) for _ in range(max(1, args.repeat))]
        run.update(_median_of(reps))
        run.update(refresh(path))
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
