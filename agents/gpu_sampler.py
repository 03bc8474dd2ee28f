"""GPU sampler: every GPU's readings as spec section 8 metrics, once per interval.

Each reading that NVML cannot give on this board is simply absent from the
sample (never a fake zero): the analyzer must not read "0 W" as evidence.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from agents.nvml import NA, NVML, decode
from agents.otlp_encode import MetricPoint

log = logging.getLogger("tailscope.agent.gpu")

__all__ = ["GpuSampler", "DeviceInfo", "CLOCK_EVENT_BITS"]

# nvmlClocksEventReasons bits (SIGNALS.md), for messages and docs.
CLOCK_EVENT_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    handle: Any
    uuid: str
    name: str

    @property
    def attributes(self) -> dict[str, Any]:
        return {"gpu.index": self.index, "gpu.uuid": self.uuid, "gpu.name": self.name}


class GpuSampler:
    """Reads all GPUs through :class:`agents.nvml.NVML` and emits :class:`MetricPoint` s.

    Args:
        nvml: the NVML wrapper (its module may be a fake).
        resource: resource attributes of the agent (``host.name``, ``service.name`` ...).
        interval: seconds between samples.
        submit: where points go (the agent's bounded queue); returns False when dropped.
    """

    def __init__(self, nvml: NVML, resource: Mapping[str, Any], interval: float = 1.0,
                 submit: Callable[[Any], bool] | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.nvml = nvml
        self.resource = dict(resource)
        self.interval = interval
        self.submit = submit
        self.clock = clock
        self._devices: list[DeviceInfo] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def devices(self) -> list[DeviceInfo]:
        """The GPUs (index, uuid, name), read once: they do not change while the driver runs."""
        if self._devices is None:
            found = []
            for i in range(self.nvml.device_count()):
                h = self.nvml.handle(i)
                if h is NA:
                    continue
                uuid = decode(self.nvml.query("nvmlDeviceGetUUID", h, default=""))
                name = decode(self.nvml.query("nvmlDeviceGetName", h, default=""))
                found.append(DeviceInfo(i, h, str(uuid), str(name)))
            self._devices = found
        return self._devices

    def _clock_event_reasons(self, h: Any) -> Any:
        value = self.nvml.query("nvmlDeviceGetCurrentClocksEventReasons", h)
        if value is NA:  # older drivers / bindings: the deprecated name
            value = self.nvml.query("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        return value

    def sample(self) -> list[MetricPoint]:
        """One reading of every GPU; values NVML does not support are left out."""
        if not self.nvml.available():
            return []
        m = self.nvml.module
        now = self.clock()
        out: list[MetricPoint] = []
        res = self.resource

        def add(name: str, value: Any, attrs: dict[str, Any], unit: str) -> None:
            if value is NA or value is None:
                return
            out.append(MetricPoint.make(name, value, now, attrs, res, unit=unit))

        sm = getattr(m, "NVML_CLOCK_SM", 1)
        temp_sensor = getattr(m, "NVML_TEMPERATURE_GPU", 0)
        for dev in self.devices():
            h, attrs = dev.handle, dev.attributes
            util = self.nvml.query("nvmlDeviceGetUtilizationRates", h)
            if util is not NA:
                add("tailscope.gpu.utilization", float(util.gpu) / 100.0, attrs, "1")
            mem = self.nvml.query("nvmlDeviceGetMemoryInfo", h)
            if mem is not NA:
                add("tailscope.gpu.memory.used", int(mem.used), attrs, "By")
                add("tailscope.gpu.memory.total", int(mem.total), attrs, "By")
            add("tailscope.gpu.sm_clock", self.nvml.query("nvmlDeviceGetClockInfo", h, sm), attrs, "MHz")
            add("tailscope.gpu.sm_clock.max", self.nvml.query("nvmlDeviceGetMaxClockInfo", h, sm), attrs, "MHz")
            power = self.nvml.query("nvmlDeviceGetPowerUsage", h)
            if power is not NA:
                add("tailscope.gpu.power", float(power) / 1000.0, attrs, "W")
            limit = self.nvml.query("nvmlDeviceGetEnforcedPowerLimit", h)
            if limit is not NA:
                add("tailscope.gpu.power.limit", float(limit) / 1000.0, attrs, "W")
            add("tailscope.gpu.temperature", self.nvml.query("nvmlDeviceGetTemperature", h, temp_sensor), attrs, "Cel")
            reasons = self._clock_event_reasons(h)
            if reasons is not NA:
                add("tailscope.gpu.clock_event_reasons", int(reasons), attrs, "1")
            procs = self.nvml.query("nvmlDeviceGetComputeRunningProcesses", h)
            if procs is not NA:
                for p in procs:
                    used = getattr(p, "usedGpuMemory", None)
                    if used is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. no permission under WDDM/MIG)
                        continue
                    add("tailscope.gpu.process.memory.used", int(used), {**attrs, "process.pid": int(p.pid)}, "By")
        self.samples += 1
        return out

    # --- as a source ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailscope-gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                for point in self.sample():
                    if self.submit is not None:
                        self.submit(point)
            except Exception:  # noqa: BLE001 - a bad sample must not stop sampling
                log.exception("GPU sample failed")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspended, slow driver): skip, don't burst
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
