"""A summary of a PyTorch profiler (Kineto / Chrome trace) file, usable without the file.

The analyzer needs a handful of figures per trace — how busy the GPU really
was, which kernels took the time, how much CPU time went into launching them,
and whether torch.compile was compiling inside the window — and should not
have to reparse tens of megabytes of JSON per question. This module computes
them once, on the node, and the summary travels with the upload.

Definitions (checked against Holistic Trace Analysis, see
``benchmarks/profiler_vs_hta.py``):

- GPU activity = events of category ``kernel``, ``gpu_memcpy``, ``gpu_memset``.
- Per device (the event's ``pid``, i.e. the GPU): ``span_us`` = last activity
  end − first activity start; ``busy_us`` = the length of the union of all
  activity intervals on all its streams; ``idle_us = span_us − busy_us``
  (HTA's temporal breakdown: ``kernel_time`` and ``idle_time``).
- Launch delay = kernel start − end of the runtime call that launched it
  (matched by ``correlation`` id, as HTA's kernel-launch statistics do).
- Times: ``ts`` is in µs (fractional allowed) whatever ``displayTimeUnit``
  says (that key only tells viewers how to display); epoch µs =
  ``baseTimeNanoseconds / 1000 + ts`` when the key is present, else ``ts``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

__all__ = ["summarize", "load_trace", "union_length", "TraceError", "GPU_CATEGORIES", "COMPILE_REGIONS"]

GPU_CATEGORIES = {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset",
                  "Kernel": "kernel", "Memcpy": "memcpy", "Memset": "memset"}
LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "hipLaunchKernel", "hipExtModuleLaunchKernel", "hipModuleLaunchKernel", "cudaLaunchCooperativeKernel")
# Regions that mean "running compiled code" vs "compiling now" (SIGNALS.md).
COMPILED_RUN_REGIONS = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "CompiledFunction")
COMPILING_REGIONS = ("entire_frame_compile", "backend_compile", "build_guards", "dynamo")
COMPILE_REGIONS = COMPILED_RUN_REGIONS + COMPILING_REGIONS
TOP_KERNELS = 20


class TraceError(ValueError):
    """The file is not a readable Chrome/Kineto trace."""


def load_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``.json`` or ``.json.gz`` (gzip detected by magic bytes); raises :class:`TraceError`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(2)
        opener = gzip.open if magic == b"\x1f\x8b" else open
        with opener(p, "rb") as f:  # type: ignore[operator]
            data = json.load(f)
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile is an OSError, JSONDecodeError a ValueError
        raise TraceError(f"{p.name}: not a complete JSON trace ({type(exc).__name__}: {exc})") from None
    if isinstance(data, list):  # the Chrome "JSON array" trace format
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise TraceError(f"{p.name}: no traceEvents list; not a Chrome/Kineto trace")
    return data


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once)."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _num(v: Any) -> float | None:
    """A finite number from an int, float or numeric string; ``None`` otherwise (NaN/inf included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _region(name: str) -> str | None:
    """The compile region an event belongs to: the exact name or ``name: detail``
    (``Torch-Compiled Region: 0/1``); ``CompiledFunctionBackward`` counts as ``CompiledFunction``.
    The ``*_data: ...`` annotations and ``... (dynamo_timed)`` twins that torch also
    writes are not separate regions (they would double the counts)."""
    for r in COMPILE_REGIONS:
        if name == r or name.startswith(r + ":"):
            return r
    if name.startswith("CompiledFunction") and not name.endswith(")"):
        return "CompiledFunction"
    return None


_COMPILE_ID = re.compile(r"compile_id=([0-9/\[\]_-]+)")


def _launched_before_last_step(events: list[Any]) -> set[Any] | None:
    """Correlation ids launched before the last ``ProfilerStep#N`` began (HTA's iteration filter).

    ``None`` when the trace has fewer than two profiler steps (nothing to exclude).
    """
    steps = [_num(e.get("ts")) for e in events if isinstance(e, dict) and e.get("ph") == "X"
             and str(e.get("name", "")).startswith("ProfilerStep")]
    steps = [s for s in steps if s is not None]
    if len(steps) < 2:
        return None
    last = max(steps)
    keep = set()
    for e in events:
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            ts = _num(e.get("ts"))
            args = e.get("args") if isinstance(e.get("args"), dict) else {}
            if ts is not None and ts < last and args.get("correlation") is not None:
                keep.add(args["correlation"])
    return keep


def summarize(trace: dict[str, Any] | str | os.PathLike[str], exclude_last_step: bool = False) -> dict[str, Any]:
    """Compute the summary (see the module docstring) of a loaded trace or a file path.

    ``exclude_last_step``: count only GPU activity launched before the last
    ``ProfilerStep`` began, as HTA does (the last step is usually cut short by
    the profiler stopping); default counts the whole trace, which is what a
    serving trace without profiler steps needs.
    """
    data = load_trace(trace) if not isinstance(trace, dict) else trace
    events = data.get("traceEvents")
    if not isinstance(events, list):
        raise TraceError("no traceEvents list; not a Chrome/Kineto trace")
    keep_corr = _launched_before_last_step(events) if exclude_last_step else None
    base_ns = _num(data.get("baseTimeNanoseconds"))
    base_us = base_ns / 1000.0 if base_ns else 0.0

    categories: Counter[str] = Counter()
    t_min, t_max = float("inf"), float("-inf")
    dev_intervals: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    dev_kind_us: dict[Any, Counter[str]] = defaultdict(Counter)
    dev_streams: dict[Any, set] = defaultdict(set)
    kernels: dict[str, list[float]] = {}
    kernel_start_by_corr: dict[Any, float] = {}
    runtime_end_by_corr: dict[Any, float] = {}
    runtime_us = launch_us = 0.0
    runtime_calls = launch_calls = 0
    regions: dict[str, list[float]] = defaultdict(list)
    compile_intervals: list[tuple[float, float]] = []
    compiling_intervals: list[tuple[float, float]] = []
    dynamo_events: list[tuple[float, float]] = []  # one per compile in the window
    compile_ids: list[tuple[float, str]] = []  # (ts, id) from "dynamo_data: compile_id=0/1"
    skipped = 0

    for e in events:
        if not isinstance(e, dict):
            skipped += 1
            continue
        ph = e.get("ph")
        cat = e.get("cat")
        if cat is not None:
            categories[str(cat)] += 1
        if ph != "X":
            continue
        ts = _num(e.get("ts"))
        dur = _num(e.get("dur"))
        if ts is None or dur is None or dur < 0:
            skipped += 1
            continue
        end = ts + dur
        if cat == "Trace":  # the profiler's own envelope event; not activity
            continue
        t_min = min(t_min, ts)
        t_max = max(t_max, end)
        name = str(e.get("name", ""))
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        kind = GPU_CATEGORIES.get(cat) if isinstance(cat, str) else None
        if kind is not None:
            if keep_corr is not None and args.get("correlation") not in keep_corr:
                continue
            dev = args.get("device", e.get("pid"))
            dev_intervals[dev].append((ts, end))
            dev_kind_us[dev][kind] += dur
            dev_streams[dev].add(args.get("stream", e.get("tid")))
            if kind == "kernel":
                k = kernels.get(name)
                if k is None:
                    kernels[name] = [1, dur, dur]
                else:
                    k[0] += 1
                    k[1] += dur
                    k[2] = max(k[2], dur)
                corr = args.get("correlation")
                if corr is not None:
                    kernel_start_by_corr[corr] = ts
            continue
        if cat in ("cuda_runtime", "cuda_driver"):
            runtime_calls += 1
            runtime_us += dur
            if name in LAUNCH_NAMES:
                launch_calls += 1
                launch_us += dur
                corr = args.get("correlation")
                if corr is not None:
                    runtime_end_by_corr[corr] = end
            continue
        if name.startswith("dynamo_data"):
            m = _COMPILE_ID.search(name)
            if m:
                compile_ids.append((ts, m.group(1)))
        region = _region(name)
        if region == "dynamo":
            dynamo_events.append((ts, dur))
        if region is not None:
            regions[region].append(dur)
            compile_intervals.append((ts, end))
            if region in COMPILING_REGIONS:
                compiling_intervals.append((ts, end))

    devices = []
    total_busy = total_span = 0.0
    for dev in sorted(dev_intervals, key=lambda d: (str(type(d)), d)):
        iv = dev_intervals[dev]
        first = min(s for s, _ in iv)
        last = max(e for _, e in iv)
        span = last - first
        busy = union_length(iv)
        total_busy += busy
        total_span += span
        devices.append({
            "device": dev,
            "streams": sorted((s for s in dev_streams[dev] if s is not None), key=str),
            "span_us": round(span, 3),
            "busy_us": round(busy, 3),
            "idle_us": round(span - busy, 3),
            "busy_ratio": round(busy / span, 6) if span > 0 else None,
            "kernel_us": round(dev_kind_us[dev]["kernel"], 3),
            "memcpy_us": round(dev_kind_us[dev]["memcpy"], 3),
            "memset_us": round(dev_kind_us[dev]["memset"], 3),
            "first_us": round(base_us + first, 3),
            "last_us": round(base_us + last, 3),
        })

    compiles = []
    for ts, dur in sorted(dynamo_events):
        cid = next((c for t, c in compile_ids if ts <= t <= ts + dur), None)
        compiles.append({"compile_id": cid, "start_us": round(base_us + ts, 3), "dur_us": round(dur, 3)})

    delays = sorted(kernel_start_by_corr[c] - runtime_end_by_corr[c]
                    for c in kernel_start_by_corr.keys() & runtime_end_by_corr.keys())
    top = sorted(kernels.items(), key=lambda kv: kv[1][1], reverse=True)[:TOP_KERNELS]
    has_time = t_max >= t_min
    return {
        "format": "kineto",
        "window": "before_last_profiler_step" if keep_corr is not None else "whole_trace",
        "schema_version": data.get("schemaVersion"),
        "display_time_unit": data.get("displayTimeUnit"),
        "trace_start_us": round(base_us + t_min, 3) if has_time else None,
        "trace_end_us": round(base_us + t_max, 3) if has_time else None,
        "duration_us": round(t_max - t_min, 3) if has_time else 0.0,
        "events": len(events),
        "skipped_events": skipped,
        "categories": dict(categories.most_common()),
        "device_names": [str(p.get("name")) for p in data.get("deviceProperties") or [] if isinstance(p, dict)],
        "gpu": {
            "devices": len(devices),
            "busy_us": round(total_busy, 3),
            "span_us": round(total_span, 3),
            "idle_us": round(total_span - total_busy, 3),
            "busy_ratio": round(total_busy / total_span, 6) if total_span > 0 else None,
        },
        "devices": devices,
        "top_kernels": [{"name": n, "count": int(v[0]), "total_us": round(v[1], 3), "mean_us": round(v[1] / v[0], 3),
                         "max_us": round(v[2], 3)} for n, v in top],
        "kernel_count": int(sum(v[0] for v in kernels.values())),
        "launch": {
            "runtime_calls": runtime_calls,
            "runtime_us": round(runtime_us, 3),
            "launch_calls": launch_calls,
            "launch_us": round(launch_us, 3),
            "delay_us": {
                "count": len(delays),
                "mean": round(sum(delays) / len(delays), 3) if delays else None,
                "p50": round(_quantile(delays, 0.5), 3) if delays else None,
                "p95": round(_quantile(delays, 0.95), 3) if delays else None,
                "max": round(delays[-1], 3) if delays else None,
            },
        },
        "compile": {
            "region_us": round(union_length(compile_intervals), 3),
            "compiling_us": round(union_length(compiling_intervals), 3),
            "regions": {r: {"count": len(d), "total_us": round(sum(d), 3)} for r, d in sorted(regions.items())},
            "compiles": compiles,
        },
    }
