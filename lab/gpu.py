"""Emulated GPU telemetry: the NVML readings the lab's emulated conditions imply.

There is no GPU here, so each replica is given an emulated one (an
H100-shaped device) and the readings follow what the replica did: utilization
from the time its batches were busy, memory from the model plus its KV
blocks, clocks below max with throttle-reason bits 0x4 (SwPowerCap) | 0x20
(SwThermalSlowdown) while throttled, a foreign process's memory and compute
while a co-located job runs. The points are encoded as OTLP metrics with the
node agent's own encoder (``agents.otlp_encode``) under the names of spec
section 8, at the virtual times they describe.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from agents.otlp_encode import MetricPoint

SM_CLOCK_MAX = 1980.0
MEMORY_TOTAL = 80 * 1024**3
POWER_LIMIT = 700.0
MODEL_BYTES = 16 * 1024**3
KV_BLOCK_BYTES = 2 * 1024**2
FOREIGN_BYTES = 22 * 1024**3
FOREIGN_PID = 424242
REASON_IDLE = 0x1
REASON_POWER_CAP = 0x4
REASON_THERMAL = 0x20


@dataclass
class GpuPlan:
    """What the emulated GPU of one replica went through."""

    host: str
    index: int
    serving_pid: int
    busy: list[tuple[float, float]]  # virtual seconds
    throttle: list[tuple[float, float, float]]  # (start, end, clock ratio)
    contention: list[tuple[float, float, float]]  # (start, end, share)
    loads: list[tuple[float, float]]  # model (re)load windows: memory ramps, no serving
    kv_usage: list[tuple[float, float]]  # (time, ratio)
    kv_blocks: int

    @property
    def uuid(self) -> str:
        return f"GPU-1ab0{self.index:04d}-0000-4000-8000-{abs(hash(self.host)) % 10**12:012d}"


def _busy_fraction(busy: list[tuple[float, float]], starts: list[float], t0: float, t1: float) -> float:
    i = max(0, bisect.bisect_right(starts, t0) - 1)
    total = 0.0
    while i < len(busy) and busy[i][0] < t1:
        a, b = busy[i]
        total += max(0.0, min(b, t1) - max(a, t0))
        i += 1
    return min(1.0, total / (t1 - t0))


def _in(windows: list[tuple[float, float, float]], t: float) -> float | None:
    for a, b, v in windows:
        if a <= t < b:
            return v
    return None


def points(plan: GpuPlan, start: float, end: float, base_epoch: float, step: float = 5.0) -> list[MetricPoint]:
    """Samples every ``step`` virtual seconds over [start, end)."""
    resource = {"host.name": plan.host, "service.name": "tailscope-agent", "service.instance.id": f"{plan.host}-agent"}
    attrs = {"gpu.index": plan.index, "gpu.uuid": plan.uuid, "gpu.name": "NVIDIA H100 80GB HBM3 (emulated)"}
    starts = [a for a, _ in plan.busy]
    kv_times = [t for t, _ in plan.kv_usage]
    out: list[MetricPoint] = []
    t = start
    while t < end:
        ns = int((base_epoch + t) * 1e9)
        util = _busy_fraction(plan.busy, starts, t, t + step)
        loading = any(a <= t < b for a, b in plan.loads)
        ratio = _in(plan.throttle, t)
        share = _in(plan.contention, t)
        k = bisect.bisect_right(kv_times, t) - 1
        kv = plan.kv_usage[k][1] if k >= 0 else 0.0
        serving_mem = (MODEL_BYTES if not loading else MODEL_BYTES // 3) + int(kv * plan.kv_blocks * KV_BLOCK_BYTES / 64)
        used = serving_mem
        reasons = REASON_IDLE if util < 0.05 else 0
        clock = SM_CLOCK_MAX if util >= 0.05 else 345.0
        power = 90.0 + 560.0 * util
        temp = 38.0 + 30.0 * util
        if share is not None:
            util = min(1.0, util * (1 - share) + share)
            used += FOREIGN_BYTES
            power = 90.0 + 560.0 * util
            temp = 38.0 + 30.0 * util
            clock = SM_CLOCK_MAX
            reasons = 0
        if ratio is not None:
            clock = SM_CLOCK_MAX * ratio
            reasons = REASON_POWER_CAP | REASON_THERMAL
            power = POWER_LIMIT * 0.995
            temp = 87.0
        vals: list[tuple[str, Any, str]] = [
            ("tailscope.gpu.utilization", float(util), "1"),
            ("tailscope.gpu.memory.used", int(used), "By"),
            ("tailscope.gpu.memory.total", MEMORY_TOTAL, "By"),
            ("tailscope.gpu.sm_clock", float(clock), "MHz"),
            ("tailscope.gpu.sm_clock.max", SM_CLOCK_MAX, "MHz"),
            ("tailscope.gpu.power", float(power), "W"),
            ("tailscope.gpu.power.limit", POWER_LIMIT, "W"),
            ("tailscope.gpu.temperature", float(temp), "Cel"),
            ("tailscope.gpu.clock_event_reasons", int(reasons), "1"),
        ]
        for name, v, unit in vals:
            out.append(MetricPoint.make(name, v, ns, attrs, resource, unit=unit))
        out.append(MetricPoint.make("tailscope.gpu.process.memory.used", int(serving_mem), ns, {**attrs, "process.pid": plan.serving_pid}, resource, unit="By"))
        if share is not None:
            out.append(MetricPoint.make("tailscope.gpu.process.memory.used", FOREIGN_BYTES, ns, {**attrs, "process.pid": FOREIGN_PID}, resource, unit="By"))
        t += step
    return out


def kv_points(resource: dict[str, Any], usage: list[tuple[float, float]], base_epoch: float, step: float = 5.0) -> list[MetricPoint]:
    """``tailscope.kv.usage`` of one serving replica (its own resource), one point per ``step``."""
    out: list[MetricPoint] = []
    last = -1e18
    for t, u in usage:
        if t - last >= step:
            out.append(MetricPoint.make("tailscope.kv.usage", float(u), int((base_epoch + t) * 1e9), {}, resource, unit="1"))
            last = t
    return out
