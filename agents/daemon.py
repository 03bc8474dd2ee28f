"""The node agent: sources → bounded queue → sender (spool + OTLP/HTTP).

Wires the sources that can run on this node, says once at start which are
active and why the others are off, and shuts down cleanly on SIGINT/SIGTERM:
sources stop, what is in memory goes to the spool, and the spool is drained
against a deadline (what is left is sent by the next run).
"""

from __future__ import annotations

import importlib
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agents.gpu_sampler import GpuSampler
from agents.nvml import NVML
from agents.profiler_watch import ProfilerWatcher
from agents.prom_scrape import PromScraper
from agents.sender import ItemQueue, Sender
from agents.spool import Spool, default_spool_dir
from agents.xid_watch import XidWatcher

log = logging.getLogger("tailscope.agent")

__all__ = ["Agent", "AgentOptions", "ScrapeTarget"]


@dataclass
class ScrapeTarget:
    url: str
    service: str | None = None
    instance: str | None = None


@dataclass
class AgentOptions:
    """Everything the agent needs; built by :mod:`agents.cli` from flags and ``TAILSCOPE_*``."""

    server: str = "http://127.0.0.1:4318"
    token: str | None = None
    interval: float = 1.0
    gpu: bool = True
    nvml_module: str | None = None  # dotted name of a pynvml look-alike (benchmarks only)
    profiler_dirs: list[str] = field(default_factory=list)
    profiler_interval: float = 2.0
    scrapes: list[ScrapeTarget] = field(default_factory=list)
    scrape_interval: float = 5.0
    spool_dir: str | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    queue_size: int = 20_000
    batch_interval: float = 1.0
    service_name: str = "tailscope-agent"
    host_name: str | None = None
    instance_id: str | None = None
    shutdown_timeout: float = 5.0

    def validate(self) -> None:
        if not self.server.startswith(("http://", "https://")):
            raise ValueError(f"--server must be an http:// or https:// URL, got {self.server!r}")
        for name in ("interval", "profiler_interval", "scrape_interval", "batch_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.spool_max_bytes <= 0:
            raise ValueError(f"--spool-max-bytes must be > 0, got {self.spool_max_bytes}")
        if self.queue_size <= 0:
            raise ValueError(f"--queue-size must be > 0, got {self.queue_size}")
        for t in self.scrapes:
            if not t.url.startswith(("http://", "https://")):
                raise ValueError(f"--scrape URL must start with http:// or https://, got {t.url!r}")


class Agent:
    """Build with options, then :meth:`start` / :meth:`stop`, or :meth:`run` until a signal.

    ``nvml`` may be passed directly (tests pass a fake module through ``NVML(module=...)``).
    """

    def __init__(self, options: AgentOptions, nvml: NVML | None = None, out: TextIO | None = None) -> None:
        options.validate()
        self.options = options
        self.out = out if out is not None else sys.stderr
        host = options.host_name or socket.gethostname()
        self.resource: dict[str, Any] = {
            "service.name": options.service_name,
            "service.instance.id": options.instance_id or host,
            "host.name": host,
        }
        self.spool_dir = Path(options.spool_dir) if options.spool_dir else default_spool_dir()
        self.spool = Spool(self.spool_dir, options.spool_max_bytes)
        self.queue = ItemQueue(options.queue_size)
        self.sender = Sender(options.server, options.token, self.spool, self.queue, self.resource,
                             flush_interval=options.batch_interval)
        self.nvml = nvml
        self._nvml_module: Any = None
        if options.nvml_module and nvml is None and options.gpu:
            try:
                self._nvml_module = importlib.import_module(options.nvml_module)
            except ImportError as exc:
                raise ValueError(f"--nvml-module {options.nvml_module!r} cannot be imported: {exc}") from None
        self.sources: list[Any] = []
        self.active: dict[str, str] = {}
        self.off: dict[str, str] = {}
        self._stopped = threading.Event()
        self._reports: list[str] = []

    def _report(self, msg: str) -> None:
        self._reports.append(msg)

    def _build_sources(self) -> None:
        o = self.options
        submit = self.queue.submit
        if not o.gpu:
            self.off["gpu"] = self.off["xid"] = "turned off (--no-gpu)"
        else:
            if self.nvml is None:
                self.nvml = NVML(self._nvml_module, report=self._report)
            if self.nvml.available():
                sampler = GpuSampler(self.nvml, self.resource, o.interval, submit=submit)
                devices = sampler.devices()
                if devices:
                    self.sources.append(sampler)
                    names = ", ".join(sorted({d.name for d in devices}))
                    self.active["gpu"] = f"{len(devices)} GPU(s) ({names}) every {o.interval:g} s"
                    xid = XidWatcher(self.nvml, devices, self.resource, submit)
                    if xid.setup():
                        self.sources.append(xid)
                        self.active["xid"] = f"XID events on GPU(s) {xid.registered}"
                    else:
                        self.off["xid"] = xid.off_reason or "unavailable"
                else:
                    self.off["gpu"] = self.off["xid"] = "NVML works but reports no GPUs"
            else:
                why = (self.nvml.unavailable_reason or "NVML unavailable").split(". HINT")[0]  # hint printed once above
                self.off["gpu"] = self.off["xid"] = why
        if o.profiler_dirs:
            state = self.spool_dir.parent / "profiler-uploaded.json"
            watcher = ProfilerWatcher(o.profiler_dirs, o.server, o.token, self.resource, state, o.profiler_interval)
            self.sources.append(watcher)
            self.active["profiler"] = f"watching {', '.join(o.profiler_dirs)} every {o.profiler_interval:g} s"
        else:
            self.off["profiler"] = "no --profiler-dir given"
        if o.scrapes:
            for t in o.scrapes:
                res = dict(self.resource)
                if t.service:
                    res["service.name"] = t.service
                res["service.instance.id"] = t.instance or (t.url if not t.service else f"{res['host.name']}:{t.service}")
                self.sources.append(PromScraper(t.url, res, submit, o.scrape_interval))
            self.active["scrape"] = ", ".join(t.url for t in o.scrapes) + f" every {o.scrape_interval:g} s"
        else:
            self.off["scrape"] = "no --scrape URL given"

    def start(self) -> None:
        self._build_sources()
        self.sender.start()
        for s in self.sources:
            s.start()
        lines = [f"tailscope agent: sending to {self.options.server} (spool {self.spool_dir}, "
                 f"{len(self.spool)} payload(s) waiting from before)"]
        for msg in self._reports:
            lines.append(f"  {msg}")
        for name, why in self.active.items():
            lines.append(f"  on:  {name}: {why}")
        for name, why in self.off.items():
            lines.append(f"  off: {name}: {why}")
        print("\n".join(lines), file=self.out, flush=True)

    def stop(self) -> None:
        """Stop sources, spool what is in memory, drain against ``shutdown_timeout``."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for s in self.sources:
            try:
                s.stop(timeout=2.0)
            except Exception:  # noqa: BLE001 - stop the others anyway
                log.exception("stopping %s failed", type(s).__name__)
        self.sender.stop(self.options.shutdown_timeout)
        if self.nvml is not None:
            self.nvml.shutdown()
        left = len(self.spool)
        print(f"tailscope agent: stopped; sent {self.sender.counters.sent_payloads} payload(s), "
              f"{left} left in the spool for the next run, dropped: spool full {self.spool.dropped_payloads}, "
              f"refused {self.sender.counters.poison_payloads}, queue full {self.queue.dropped}",
              file=self.out, flush=True)

    def run(self, duration: float | None = None) -> int:
        """Run until SIGINT/SIGTERM (or ``duration`` seconds); returns the exit status."""
        wake = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            wake.set()

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
            end = None if duration is None else time.monotonic() + duration
            while not wake.is_set():
                if end is not None and time.monotonic() >= end:
                    break
                wake.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic())))
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


