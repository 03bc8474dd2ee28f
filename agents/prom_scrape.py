"""Scrape Prometheus ``/metrics`` of serving engines (vLLM, SGLang, TGI) and forward as OTLP.

Why: many engines emit no spans, but their KV-cache usage, preemptions and
queue depths (``vllm:kv_cache_usage_perc``, ``vllm:num_preemptions_total``,
``vllm:num_requests_waiting``) are exactly the evidence for the
``kv_eviction`` and ``queue_saturation`` causes. Metrics keep their own names
(spec section 7); labels become attributes; the scrape target's
``service.name`` / ``service.instance.id`` go on the resource.

The text exposition format is parsed here (no prometheus_client dependency on
GPU nodes) and parsed forgivingly: real endpoints and docs contain malformed
families (the vLLM docs' TTFT histogram has no ``+Inf`` bucket and no
``_sum``). What is valid is kept, what is not is counted in
:class:`ParseResult` and logged once per target.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import httpx

from agents.otlp_encode import MetricPoint

log = logging.getLogger("tailscope.agent.prom")

__all__ = ["Sample", "ParseResult", "parse_exposition", "to_points", "PromScraper", "ExpositionError"]


class ExpositionError(ValueError):
    """A line of Prometheus text exposition that cannot be parsed."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    timestamp_ms: int | None = None


@dataclass
class ParseResult:
    """Samples, the declared ``# TYPE`` of each family, and what had to be skipped."""

    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    invalid_lines: int = 0
    errors: list[str] = field(default_factory=list)  # first few messages, for the log
    incomplete_histograms: int = 0  # kept, but missing +Inf bucket and/or _sum
    invalid_histograms: int = 0  # dropped: no usable total

    def error(self, msg: str) -> None:
        self.invalid_lines += 1
        if len(self.errors) < 10:
            self.errors.append(msg)


_NAME_START = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_:")
_NAME_CHARS = _NAME_START | set("0123456789")


def _parse_value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)  # raises ValueError


def parse_sample_line(line: str) -> Sample:
    """``name{label="v",...} value [timestamp_ms]`` → :class:`Sample` (raises :class:`ExpositionError`)."""
    i, n = 0, len(line)
    while i < n and line[i] in _NAME_CHARS:
        i += 1
    name = line[:i]
    if not name or name[0] not in _NAME_START:
        raise ExpositionError(f"bad metric name in {line[:80]!r}")
    labels: list[tuple[str, str]] = []
    while i < n and line[i] in " \t":
        i += 1
    if i < n and line[i] == "{":
        i += 1
        while True:
            while i < n and line[i] in " \t,":
                i += 1
            if i < n and line[i] == "}":
                i += 1
                break
            j = i
            while j < n and line[j] in _NAME_CHARS:
                j += 1
            lname = line[i:j]
            if not lname:
                raise ExpositionError(f"bad label name in {line[:80]!r}")
            i = j
            while i < n and line[i] in " \t":
                i += 1
            if i >= n or line[i] != "=":
                raise ExpositionError(f"expected '=' after label {lname!r} in {line[:80]!r}")
            i += 1
            while i < n and line[i] in " \t":
                i += 1
            if i >= n or line[i] != '"':
                raise ExpositionError(f"expected a quoted value for label {lname!r}")
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise ExpositionError(f"unterminated label value for {lname!r}")
                c = line[i]
                if c == "\\" and i + 1 < n:
                    nxt = line[i + 1]
                    buf.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                buf.append(c)
                i += 1
            labels.append((lname, "".join(buf)))
    rest = line[i:].split()
    if not rest or len(rest) > 2:
        raise ExpositionError(f"expected 'value [timestamp]' after {name!r}, got {line[i:][:40]!r}")
    try:
        value = _parse_value(rest[0])
    except ValueError:
        raise ExpositionError(f"bad value {rest[0]!r} for {name!r}") from None
    ts = None
    if len(rest) == 2:
        try:
            ts = int(float(rest[1]))
        except ValueError:
            raise ExpositionError(f"bad timestamp {rest[1]!r} for {name!r}") from None
    return Sample(name, tuple(labels), value, ts)


def parse_exposition(text: str) -> ParseResult:
    """Parse Prometheus text format 0.0.4 (and the OpenMetrics subset engines emit)."""
    out = ParseResult()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == "TYPE":
                out.types[parts[2]] = parts[3].strip().lower() if len(parts) > 3 else "untyped"
            elif len(parts) >= 3 and parts[1] == "HELP":
                out.helps[parts[2]] = parts[3] if len(parts) > 3 else ""
            continue  # other comments, "# EOF"
        try:
            out.samples.append(parse_sample_line(line))
        except ExpositionError as exc:
            out.error(f"line {lineno}: {exc}")
    return out


def _family_of(name: str, types: Mapping[str, str]) -> tuple[str, str, str]:
    """(family, type, suffix) for a sample name, using ``# TYPE`` declarations."""
    if name in types:
        return name, types[name], ""
    for suffix in ("_bucket", "_count", "_sum", "_created", "_total", "_gcount", "_gsum"):
        if name.endswith(suffix):
            fam = name[: -len(suffix)]
            if fam in types:
                return fam, types[fam], suffix
    return name, "untyped", ""


@dataclass
class _Hist:
    buckets: dict[float, float] = field(default_factory=dict)
    count: float | None = None
    sum: float | None = None
    ts: int | None = None


def to_points(result: ParseResult, resource: Mapping[str, Any], now_ns: int, start_ns: int) -> list[MetricPoint]:
    """Turn parsed samples into OTLP points: gauges; counters as monotonic cumulative sums;
    histograms as OTLP histograms (bucket counts made per-bucket); summaries' quantiles as gauges."""
    points: list[MetricPoint] = []
    hists: dict[tuple[str, tuple], _Hist] = {}
    for s in result.samples:
        fam, typ, suffix = _family_of(s.name, result.types)
        t = s.timestamp_ms * 1_000_000 if s.timestamp_ms is not None else now_ns
        attrs = dict(s.labels)
        if typ == "histogram" and suffix in ("_bucket", "_count", "_sum"):
            le = attrs.pop("le", None)
            h = hists.setdefault((fam, tuple(sorted(attrs.items()))), _Hist())
            h.ts = s.timestamp_ms
            if suffix == "_bucket":
                if le is None:
                    result.error(f"{s.name}: bucket without 'le'")
                    continue
                try:
                    h.buckets[_parse_value(le)] = s.value
                except ValueError:
                    result.error(f"{s.name}: bad le={le!r}")
            elif suffix == "_count":
                h.count = s.value
            else:
                h.sum = s.value
            continue
        if typ == "counter" or (typ in ("summary", "histogram") and suffix in ("_count", "_sum")):
            if suffix == "_created":
                continue
            if math.isnan(s.value) or s.value < 0:
                result.error(f"{s.name}: counter value {s.value} is not a non-negative number")
                continue
            points.append(MetricPoint.make(s.name, float(s.value), t, attrs, resource, kind="sum", monotonic=True,
                                           start_time_unix_nano=start_ns, description=result.helps.get(fam, "")))
            continue
        if suffix == "_created":
            continue
        # gauge, untyped, summary quantiles ({quantile=...} stays an attribute), info/stateset values
        points.append(MetricPoint.make(s.name, float(s.value), t, attrs, resource,
                                       description=result.helps.get(fam, "")))
    for (fam, attrs_t), h in hists.items():
        p = _histogram_point(fam, dict(attrs_t), h, result, resource, now_ns, start_ns)
        if p is not None:
            points.append(p)
    return points


def _histogram_point(fam: str, attrs: dict[str, str], h: _Hist, result: ParseResult, resource: Mapping[str, Any],
                     now_ns: int, start_ns: int) -> MetricPoint | None:
    finite = sorted(b for b in h.buckets if not math.isinf(b) and not math.isnan(b))
    total = h.buckets.get(math.inf)
    incomplete = False
    if total is None:
        incomplete = True
        total = h.count  # the +Inf bucket always equals _count
        if total is None:
            result.invalid_histograms += 1
            result.error(f"{fam}{attrs}: histogram has neither a +Inf bucket nor _count; dropped")
            return None
    if h.sum is None:
        incomplete = True
    cumulative = [h.buckets[b] for b in finite] + [total]
    if any(b < a for a, b in zip(cumulative, cumulative[1:])):
        result.invalid_histograms += 1
        result.error(f"{fam}{attrs}: bucket counts are not cumulative; dropped")
        return None
    per_bucket = [int(round(cumulative[0]))] + [int(round(b - a)) for a, b in zip(cumulative, cumulative[1:])]
    if incomplete:
        result.incomplete_histograms += 1
    t = h.ts * 1_000_000 if h.ts is not None else now_ns
    return MetricPoint.make(fam, None, t, attrs, resource, kind="histogram", start_time_unix_nano=start_ns,
                            bucket_counts=tuple(per_bucket), explicit_bounds=tuple(float(b) for b in finite),
                            count=int(round(total)), hist_sum=h.sum, description=result.helps.get(fam, ""))


class PromScraper:
    """Scrapes one ``/metrics`` URL every ``interval`` seconds and submits the points."""

    def __init__(self, url: str, resource: Mapping[str, Any], submit: Callable[[Any], bool],
                 interval: float = 5.0, timeout: float = 5.0, client: httpx.Client | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--scrape URL must start with http:// or https://, got {url!r}")
        self.url = url
        self.resource = dict(resource)
        self.submit = submit
        self.interval = interval
        self.client = client or httpx.Client(timeout=timeout, headers={"Accept": "text/plain;version=0.0.4"})
        self.start_ns = time.time_ns()
        self.scrapes = 0
        self.failures = 0
        self._logged_invalid = False
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape_once(self) -> list[MetricPoint]:
        try:
            resp = self.client.get(self.url)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning("scrape of %s failed: %s: %s (will keep trying every %.0f s)", self.url, type(exc).__name__, exc, self.interval)
            return []
        if self._failing:
            self._failing = False
            log.warning("scrape of %s works again", self.url)
        result = parse_exposition(resp.text)
        points = to_points(result, self.resource, time.time_ns(), self.start_ns)
        if (result.invalid_lines or result.incomplete_histograms) and not self._logged_invalid:
            self._logged_invalid = True
            log.warning("%s: skipped %d invalid line(s), kept %d incomplete histogram(s); first problems: %s",
                        self.url, result.invalid_lines, result.incomplete_histograms, "; ".join(result.errors[:3]))
        self.scrapes += 1
        return points

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailscope-prom-scrape", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for p in self.scrape_once():
                    self.submit(p)
            except Exception:  # noqa: BLE001 - keep scraping
                log.exception("scrape of %s failed", self.url)
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()
