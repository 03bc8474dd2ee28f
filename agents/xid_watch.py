"""XID / critical GPU events through an NVML event set, shipped as log records.

An XID (e.g. 79 "GPU has fallen off the bus", 48 double-bit ECC, 13 graphics
engine exception) explains a latency cliff better than any metric; NVML
delivers them as events, so we block on ``nvmlEventSetWait`` on our own
thread instead of polling.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

from agents.gpu_sampler import DeviceInfo
from agents.nvml import NA, NVML
from agents.otlp_encode import LogEvent

log = logging.getLogger("tailscope.agent.xid")

__all__ = ["XidWatcher", "XID_EVENT"]

XID_EVENT = "tailscope.gpu.xid"


class XidWatcher:
    """Registers every GPU for XID critical errors and forwards each as a ``tailscope.gpu.xid`` event."""

    def __init__(self, nvml: NVML, devices: list[DeviceInfo], resource: Mapping[str, Any],
                 submit: Callable[[Any], bool], wait_ms: int = 500) -> None:
        self.nvml = nvml
        self.devices = devices
        self.resource = dict(resource)
        self.submit = submit
        self.wait_ms = wait_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: Any = None
        self.registered: list[int] = []
        self.events = 0
        self.off_reason: str | None = None

    def setup(self) -> bool:
        """Create the event set and register the GPUs; ``False`` (with ``off_reason``) when impossible."""
        if not self.nvml.available():
            self.off_reason = "NVML unavailable"
            return False
        es = self.nvml.query("nvmlEventSetCreate")
        if es is NA:
            self.off_reason = "NVML event sets are not supported by this driver/binding"
            return False
        kind = getattr(self.nvml.module, "nvmlEventTypeXidCriticalError", 8)
        for dev in self.devices:
            ok = self.nvml.query("nvmlDeviceRegisterEvents", dev.handle, kind, es, default=False)
            if ok is not False:
                self.registered.append(dev.index)
        if not self.registered:
            self.off_reason = "no GPU supports XID event registration (needs a datacenter GPU and root on some drivers)"
            return False
        self._event_set = es
        return True

    def poll_once(self) -> LogEvent | None:
        """Wait up to ``wait_ms`` for one event; the log record, or ``None`` on timeout."""
        m = self.nvml.module
        try:
            data = m.nvmlEventSetWait(self._event_set, self.wait_ms)
        except Exception as exc:  # noqa: BLE001 - translated: a timeout is the normal case
            if self.nvml.is_error(exc, "NVMLError_Timeout"):
                return None
            base = getattr(m, "NVMLError", None)
            if isinstance(base, type) and isinstance(exc, base):
                log.warning("nvmlEventSetWait failed: %s: %s", type(exc).__name__, exc)
                self._stop.wait(1.0)  # don't spin on a broken event set
                return None
            raise
        index = self._index_of(data.device)
        xid = int(getattr(data, "eventData", 0))
        attrs: dict[str, Any] = {"tailscope.gpu.xid": xid}
        if index is not None:
            attrs["gpu.index"] = index
            dev = next((d for d in self.devices if d.index == index), None)
            if dev is not None:
                attrs["gpu.uuid"] = dev.uuid
                attrs["gpu.name"] = dev.name
        self.events += 1
        return LogEvent.make(XID_EVENT, time.time_ns(), attrs, self.resource,
                             body=f"GPU {index if index is not None else '?'}: XID {xid}")

    def _index_of(self, handle: Any) -> int | None:
        for d in self.devices:
            if d.handle == handle:
                return d.index
        idx = self.nvml.query("nvmlDeviceGetIndex", handle, default=None)
        return int(idx) if isinstance(idx, int) else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailscope-xid-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ev = self.poll_once()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("XID watch failed")
                self._stop.wait(1.0)
                continue
            if ev is not None:
                log.error("%s", ev.body)
                self.submit(ev)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._event_set is not None:
            self.nvml.query("nvmlEventSetFree", self._event_set)
            self._event_set = None
