"""Ingest throughput end to end: real server process, senders in other processes, OTLP protobuf.

Starts ``python -m tailscope serve`` on a fresh DuckDB file, drives it from
``--senders`` processes (each with ``--threads`` keep-alive connections) that
post OTLP/HTTP protobuf batches of ``--batch`` spec-shaped request spans
(12 attributes each, the shape of tests/ingest_payloads.py) for ``--seconds``,
then prints one JSON object:

* ``stored_spans_per_s`` — spans committed per second of the run (what counts),
  ``accepted_spans_per_s`` — spans answered 200 per second;
* ``export_latency_ms`` p50/p99 of the export calls that got 200 (each waits
  for its group commit);
* ``server_peak_rss_mb`` (VmHWM of the server plus its decode workers);
* ``spans_lost`` = spans answered 200 minus spans stored (must be 0);
* ``stage_cpu_ms_per_1000_spans``: CPU cost of decode, the pickle round trip
  (process pool only), DuckDB insert + WAL commit and DuckDB checkpoint, timed
  in this process on the same batch, to show what limits the end-to-end figure;
* ``stored_spans_per_server_cpu_s``: spans stored per CPU-second the server
  (and its decode workers) used — comparable across machine load, unlike
  wall-clock throughput on a shared machine;
* ``sender_cpu_s`` / ``sender_cpu_us_per_span``: what the sender processes used
  (on the same cores as the server, so it bounds what the server can get);
* ``machine_cpu_busy``: the share of all cores busy during the run, and
  ``other_cpu_s``: CPU that neither the server nor the senders used (other jobs
  on a shared machine, the benchmark itself);
* ``cpu_calibration_s``: seconds a fixed pure-Python loop takes here, so runs
  on machines with different load can be compared.

Run: ``.venv/bin/python benchmarks/ingest.py [--seconds 20] [--decode-workers 2] [--decoder python]``
(``--decoder``: the server's ``decoder`` setting; the report says which decoder ran).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


_SERVE_WITH_H11 = (
    "import functools, sys, uvicorn; uvicorn.run = functools.partial(uvicorn.run, http='h11', loop='asyncio'); "
    "from tailscope.cli import main; sys.exit(main())"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_body(n: int, seed: int) -> bytes:
    """One ExportTraceServiceRequest with ``n`` request spans, ~12 attributes each."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(k: str, v: object) -> KeyValue:
        if isinstance(v, int):
            return KeyValue(key=k, value=AnyValue(int_value=v))
        if isinstance(v, float):
            return KeyValue(key=k, value=AnyValue(double_value=v))
        return KeyValue(key=k, value=AnyValue(string_value=str(v)))

    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("service.name", "chat-api"), kv("service.instance.id", f"replica-{seed % 8}"),
                                   kv("host.name", f"node-{seed % 4}"), kv("process.pid", 1000 + seed)])
    ss = rs.scope_spans.add()
    ss.scope.name = "bench"
    t0 = time.time_ns() - 60_000_000_000
    rnd = __import__("random").Random(seed)
    for i in range(n):
        sp = ss.spans.add()
        sp.trace_id = rnd.randbytes(16)
        sp.span_id = rnd.randbytes(8)
        sp.name = "llm_request"
        sp.kind = 2
        sp.start_time_unix_nano = t0 + i * 1000
        sp.end_time_unix_nano = t0 + i * 1000 + rnd.randint(50, 3000) * 1_000_000
        sp.attributes.extend([
            kv("tailscope.role", "request"),
            kv("gen_ai.request.model", rnd.choice(["llama-3-8b", "llama-3-70b", "mistral-7b"])),
            kv("gen_ai.usage.input_tokens", rnd.randint(10, 4000)),
            kv("gen_ai.usage.output_tokens", rnd.randint(1, 800)),
            kv("gen_ai.latency.time_in_queue", rnd.random() * 0.1),
            kv("gen_ai.latency.time_to_first_token", rnd.random() * 0.5),
            kv("gen_ai.latency.e2e", rnd.random() * 3),
            kv("gen_ai.request.id", f"cmpl-{seed}-{i}"),
            kv("session.id", f"sess-{rnd.randint(0, 5000)}"),
            kv("tailscope.shape.len", rnd.choice([128, 256, 512, 1024, 2048])),
            kv("tailscope.batch.id", f"b-{seed}-{i // 16}"),
            kv("tailscope.gpu.index", rnd.randint(0, 7)),
        ])
    return req.SerializeToString()


def sender(url: str, bodies: list[bytes], batch: int, seconds: float, threads: int, start_at: float, out: "mp.Queue") -> None:
    """One sender process: ``threads`` keep-alive clients posting until the deadline."""
    import threading

    import httpx

    results: list[tuple[int, float]] = []  # (status, latency s)
    lock = threading.Lock()

    def run(k: int) -> None:
        with httpx.Client(timeout=60, headers={"content-type": "application/x-protobuf"}) as client:
            while time.time() < start_at:
                time.sleep(0.005)
            deadline = start_at + seconds
            i = k
            while time.time() < deadline:
                body = bodies[i % len(bodies)]
                i += 1
                t = time.perf_counter()
                try:
                    r = client.post(url, content=body)
                    status = r.status_code
                except httpx.TransportError:
                    status = -1
                lat = time.perf_counter() - t
                with lock:
                    results.append((status, lat))
                if status in (429, 503):
                    time.sleep(0.05)  # back off briefly (Retry-After is 1 s; a real exporter would wait longer)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((results, time.process_time()))


def stage_costs(body: bytes, batch: int, decoder: str = "auto") -> dict[str, float]:
    """CPU time of the pipeline's stages on one batch, in this process (ms per 1,000 spans).

    CPU time (``process_time``, which includes DuckDB's own threads) rather than
    wall time, so the split stays meaningful on a machine shared with other work.
    """
    import pickle

    from collector import otlp
    from collector.ingest import Ingest
    from collector.store import Store
    from tailscope.config import load

    def cpu(fn, reps: int) -> float:
        t = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - t) / reps

    otlp.decode("traces", body, "application/x-protobuf", decoder=decoder)
    decode = cpu(lambda: otlp.decode("traces", body, "application/x-protobuf", decoder=decoder), 10)
    d = otlp.decode("traces", body, "application/x-protobuf", decoder=decoder)
    pick = cpu(lambda: pickle.loads(pickle.dumps(d, protocol=5)), 10)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "s.duckdb")
        ing = Ingest(store, load({"db": str(Path(tmp) / "s.duckdb")}, environ={}))
        # after Ingest, which sets the configured threshold: time the checkpoint on its own below
        store._con.execute("SET checkpoint_threshold = '10GB'")
        group = [type("P", (), {"decoded": d})()] * 20  # what the writer merges for a 20-request group
        store.write(ing._merge(group))
        reps = 4
        write = cpu(lambda: store.write(ing._merge(group)), reps) / len(group)
        checkpoint = cpu(store.checkpoint, 1) / ((reps + 1) * len(group))
        store.close()
    per = 1000.0 / batch * 1000.0
    return {
        "decode": round(decode * per, 2),
        "pickle_roundtrip_if_decode_workers": round(pick * per, 2),
        "duckdb_insert_and_wal_commit": round(write * per, 2),
        "duckdb_checkpoint": round(checkpoint * per, 2),
    }


def calibrate() -> float:
    t = time.perf_counter()
    x = 0
    for i in range(3_000_000):
        x += i
    return round(time.perf_counter() - t, 3)


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and its live children (decode workers)."""
    import psutil

    total = 0.0
    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (decode workers), MiB."""
    total = 0
    pids = [pid]
    try:
        import psutil

        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--batch", type=int, default=1000, help="spans per export request")
    ap.add_argument("--senders", type=int, default=2, help="sender processes")
    ap.add_argument("--threads", type=int, default=4, help="connections per sender process")
    ap.add_argument("--decode-workers", type=int, default=0)
    ap.add_argument("--queue-max-spans", type=int, default=200_000)
    ap.add_argument("--flush-interval-ms", type=int, default=20)
    ap.add_argument("--decoder", default="auto", choices=("auto", "python", "compiled"), help="the server's decoder setting")
    ap.add_argument("--http", default="auto", choices=("auto", "h11"),
                    help="uvicorn's HTTP stack: auto (httptools + uvloop when installed) or h11 + asyncio")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage timing")
    args = ap.parse_args(argv)

    cal = calibrate()
    bodies = [build_body(args.batch, seed) for seed in range(8)]
    stages = None if args.no_stages else stage_costs(bodies[0], args.batch, args.decoder)

    tmp = tempfile.mkdtemp(prefix="tailscope-bench-")
    db = Path(tmp) / "bench.duckdb"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILSCOPE_")}
    env["PYTHONPATH"] = str(REPO)
    # --http h11 pins uvicorn to its pure-Python HTTP parser and asyncio's loop,
    # what it picks when httptools / uvloop are not installed
    launch = [sys.executable, "-m", "tailscope"] if args.http == "auto" else [sys.executable, "-c", _SERVE_WITH_H11]
    server = subprocess.Popen(
        launch + ["serve", "--db", str(db), "--port", str(port), "--grpc-port", "0",
         "--dashboard", "false", "--log-level", "warning", "--decode-workers", str(args.decode_workers),
         "--queue-max-spans", str(args.queue_max_spans), "--flush-interval-ms", str(args.flush_interval_ms),
         "--decoder", args.decoder],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    import httpx

    base = f"http://127.0.0.1:{port}"
    decoder = None
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit("server exited: " + server.stderr.read().decode(errors="replace")[-2000:])
            try:
                health = httpx.get(base + "/healthz", timeout=1)
                if health.status_code == 200:
                    decoder = health.json().get("decoder")
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start")

        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        start_at = time.time() + 3.0  # every sender has started and built its client by then
        cpu_before = cpu_seconds(server.pid)
        machine_before = machine_cpu()
        procs = [
            ctx.Process(target=sender, args=(base + "/v1/traces", bodies[k::args.senders] or bodies, args.batch, args.seconds, args.threads, start_at, out))
            for k in range(args.senders)
        ]
        for p in procs:
            p.start()
        results: list[tuple[int, float]] = []
        sender_cpu = 0.0
        for _ in procs:
            got, cpu = out.get(timeout=args.seconds + 300)
            results += got
            sender_cpu += cpu
        for p in procs:
            p.join(30)
        elapsed = time.time() - start_at
        server_cpu = cpu_seconds(server.pid) - cpu_before
        machine_after = machine_cpu()
        machine_busy = machine_after[0] - machine_before[0]
        machine_total = machine_after[1] - machine_before[1]

        ok = [lat for s, lat in results if s == 200]
        statuses: dict[str, int] = {}
        for s, _ in results:
            statuses[str(s)] = statuses.get(str(s), 0) + 1
        acked = len(ok) * args.batch
        stored = httpx.post(base + "/api/v1/sql", json={"sql": "SELECT count(*) FROM spans"}, timeout=120).json()["rows"][0][0]
        metrics = httpx.get(base + "/metrics", timeout=30).text
        commits = next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tailscope_ingest_commits_total ")), 0)
        flush_sum = next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tailscope_ingest_flush_seconds_sum")), 0)
        rss = peak_rss_mb(server.pid)
        ok.sort()
        report = {
            "benchmark": "ingest",
            "batch_spans": args.batch,
            "senders": args.senders,
            "threads_per_sender": args.threads,
            "decode_workers": args.decode_workers,
            "decoder": decoder,
            "http": args.http,
            "seconds": round(elapsed, 2),
            "requests": statuses,
            "accepted_spans_per_s": round(acked / elapsed),
            "stored_spans_per_s": round(stored / elapsed),
            "stored_spans": stored,
            "spans_lost": acked - stored,
            "export_latency_ms": {
                "p50": round(statistics.median(ok) * 1000, 1) if ok else None,
                "p99": round(ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000, 1) if ok else None,
            },
            "group_commits": int(commits),
            "mean_spans_per_commit": round(stored / commits) if commits else None,
            "mean_commit_ms": round(flush_sum / commits * 1000, 1) if commits else None,
            "server_peak_rss_mb": rss,
            # Load-independent efficiency: what the server process(es) spent per span.
            "server_cpu_s": round(server_cpu, 2),
            "stored_spans_per_server_cpu_s": round(stored / server_cpu) if server_cpu else None,
            # the senders share the machine: their CPU is what the server cannot have
            "sender_cpu_s": round(sender_cpu, 2),
            "sender_cpu_us_per_span": round(sender_cpu / stored * 1e6, 2) if stored else None,
            # the whole machine over the run: how busy, and what neither server nor senders used
            "machine_cpu_busy": round(machine_busy / machine_total, 2) if machine_total else None,
            "other_cpu_s": round(machine_busy - server_cpu - sender_cpu, 2) if machine_total else None,
            "stage_cpu_ms_per_1000_spans": stages,
            "cpu_calibration_s": cal,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        server.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if report["spans_lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
