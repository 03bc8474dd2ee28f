"""Compare agents.profiler_summary with Holistic Trace Analysis on real Kineto traces.

Prints JSON: per file, our GPU busy/idle/span and top kernels next to HTA's
temporal breakdown (kernel_time, idle_time) and kernel breakdown, with the
relative differences. HTA wants a directory of rank traces, so each file is
copied into its own temporary directory at run time (the shared data stays
read-only and is never copied into the repo).

Usage: .venv/bin/python benchmarks/profiler_vs_hta.py [TRACE ...]
(default: every file in ../shared/data/kineto/).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agents.profiler_summary import summarize  # noqa: E402

DEFAULT_DIR = REPO.parent / "shared" / "data" / "kineto"


def hta_figures(path: Path) -> dict[str, Any]:
    """HTA's busy/idle figures and top kernels for one trace file (raises on failure)."""
    from hta.trace_analysis import TraceAnalysis

    with tempfile.TemporaryDirectory(prefix="hta-") as d:
        name = path.name if path.name.endswith((".json", ".json.gz")) else path.name + ".json"
        shutil.copy(path, Path(d) / name)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            analyzer = TraceAnalysis(trace_dir=d)
            temporal = analyzer.get_temporal_breakdown(visualize=False)
            kernels = analyzer.get_gpu_kernel_breakdown(visualize=False, num_kernels=10, include_memory_kernels=False)
    row = temporal.iloc[0]
    kernel_time = float(row["kernel_time(us)"])
    idle = float(row["idle_time(us)"])
    kernel_df = kernels[1]
    named = kernel_df[~kernel_df["name"].isin(["others"])]
    top = named.groupby("name")["sum (us)"].sum().sort_values(ascending=False).head(5)
    return {
        "span_us": kernel_time,
        "idle_us": idle,
        "busy_us": kernel_time - idle,
        "busy_ratio": (kernel_time - idle) / kernel_time if kernel_time else None,
        "top_kernels": [{"name": n, "total_us": float(v)} for n, v in top.items()],
    }


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round((a - b) / b, 6)


def compare(path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    ours = summarize(path)
    ours_s = time.perf_counter() - t0
    hta_like = summarize(path, exclude_last_step=True)
    out: dict[str, Any] = {
        "file": path.name,
        "ours": {
            "busy_us": ours["gpu"]["busy_us"], "idle_us": ours["gpu"]["idle_us"], "span_us": ours["gpu"]["span_us"],
            "busy_ratio": ours["gpu"]["busy_ratio"], "summary_s": round(ours_s, 3),
            "top_kernels": [{"name": k["name"][:80], "total_us": k["total_us"]} for k in ours["top_kernels"][:5]],
            "launch_delay_p50_us": ours["launch"]["delay_us"]["p50"],
        },
        "ours_hta_window": {
            "window": hta_like["window"], "busy_us": hta_like["gpu"]["busy_us"], "idle_us": hta_like["gpu"]["idle_us"],
            "span_us": hta_like["gpu"]["span_us"], "busy_ratio": hta_like["gpu"]["busy_ratio"],
        },
    }
    try:
        t0 = time.perf_counter()
        hta = hta_figures(path)
        hta["analysis_s"] = round(time.perf_counter() - t0, 3)
    except Exception as exc:  # noqa: BLE001 - report, don't crash the comparison
        out["hta"] = None
        out["hta_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return out
    out["hta"] = hta
    # same window as HTA (activity launched before the last ProfilerStep), kernels matched by name
    ours_short: dict[str, float] = {k["name"]: k["total_us"] for k in hta_like["top_kernels"]}
    top_pairs = [
        {"name": k["name"][:80], "hta_total_us": k["total_us"], "ours_total_us": round(ours_short.get(k["name"], 0.0), 3),
         "rel": _rel(ours_short.get(k["name"]), k["total_us"])}
        for k in hta["top_kernels"]
    ]
    for k in hta["top_kernels"]:
        k["name"] = k["name"][:80]
    out["diff"] = {
        "busy_rel": _rel(hta_like["gpu"]["busy_us"], hta["busy_us"]),
        "idle_rel": _rel(hta_like["gpu"]["idle_us"], hta["idle_us"]),
        "span_rel": _rel(hta_like["gpu"]["span_us"], hta["span_us"]),
        "busy_ratio_abs": None if hta["busy_ratio"] is None or hta_like["gpu"]["busy_ratio"] is None
        else round(abs(hta_like["gpu"]["busy_ratio"] - hta["busy_ratio"]), 6),
        "whole_trace_busy_rel": _rel(ours["gpu"]["busy_us"], hta["busy_us"]),
        "top_kernel_same": bool(ours_short) and bool(hta["top_kernels"])
        and max(ours_short, key=ours_short.get)[:80] == hta["top_kernels"][0]["name"],
        "top_kernels": top_pairs,
    }
    return out


def main(argv: list[str]) -> int:
    logging.disable(logging.WARNING)  # HTA logs a lot at INFO/WARNING
    files = [Path(a) for a in argv] or sorted(DEFAULT_DIR.glob("*.json*"))
    results = [compare(p) for p in files]
    print(json.dumps({"benchmark": "profiler_vs_hta", "files": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
