"""Run the node agent on a real GPU under load and report what it shipped (issue 3's GPU check).

What it does, all on loopback:
1. starts a real tailscope server in this process (temporary DuckDB file);
2. starts a GPU load in a subprocess: a torch matmul loop on ``cuda:0``, which
   also records a PyTorch profiler (Kineto) trace of 2 s of that loop with CUDA
   activity into the watched directory;
3. runs the agent (``python -m agents``, real pynvml) for ``--seconds`` with
   ``--profiler-dir`` on that directory, then stops it with SIGTERM;
4. prints JSON: per GPU min/mean/max of every ``tailscope.gpu.*`` metric it
   stored, the per-process memory rows of the load's pid, the clock-event
   reasons seen, XID events, and the uploaded trace's summary (GPU busy ratio,
   top kernels, launch delay).

On a machine without a GPU, ``--fake-nvml`` uses tests/fake_nvml.py and a CPU
load, to check the script itself.

Usage: python scripts/agent_gpu_check.py [--seconds 60] [--fake-nvml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LOAD = r"""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
seconds, trace_dir, device, n = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
a = torch.randn(n, n, device=device)
b = torch.randn(n, n, device=device)
def step(n=4):
    for _ in range(n):
        c = a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return c
step()
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
with profile(activities=acts) as prof:
    end = time.time() + 2
    while time.time() < end:
        step()
prof.export_chrome_trace(f"{trace_dir}/gpu-check.{int(time.time())}.pt.trace.json")
end = time.time() + seconds
while time.time() < end:
    step()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fake-nvml", action="store_true", help="no GPU: fake NVML and a CPU load (checks the script)")
    args = ap.parse_args(argv)

    from tailscope.config import load
    from tailscope.server import build_server

    work = Path(tempfile.mkdtemp(prefix="agent-gpu-check-"))
    traces = work / "traces"
    traces.mkdir()
    server = build_server(load({"db": str(work / "check.duckdb"), "port": 0, "grpc_port": 0, "dashboard": False}, environ={}))
    port = server.serve_in_thread()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    device = "cpu" if args.fake_nvml else "cuda:0"
    size = "512" if args.fake_nvml else "8192"
    load_proc = subprocess.Popen([sys.executable, "-c", LOAD, str(args.seconds), str(traces), device, size], env=env)
    cmd = [sys.executable, "-m", "agents", "--server", url, "--interval", "1", "--profiler-dir", str(traces),
           "--profiler-interval", "1", "--spool-dir", str(work / "spool"), "--host-name", "gpu-check"]
    if args.fake_nvml:
        cmd += ["--nvml-module", "tests.fake_nvml"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(args.seconds + 2)
        end = time.monotonic() + 60  # the trace is uploaded once complete and stable over two scans
        while time.monotonic() < end and not server.store.cursor().execute("SELECT count(*) FROM profiler_traces").fetchone()[0]:
            time.sleep(1)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, agent_err = agent.communicate(timeout=60)
        load_proc.terminate()
        load_proc.wait(timeout=30)
    cur = server.store.cursor()
    metrics = cur.execute(
        "SELECT name, gpu_index, any_value(gpu_name), count(*), min(value), avg(value), max(value) FROM metrics "
        "WHERE host_name = 'gpu-check' AND name LIKE 'tailscope.gpu.%' AND name <> 'tailscope.gpu.process.memory.used' "
        "GROUP BY name, gpu_index ORDER BY gpu_index, name").fetchall()
    procs = cur.execute(
        "SELECT gpu_index, point_pid, count(*), max(value) FROM metrics WHERE name = 'tailscope.gpu.process.memory.used' "
        "AND host_name = 'gpu-check' GROUP BY ALL ORDER BY 1, 2").fetchall()
    reasons = cur.execute(
        "SELECT gpu_index, CAST(value AS BIGINT) AS bits, count(*) FROM metrics WHERE name = 'tailscope.gpu.clock_event_reasons' "
        "AND host_name = 'gpu-check' GROUP BY ALL ORDER BY 1, 2").fetchall()
    xids = cur.execute("SELECT time, gpu_index, xid FROM logs WHERE event_name = 'tailscope.gpu.xid'").fetchall()
    uploaded = cur.execute("SELECT filename, size_bytes, summary FROM profiler_traces").fetchall()
    server.shutdown_thread()
    shutil.rmtree(work, ignore_errors=True)
    summaries = []
    for name, size, summary in uploaded:
        s = json.loads(summary) if summary else {}
        summaries.append({
            "file": name, "size_bytes": size, "gpu": s.get("gpu"), "devices": s.get("devices"),
            "top_kernels": [{k: v for k, v in t.items() if k != "name"} | {"name": t["name"][:100]} for t in s.get("top_kernels", [])[:5]],
            "launch": s.get("launch"), "categories": s.get("categories"),
        })
    print(json.dumps({
        "check": "agent_gpu",
        "nvml": "fake" if args.fake_nvml else "real",
        "load_pid": load_proc.pid,
        "metrics": [{"name": n, "gpu": g, "gpu_name": gn, "samples": c, "min": mn, "mean": round(av, 3), "max": mx}
                    for n, g, gn, c, mn, av, mx in metrics],
        "process_memory": [{"gpu": g, "pid": p, "samples": c, "max_bytes": m, "is_load": p == load_proc.pid}
                           for g, p, c, m in procs],
        "clock_event_reasons": [{"gpu": g, "bits": hex(b), "samples": c} for g, b, c in reasons],
        "xid_events": [list(map(str, x)) for x in xids],
        "profiler_traces": summaries,
        "agent_log_tail": agent_err.strip().splitlines()[-8:],
    }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
