"""The collector's own figures, exposed as Prometheus text on ``GET /metrics``.

Why hand-written instead of ``prometheus_client``: the figures are a dozen
counters owned by one object that is passed to the parts that update it (no
global registry, see STYLE.md rule 10), and the text format is small and
stable. Only counts, sizes and latencies are exported — never tokens, paths
of uploaded files, or anything a client sent.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from typing import Callable, Iterable

SIGNALS = ("traces", "metrics", "logs")

# Upper bounds (seconds) of the latency histograms: group-commit flushes and
# the time a request waits for its commit (the cost of ack-after-commit).
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A cumulative Prometheus histogram with fixed bounds (thread-safe via its owner)."""

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        if not self.bounds:
            raise ValueError("a histogram needs at least one bucket bound")
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out: list[str] = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{_fmt(bound)}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{suffix} {_fmt(self.sum)}")
        out.append(f"{name}_count{suffix} {self.count}")
        return out


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class SelfMetrics:
    """Counters of one server's ingest path; every method is safe from any thread.

    Gauges that belong to another part (queue depth and capacity) are read at
    scrape time through ``gauges`` callbacks, so they are never stale.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: dict[str, int] = defaultdict(int)  # items decoded, per signal
        self.stored: dict[str, int] = defaultdict(int)  # items committed, per signal
        self.rejected: dict[str, int] = defaultdict(int)  # items refused inside accepted requests
        self.truncated_values: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[tuple[str, str], int] = defaultdict(int)  # (signal, transport)
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (signal, transport, status)
        self.shed: dict[str, int] = defaultdict(int)  # items not taken because of 429/503, by reason
        self.commits = 0
        self.commit_failures = 0
        self.commit_rows = 0
        self.flush_latency = Histogram()
        self.ack_wait = Histogram()
        self.decode_latency = Histogram()
        self.profiler_uploads = 0
        self.profiler_bytes = 0
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.decoder = ""  # which OTLP protobuf traces decoder runs: "compiled" or "python"

    # --- updates ------------------------------------------------------------
    def request(self, signal: str, transport: str, status: int | str, nbytes: int = 0) -> None:
        with self._lock:
            self.requests[(signal, transport, str(status))] += 1
            if nbytes:
                self.bytes_received[(signal, transport)] += nbytes

    def decoded(self, signal: str, accepted: int, rejected: int, truncated: int) -> None:
        with self._lock:
            self.received[signal] += accepted
            self.rejected[signal] += rejected
            self.truncated_values[signal] += truncated

    def shed_items(self, reason: str, items: int) -> None:
        with self._lock:
            self.shed[reason] += items

    def committed(self, per_signal: dict[str, int], rows: int, seconds: float) -> None:
        with self._lock:
            for signal, n in per_signal.items():
                self.stored[signal] += n
            self.commits += 1
            self.commit_rows += rows
            self.flush_latency.observe(seconds)

    def commit_failed(self) -> None:
        with self._lock:
            self.commit_failures += 1

    def decode_time(self, seconds: float) -> None:
        with self._lock:
            self.decode_latency.observe(seconds)

    def acked(self, seconds: float) -> None:
        with self._lock:
            self.ack_wait.observe(seconds)

    def profiler_upload(self, nbytes: int) -> None:
        with self._lock:
            self.profiler_uploads += 1
            self.profiler_bytes += nbytes

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time (e.g. the ingest queue's depth)."""
        self._gauges[name] = (help_text, read)

    # --- exposition -----------------------------------------------------------
    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            out: list[str] = []

            def family(name: str, kind: str, help_text: str) -> None:
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")

            for name, data, help_text in (
                ("tailscope_ingest_received_items_total", self.received, "Valid spans, data points and log records decoded from export requests (before queue admission)."),
                ("tailscope_ingest_stored_items_total", self.stored, "Items durably committed to the store."),
                ("tailscope_ingest_rejected_items_total", self.rejected, "Invalid items dropped inside otherwise accepted requests (OTLP partial success)."),
                ("tailscope_ingest_truncated_values_total", self.truncated_values, "Attribute values cut to max_attribute_bytes."),
            ):
                family(name, "counter", help_text)
                for signal in SIGNALS:
                    out.append(f'{name}{{signal="{signal}"}} {data.get(signal, 0)}')

            family("tailscope_ingest_received_bytes_total", "counter", "Request body bytes read (before decompression).")
            for (signal, transport), n in sorted(self.bytes_received.items()):
                out.append(f'tailscope_ingest_received_bytes_total{{signal="{_escape(signal)}",transport="{transport}"}} {n}')

            family("tailscope_ingest_requests_total", "counter", "Export requests answered, by signal, transport and status.")
            for (signal, transport, status), n in sorted(self.requests.items()):
                out.append(
                    f'tailscope_ingest_requests_total{{signal="{_escape(signal)}",transport="{transport}",status="{_escape(status)}"}} {n}'
                )

            family("tailscope_ingest_shed_items_total", "counter", "Items refused with 429 (queue full) or 503 (shutting down, store failing).")
            for reason in ("queue_full", "unavailable"):
                out.append(f'tailscope_ingest_shed_items_total{{reason="{reason}"}} {self.shed.get(reason, 0)}')
            for status in ("429", "503"):
                n = sum(v for (_, _, s), v in self.requests.items() if s == status)
                out.append(f'tailscope_ingest_responses_{status}_total {n}')

            family("tailscope_ingest_commits_total", "counter", "Group commits written to the store.")
            out.append(f"tailscope_ingest_commits_total {self.commits}")
            family("tailscope_ingest_commit_failures_total", "counter", "Group commits the store refused (their requests got 503).")
            out.append(f"tailscope_ingest_commit_failures_total {self.commit_failures}")
            family("tailscope_ingest_commit_rows_total", "counter", "Rows (all tables) written by group commits.")
            out.append(f"tailscope_ingest_commit_rows_total {self.commit_rows}")
            family("tailscope_ingest_flush_seconds", "histogram", "Time one group commit takes (insert + WAL sync).")
            out.extend(self.flush_latency.lines("tailscope_ingest_flush_seconds"))
            family("tailscope_ingest_ack_wait_seconds", "histogram", "Time an accepted request waits in the queue until its commit.")
            out.extend(self.ack_wait.lines("tailscope_ingest_ack_wait_seconds"))
            family("tailscope_ingest_decode_seconds", "histogram", "Time to decompress and decode one OTLP/HTTP body (including waiting for a decoder).")
            out.extend(self.decode_latency.lines("tailscope_ingest_decode_seconds"))

            if self.decoder:
                family("tailscope_ingest_decoder_info", "gauge", "The OTLP protobuf traces decoder in use (compiled: collector/_otlpfast.c; python: the pure-Python one).")
                out.append(f'tailscope_ingest_decoder_info{{decoder="{_escape(self.decoder)}"}} 1')
            family("tailscope_profiler_uploads_total", "counter", "Profiler trace files stored.")
            out.append(f"tailscope_profiler_uploads_total {self.profiler_uploads}")
            family("tailscope_profiler_upload_bytes_total", "counter", "Bytes of profiler trace files stored.")
            out.append(f"tailscope_profiler_upload_bytes_total {self.profiler_bytes}")
            gauges = list(self._gauges.items())

        for name, (help_text, read) in gauges:
            try:
                value = float(read())
            except Exception:  # a gauge that cannot be read is left out, not a failed scrape
                continue
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name} {_fmt(value)}")
        return "\n".join(out) + "\n"
