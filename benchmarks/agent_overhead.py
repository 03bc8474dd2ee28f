"""The node agent's own overhead: CPU % of one core and RSS at 1 Hz and 10 Hz sampling.

Runs the agent as a subprocess (``python -m agents``) against a real server
on loopback (built in this process, its own thread), with the fake NVML of
``tests/fake_nvml.py`` selected by the benchmark-only ``--nvml-module`` hook
(there is no GPU here; on a GPU node run with the real pynvml by passing
``--real-nvml``). Measures the agent process with psutil over a steady-state
window after a warm-up and prints JSON.

Target (issue 3): under 1 % of one core and under 60 MB RSS at 1 Hz.

Usage: .venv/bin/python benchmarks/agent_overhead.py [--seconds 20] [--warmup 3] [--real-nvml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(server_url: str, interval: float, seconds: float, warmup: float, workdir: Path, real_nvml: bool,
            host: str) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "agents", "--server", server_url, "--interval", str(interval),
           "--spool-dir", str(workdir / f"spool-{interval}"), "--host-name", host]
    if not real_nvml:
        cmd += ["--nvml-module", "tests.fake_nvml"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early: {proc.stderr.read() if proc.stderr else ''}")
        t0 = time.monotonic()
        c0 = p.cpu_times()
        rss_max = 0
        while time.monotonic() - t0 < seconds:
            rss_max = max(rss_max, p.memory_info().rss)
            time.sleep(0.5)
        c1 = p.cpu_times()
        wall = time.monotonic() - t0
        rss = p.memory_info().rss
        uss = p.memory_full_info().uss
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    return {
        "interval_s": interval,
        "hz": round(1 / interval, 3),
        "window_s": round(wall, 2),
        "cpu_pct_one_core": round(100 * cpu / wall, 3),
        "rss_mb": round(rss / 1e6, 1),
        "rss_max_mb": round(max(rss_max, rss) / 1e6, 1),
        "uss_mb": round(uss / 1e6, 1),
        "exit_code": proc.returncode,
        "agent_summary": (err or "").strip().splitlines()[-1:] ,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--real-nvml", action="store_true", help="use the real pynvml (on a GPU node)")
    args = ap.parse_args(argv)

    from tailscope.config import load
    from tailscope.server import build_server

    with tempfile.TemporaryDirectory(prefix="agent-overhead-") as d:
        work = Path(d)
        server = build_server(load({"db": str(work / "bench.duckdb"), "port": 0, "grpc_port": 0, "dashboard": False}, environ={}))
        port = server.serve_in_thread()
        url = f"http://127.0.0.1:{port}"
        runs = []
        try:
            for interval in (1.0, 0.1):
                host = f"bench-{interval}"
                run = measure(url, interval, args.seconds, args.warmup, work, args.real_nvml, host)
                cur = server.store.cursor()
                n = cur.execute("SELECT count(DISTINCT time) FROM metrics WHERE name = 'tailscope.gpu.utilization' "
                                "AND host_name = ?", [host]).fetchone()[0]
                run["samples_stored"] = int(n)
                runs.append(run)
        finally:
            server.shutdown_thread()
    one_hz = runs[0]
    result = {
        "benchmark": "agent_overhead",
        "nvml": "real pynvml" if args.real_nvml else "tests.fake_nvml (2 simulated GPUs; real NVML calls cost more)",
        "python": sys.version.split()[0],
        "runs": runs,
        "target_1hz": {"cpu_pct_one_core": 1.0, "rss_mb": 60.0},
        "meets_target_1hz": one_hz["cpu_pct_one_core"] < 1.0 and one_hz["rss_max_mb"] < 60.0,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
