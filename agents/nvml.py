"""A thin, forgiving wrapper around NVML (``pynvml`` from nvidia-ml-py).

Why a wrapper: NVML answers "not supported" for many queries on many boards
(power on some MIG slices, clocks-event reasons on old drivers, per-process
memory without permission), and a node without a driver raises on ``nvmlInit``.
A monitoring agent must treat all of that as *missing values*, never as a
crash (nvitop's ``libnvml.nvmlQuery`` pattern): :meth:`NVML.query` returns
:data:`NA` instead of raising, and a missing library or driver is reported
once, with a hint, while the agent keeps running its other sources.

The ``pynvml`` module is injectable so tests (and the overhead benchmark) can
pass ``tests/fake_nvml.py``; nothing is imported or initialised at import time.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType
from typing import Any, Callable

log = logging.getLogger("tailscope.agent.nvml")

__all__ = ["NA", "NVML", "NAType", "load_module"]


class NAType:
    """The "not available" value: falsy, prints as ``N/A``, a singleton."""

    _instance: "NAType | None" = None

    def __new__(cls) -> "NAType":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "N/A"

    __str__ = __repr__

    def __reduce__(self) -> str:  # pickles to the same singleton
        return "NA"


NA = NAType()

# Errors that mean "this value does not exist here", not "something is broken".
_VALUE_MISSING = (
    "NVMLError_NotSupported",
    "NVMLError_FunctionNotFound",
    "NVMLError_NoPermission",
    "NVMLError_NotFound",
    "NVMLError_NoData",
    "NVMLError_InvalidArgument",
    "NVMLError_ArgumentVersionMismatch",
)
# Errors on init that mean "no NVML on this machine": report once, keep going.
_NO_LIBRARY = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")

_HINTS = {
    "NVMLError_LibraryNotFound": (
        "the NVIDIA driver library libnvidia-ml.so.1 was not found. HINT: on a GPU node install the "
        "NVIDIA driver (or, in a container, run with the NVIDIA container toolkit: --gpus all); "
        "on a machine without a GPU this is expected"
    ),
    "NVMLError_DriverNotLoaded": (
        "the NVIDIA kernel driver is not loaded. HINT: check `nvidia-smi`, load the driver "
        "(modprobe nvidia) or reboot after a driver upgrade"
    ),
}


def load_module(name: str = "pynvml") -> ModuleType | None:
    """Import the NVML binding by dotted name; ``None`` when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class NVML:
    """Lazy, thread-safe access to NVML with "not supported" turned into :data:`NA`.

    Args:
        module: the ``pynvml``-compatible module; default imports ``pynvml``.
        report: called once with a one-line message when NVML cannot be used
            (default: ``logging.warning``). The agent keeps its other sources.
    """

    def __init__(self, module: ModuleType | Any | None = None, report: Callable[[str], None] | None = None) -> None:
        self._module = module
        self._lock = threading.RLock()
        self._state = "uninitialised"  # -> "ok" | "unavailable" | "shutdown"
        self.unavailable_reason: str | None = None
        self._report = report or (lambda msg: log.warning("%s", msg))
        self._handles: dict[int, Any] = {}
        self._warned: set[str] = set()

    # --- lifecycle ------------------------------------------------------------
    @property
    def module(self) -> Any:
        return self._module

    def available(self) -> bool:
        """Initialise on first use; ``False`` (reported once) when there is no usable NVML."""
        with self._lock:
            if self._state == "uninitialised":
                self._init_locked()
            return self._state == "ok"

    def _init_locked(self) -> None:
        if self._module is None:
            self._module = load_module("pynvml")
            if self._module is None:
                self._unavailable("the nvidia-ml-py package (import pynvml) is not installed. HINT: pip install nvidia-ml-py")
                return
        try:
            self._module.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - any init failure means "no NVML", reported once
            kind = type(exc).__name__
            hint = _HINTS.get(kind)
            if hint is None:
                hint = f"nvmlInit failed: {kind}: {exc}"
            self._unavailable(hint)
            return
        self._state = "ok"

    def _unavailable(self, why: str) -> None:
        self._state = "unavailable"
        self.unavailable_reason = why
        self._report(f"NVML unavailable, GPU metrics and XID events are off: {why}")

    def shutdown(self) -> None:
        with self._lock:
            if self._state == "ok":
                try:
                    self._module.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down a broken driver must not raise
                    log.debug("nvmlShutdown failed", exc_info=True)
            self._state = "shutdown"
            self._handles.clear()

    # --- queries --------------------------------------------------------------
    def is_error(self, exc: BaseException, *names: str) -> bool:
        """Whether ``exc`` is one of the module's NVML error classes called ``names``."""
        classes = tuple(c for c in (getattr(self._module, n, None) for n in names) if isinstance(c, type))
        return bool(classes) and isinstance(exc, classes)

    def query(self, func: str | Callable[..., Any], *args: Any, default: Any = NA) -> Any:
        """Call an NVML function; missing values and NVML errors give ``default``.

        ``func`` is a function or its name in the module (``"nvmlDeviceGetPowerUsage"``).
        A function this binding lacks (an old nvidia-ml-py) also gives ``default``.
        Errors other than "not supported"-like ones are logged once per function.
        """
        if not self.available():
            return default
        fn = getattr(self._module, func, None) if isinstance(func, str) else func
        if fn is None:
            return default
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - translated to a value at this boundary
            base = getattr(self._module, "NVMLError", None)
            if isinstance(base, type) and isinstance(exc, base):
                if not self.is_error(exc, *_VALUE_MISSING):
                    name = getattr(fn, "__name__", str(func))
                    key = f"{name}:{type(exc).__name__}"
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning("NVML %s failed: %s: %s (reported once)", name, type(exc).__name__, exc)
                return default
            raise

    def device_count(self) -> int:
        count = self.query("nvmlDeviceGetCount", default=0)
        return int(count) if isinstance(count, int) else 0

    def handle(self, index: int) -> Any:
        """The device handle for ``index`` (cached), or :data:`NA`."""
        with self._lock:
            h = self._handles.get(index)
            if h is None:
                h = self.query("nvmlDeviceGetHandleByIndex", index)
                if h is not NA:
                    self._handles[index] = h
            return h


def decode(value: Any) -> Any:
    """NVML strings arrive as ``bytes`` on old bindings and ``str`` on new ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
