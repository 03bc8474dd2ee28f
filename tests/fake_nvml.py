"""A fake ``pynvml`` for tests and the overhead benchmark (no GPU here).

It has the same function names, constants and error classes as nvidia-ml-py,
and simulates GPUs whose readings tests can change: clocks, throttle bits,
processes, unsupported queries, XID events, a missing library. Use an
instance (``FakeNvml(gpus=2)``) as the module passed to ``agents.nvml.NVML``,
or import this module itself (``--nvml-module tests.fake_nvml``): its
module-level names come from a default two-GPU instance.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# --- constants (values as in pynvml) ------------------------------------------
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0
nvmlEventTypeXidCriticalError = 8
nvmlEventTypeSingleBitEccError = 1
nvmlEventTypeDoubleBitEccError = 2
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999


# --- errors -----------------------------------------------------------------
class NVMLError(Exception):
    value = NVML_ERROR_UNKNOWN

    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


class NVMLError_Uninitialized(NVMLError):
    value = NVML_ERROR_UNINITIALIZED


class NVMLError_NotSupported(NVMLError):
    value = NVML_ERROR_NOT_SUPPORTED


class NVMLError_NoPermission(NVMLError):
    value = NVML_ERROR_NO_PERMISSION


class NVMLError_NotFound(NVMLError):
    value = NVML_ERROR_NOT_FOUND


class NVMLError_DriverNotLoaded(NVMLError):
    value = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_Timeout(NVMLError):
    value = NVML_ERROR_TIMEOUT


class NVMLError_LibraryNotFound(NVMLError):
    value = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    value = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    value = NVML_ERROR_GPU_IS_LOST


class NVMLError_Unknown(NVMLError):
    value = NVML_ERROR_UNKNOWN


# --- structs (attribute names as in pynvml) ------------------------------------
@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class Memory:
    total: int
    free: int
    used: int


@dataclass
class Process:
    pid: int
    usedGpuMemory: int | None


@dataclass
class EventData:
    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class Handle:
    index: int


@dataclass
class FakeGpu:
    """One simulated GPU; tests change these fields between samples."""

    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    util_gpu: int = 37
    util_mem: int = 12
    mem_total: int = 80 * 1024**3
    mem_used: int = 10 * 1024**3
    sm_clock: int = 1980
    sm_clock_max: int = 1980
    power_mw: int = 350_000
    power_limit_mw: int = 700_000
    temperature: int = 45
    clocks_event_reasons: int = 0
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = f"GPU-fake0000-0000-0000-0000-00000000000{self.index}"


class FakeNvml:
    """A pynvml look-alike. Knobs: ``init_error``, ``unsupported``, ``no_events_api``,
    ``no_clocks_event_api``; gpus in ``gpus``; :meth:`inject_xid` queues an event."""

    # errors and constants are reachable on the instance, as on the module
    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown
    NVML_CLOCK_GRAPHICS = NVML_CLOCK_GRAPHICS
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError

    def __init__(self, gpus: int = 2, init_error: type[Exception] | None = None) -> None:
        self.gpus = [FakeGpu(i) for i in range(gpus)]
        if gpus >= 1:
            self.gpus[0].processes = [Process(4242, 6 * 1024**3), Process(4343, None)]
        self.init_error = init_error
        self.unsupported: set[str] = set()  # function names that raise NotSupported
        self.init_calls = 0
        self.initialised = False
        self.calls: collections.Counter[str] = collections.Counter()
        self._events: collections.deque[EventData] = collections.deque()
        self._registered: dict[int, set[int]] = {}
        self._event_cv = threading.Condition()
        self.no_clocks_event_api = False

    # --- test helpers ---------------------------------------------------------
    def inject_xid(self, index: int, xid: int) -> None:
        with self._event_cv:
            self._events.append(EventData(Handle(index), nvmlEventTypeXidCriticalError, xid))
            self._event_cv.notify_all()

    def _check(self, name: str) -> None:
        self.calls[name] += 1
        if not self.initialised:
            raise NVMLError_Uninitialized()
        if name in self.unsupported:
            raise NVMLError_NotSupported()

    def _gpu(self, handle: Handle) -> FakeGpu:
        return self.gpus[handle.index]

    # --- the pynvml API -------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error()
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return "580.00.fake"

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError_NotFound()
        return Handle(index)

    def nvmlDeviceGetIndex(self, handle: Handle) -> int:
        self._check("nvmlDeviceGetIndex")
        return handle.index

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        self._check("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        self._check("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Utilization:
        self._check("nvmlDeviceGetUtilizationRates")
        g = self._gpu(handle)
        return Utilization(g.util_gpu, g.util_mem)

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Memory:
        self._check("nvmlDeviceGetMemoryInfo")
        g = self._gpu(handle)
        return Memory(g.mem_total, g.mem_total - g.mem_used, g.mem_used)

    def nvmlDeviceGetClockInfo(self, handle: Handle, clock: int) -> int:
        self._check("nvmlDeviceGetClockInfo")
        g = self._gpu(handle)
        return g.sm_clock if clock == NVML_CLOCK_SM else 1593

    def nvmlDeviceGetMaxClockInfo(self, handle: Handle, clock: int) -> int:
        self._check("nvmlDeviceGetMaxClockInfo")
        g = self._gpu(handle)
        return g.sm_clock_max if clock == NVML_CLOCK_SM else 2619

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        self._check("nvmlDeviceGetPowerUsage")
        return self._gpu(handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Handle) -> int:
        self._check("nvmlDeviceGetEnforcedPowerLimit")
        return self._gpu(handle).power_limit_mw

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        self._check("nvmlDeviceGetTemperature")
        return self._gpu(handle).temperature

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Handle) -> int:
        self._check("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self._gpu(handle).clocks_event_reasons

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[Process]:
        self._check("nvmlDeviceGetComputeRunningProcesses")
        return list(self._gpu(handle).processes)

    def nvmlEventSetCreate(self) -> object:
        self._check("nvmlEventSetCreate")
        return object()

    def nvmlDeviceRegisterEvents(self, handle: Handle, types: int, event_set: object) -> None:
        self._check("nvmlDeviceRegisterEvents")
        self._registered.setdefault(id(event_set), set()).add(handle.index)

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> EventData:
        self._check("nvmlEventSetWait")
        registered = self._registered.get(id(event_set), set())
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._event_cv:
            while True:
                for ev in list(self._events):
                    if ev.device.index in registered:
                        self._events.remove(ev)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NVMLError_Timeout()
                self._event_cv.wait(left)

    def nvmlEventSetFree(self, event_set: object) -> None:
        self._registered.pop(id(event_set), None)

    def __getattr__(self, name: str) -> Any:
        # the newer clocks-event call exists unless a test removes it (old bindings)
        if name == "nvmlDeviceGetCurrentClocksEventReasons" and not self.no_clocks_event_api:
            def events(handle: Handle) -> int:
                self._check("nvmlDeviceGetCurrentClocksEventReasons")
                return self._gpu(handle).clocks_event_reasons

            return events
        raise AttributeError(name)


# Module-level API: a default instance, so ``import tests.fake_nvml`` works as pynvml.
_default = FakeNvml(gpus=2)


def __getattr__(name: str) -> Any:
    return getattr(_default, name)
