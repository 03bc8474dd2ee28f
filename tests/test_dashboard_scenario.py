"""A small, realistic scenario sent through the real OTLP ingest, for the dashboard tests.

Two services on two GPU nodes over the last 30 minutes, plus three days of
light background traffic (for the hour-of-day page):

* ``chat-api`` on ``replica-1`` (gpu-node-1 GPU 0) and ``replica-2``
  (gpu-node-1 GPU 1), 2.2 requests/s each: request spans with queue/prefill/decode children,
  batch spans linked to their members, KV-eviction log records.
* Between ``now - 16 min`` and ``now - 10 min`` replica-2 sees new input
  lengths and recompiles (torch.compile guard failures, 2.5–4 s each); every
  request that arrives on replica-2 while a compile runs is stalled behind it.
  That is the incident the pages must show, with cause ``compile_miss``.
* ``embed-api`` on ``gpu-node-2``: requests calling an upstream provider
  whose latency follows its hour of day, also over the three days before
  (chat-api has no such background: a service's windows widen with sparse
  traffic, and the spike must stay sharp).
* GPU gauges every 15 s (utilisation, memory, clocks, power, temperature,
  clocks-event reasons, per-process memory), with a short power-cap episode
  on gpu-node-1 GPU 0 well before the incident.

Traces go through the stock OpenTelemetry SDK and its OTLP/HTTP exporter;
metrics and logs are OTLP/HTTP protobuf built with ``opentelemetry-proto``
(the SDK stamps metric points with the collection time, and this scenario
needs history). Everything is deterministic for a given ``now``.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

INCIDENT_START_MIN = 16  # minutes before now
INCIDENT_END_MIN = 10
RECENT_MIN = 30
CHAT_RATE = 2.2  # requests/s per chat-api replica: >100 per minute window, as spike detection needs
BACKGROUND_DAYS = 3
GPU_STEP_S = 15


def _ns(t: dt.datetime) -> int:
    return int(t.timestamp() * 1e9)


@dataclass
class Scenario:
    """What was sent, for assertions (counts, the incident window)."""

    now: dt.datetime
    incident_start: dt.datetime
    incident_end: dt.datetime
    requests: int = 0
    compiles: int = 0
    stalled_traces: list[str] = field(default_factory=list)
    spans: int = 0
    metric_points: int = 0
    log_records: int = 0


class _Traces:
    """One TracerProvider per resource (service + instance + host), OTLP/HTTP exporter."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.providers: dict[tuple[str, str, str], Any] = {}

    def tracer(self, service: str, instance: str, host: str, pid: int) -> Any:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        key = (service, instance, host)
        if key not in self.providers:
            resource = Resource.create({"service.name": service, "service.instance.id": instance, "host.name": host, "process.pid": pid})
            provider = TracerProvider(resource=resource)
            exporter = OTLPSpanExporter(endpoint=self.url + "/v1/traces", timeout=30)
            provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=200_000, max_export_batch_size=2048, schedule_delay_millis=200))
            self.providers[key] = provider
        return self.providers[key].get_tracer("tailscope.tests.scenario")

    def close(self) -> None:
        for provider in self.providers.values():
            if not provider.force_flush(60_000):
                raise RuntimeError("the OTLP span exporter did not flush within 60 s")
            provider.shutdown()


def _span(tracer: Any, name: str, start: dt.datetime, end: dt.datetime, *, parent: Any = None, kind: Any = None, attrs: dict[str, Any] | None = None, links: list[Any] | None = None) -> Any:
    from opentelemetry import trace

    kwargs: dict[str, Any] = {"start_time": _ns(start), "attributes": attrs or {}}
    if parent is not None:
        kwargs["context"] = trace.set_span_in_context(parent)
    else:
        from opentelemetry.context import Context

        kwargs["context"] = Context()
    if kind is not None:
        kwargs["kind"] = kind
    if links:
        kwargs["links"] = links
    span = tracer.start_span(name, **kwargs)
    span.end(end_time=_ns(end))
    return span


def _kv(key: str, value: Any) -> Any:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _post(url: str, path: str, body: bytes) -> None:
    r = httpx.post(url + path, content=body, headers={"Content-Type": "application/x-protobuf"}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"POST {path} answered {r.status_code}: {r.text[:300]}")


def _send_gpu_metrics(url: str, now: dt.datetime, sc: Scenario) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    rng = random.Random(7)
    gpus = [("gpu-node-1", 0, 4101), ("gpu-node-1", 1, 4102), ("gpu-node-2", 0, 4201)]
    start = now - dt.timedelta(minutes=RECENT_MIN)
    throttle_a, throttle_b = now - dt.timedelta(minutes=27), now - dt.timedelta(minutes=24)
    for host, index, pid in gpus:
        series: dict[str, list[tuple[dt.datetime, float, dict[str, Any]]]] = {}
        t = start
        while t < now:
            busy = 0.55 + 0.25 * math.sin(t.timestamp() / 300.0 + index) + rng.uniform(-0.05, 0.05)
            throttled = host == "gpu-node-1" and index == 0 and throttle_a <= t < throttle_b
            attrs = {"gpu.index": index, "gpu.uuid": f"GPU-{host}-{index}", "gpu.name": "NVIDIA H100 80GB HBM3"}

            def put(name: str, value: float, extra: dict[str, Any] | None = None) -> None:
                series.setdefault(name, []).append((t, value, {**attrs, **(extra or {})}))

            put("tailscope.gpu.utilization", max(0.0, min(1.0, busy)))
            put("tailscope.gpu.memory.total", 85_520_809_984.0)
            put("tailscope.gpu.memory.used", 52e9 + 6e9 * busy)
            put("tailscope.gpu.sm_clock", 1410.0 if throttled else 1980.0 - rng.uniform(0, 30))
            put("tailscope.gpu.sm_clock.max", 1980.0)
            put("tailscope.gpu.power", 698.0 if throttled else 380.0 + 250.0 * busy)
            put("tailscope.gpu.power.limit", 700.0)
            put("tailscope.gpu.temperature", 58.0 + 12.0 * busy)
            put("tailscope.gpu.clock_event_reasons", 4.0 if throttled else 0.0)
            put("tailscope.gpu.process.memory.used", 50e9 + 6e9 * busy, {"process.pid": pid})
            t += dt.timedelta(seconds=GPU_STEP_S)
        metrics = []
        for name, points in series.items():
            dps = [NumberDataPoint(time_unix_nano=_ns(pt), as_double=v, attributes=[_kv(k, a) for k, a in at.items()]) for pt, v, at in points]
            metrics.append(Metric(name=name, gauge=Gauge(data_points=dps)))
            sc.metric_points += len(dps)
        resource = Resource(attributes=[_kv("host.name", host), _kv("service.name", "tailscope-agent")])
        req = ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[ScopeMetrics(metrics=metrics)])])
        _post(url, "/v1/metrics", req.SerializeToString())


def _send_evictions(url: str, records: list[tuple[dt.datetime, str, str, dict[str, Any]]], sc: Scenario) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    by_instance: dict[str, list[Any]] = {}
    for t, instance, host, attrs in records:
        rec = LogRecord(
            time_unix_nano=_ns(t),
            observed_time_unix_nano=_ns(t),
            severity_number=13,
            severity_text="WARN",
            body=AnyValue(string_value="KV cache eviction"),
            attributes=[_kv("event.name", "tailscope.kv.eviction")] + [_kv(k, v) for k, v in attrs.items()],
        )
        by_instance.setdefault(instance + "|" + host, []).append(rec)
    resource_logs = []
    for key, recs in by_instance.items():
        instance, host = key.split("|")
        res = Resource(attributes=[_kv("service.name", "chat-api"), _kv("service.instance.id", instance), _kv("host.name", host)])
        resource_logs.append(ResourceLogs(resource=res, scope_logs=[ScopeLogs(log_records=recs)]))
        sc.log_records += len(recs)
    if resource_logs:
        _post(url, "/v1/logs", ExportLogsServiceRequest(resource_logs=resource_logs).SerializeToString())


def send_scenario(url: str, now: dt.datetime | None = None) -> Scenario:
    """Send the whole scenario to the server at ``url``; returns what was sent."""
    from opentelemetry.trace import Link, SpanKind

    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    sc = Scenario(now=now, incident_start=now - dt.timedelta(minutes=INCIDENT_START_MIN), incident_end=now - dt.timedelta(minutes=INCIDENT_END_MIN))
    rng = random.Random(42)
    traces = _Traces(url)
    evictions: list[tuple[dt.datetime, str, str, dict[str, Any]]] = []

    replicas = {"replica-1": ("gpu-node-1", 0, 4101), "replica-2": ("gpu-node-1", 1, 4102)}
    # Compile stalls on replica-2 inside the incident window: (start, end, shape, expected).
    compiles: list[tuple[dt.datetime, dt.datetime, int, int]] = []
    t = sc.incident_start + dt.timedelta(seconds=10)
    expected = 64
    while t < sc.incident_end - dt.timedelta(seconds=20):
        length = rng.choice([n for n in (65, 71, 77, 83, 90, 97, 103, 111, 118, 126) if n != expected])
        dur = rng.uniform(2.5, 4.0)
        compiles.append((t, t + dt.timedelta(seconds=dur), length, expected))
        expected = length
        t += dt.timedelta(seconds=dur + rng.uniform(12, 30))

    def stalled_until(instance: str, at: dt.datetime) -> tuple[dt.datetime, int] | None:
        if instance != "replica-2":
            return None
        for c0, c1, length, _ in compiles:
            if c0 <= at < c1:
                return c1, length
        return None

    def request(tracer: Any, service: str, instance: str, host: str, gpu: int, at: dt.datetime, *, provider: dict[str, Any] | None = None, batch_state: dict[str, Any] | None = None) -> tuple[Any, dt.datetime, int]:
        input_tokens = int(min(4000, max(8, rng.lognormvariate(4.2, 0.7))))
        if rng.random() < 0.03:
            input_tokens = rng.randint(1500, 3000)  # the occasional long prompt
        output_tokens = rng.randint(8, 64)
        shape_len = 1 << max(4, (input_tokens - 1).bit_length())  # padded to a power of two
        queue_s = rng.uniform(0.004, 0.03)
        stall = stalled_until(instance, at)
        if stall is not None:
            queue_s += (stall[0] - at).total_seconds()
            shape_len = input_tokens = stall[1]  # it ran with the new, unpadded length
        prefill_s = 0.02 + 0.00006 * shape_len
        decode_s = output_tokens * rng.uniform(0.011, 0.016)
        provider_s = 0.0
        if provider is not None:
            hour = at.hour
            provider_s = provider["base"] * (1.0 + 0.8 * max(0.0, math.sin((hour - 9) / 24 * 2 * math.pi))) * rng.uniform(0.8, 1.3)
            if rng.random() < 0.02:
                provider_s *= 3
        total = queue_s + prefill_s + decode_s + provider_s
        end = at + dt.timedelta(seconds=total)
        attrs = {
            "tailscope.role": "request",
            "gen_ai.request.model": "llama-3-8b" if service == "chat-api" else "bge-large",
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
            "tailscope.shape.len": shape_len,
            "tailscope.gpu.index": gpu,
            "session.id": f"s-{rng.randint(1, 400)}",
        }
        batch_id = None
        if batch_state is not None:
            batch_id = batch_state["id"]
            attrs["tailscope.batch.id"] = batch_id
        root = _span(tracer, "POST /v1/chat/completions" if service == "chat-api" else "POST /v1/embeddings", at, end, kind=SpanKind.SERVER, attrs=attrs)
        sc.requests += 1
        sc.spans += 1
        if stall is not None:
            sc.stalled_traces.append(format(root.get_span_context().trace_id, "032x"))
        cur = at
        stages = [("queue", queue_s), ("prefill", prefill_s), ("decode", decode_s)]
        if provider is not None:
            stages = [("queue", queue_s), ("provider_call", provider_s), ("decode", prefill_s + decode_s)]
        for role, secs in stages:
            nxt = cur + dt.timedelta(seconds=secs)
            extra: dict[str, Any] = {"tailscope.role": role}
            kind = SpanKind.INTERNAL
            if role == "provider_call" and provider is not None:
                kind = SpanKind.CLIENT
                extra.update({"gen_ai.system": provider["system"], "server.address": provider["address"], "tailscope.provider.region": provider["region"]})
            _span(tracer, role, cur, nxt, parent=root, kind=kind, attrs=extra)
            sc.spans += 1
            cur = nxt
        return root, end, input_tokens

    # --- chat-api: recent traffic, batched per replica -----------------------
    start = now - dt.timedelta(minutes=RECENT_MIN)
    for instance, (host, gpu, pid) in replicas.items():
        tracer = traces.tracer("chat-api", instance, host, pid)
        t = start + dt.timedelta(seconds=rng.uniform(0, 2))
        batch_no = 0
        while t < now - dt.timedelta(seconds=30):
            batch_no += 1
            size = rng.choice([1, 2, 2, 3, 4])
            state = {"id": f"{instance}-b{batch_no}"}
            members = []
            for _ in range(size):
                members.append(request(tracer, "chat-api", instance, host, gpu, t, batch_state=state))
                t += dt.timedelta(seconds=rng.expovariate(CHAT_RATE))
            b_start = members[0][0].start_time
            b_end = max(m[1] for m in members)
            lengths = [m[2] for m in members]
            padded = max(1 << max(4, (n - 1).bit_length()) for n in lengths)
            _span(
                tracer,
                "forward_batch",
                dt.datetime.fromtimestamp(b_start / 1e9, tz=dt.timezone.utc),
                b_end,
                attrs={
                    "tailscope.role": "batch",
                    "tailscope.batch.id": state["id"],
                    "tailscope.batch.size": size,
                    "tailscope.batch.max_len": max(lengths),
                    "tailscope.batch.min_len": min(lengths),
                    "tailscope.batch.real_tokens": sum(lengths),
                    "tailscope.batch.padded_tokens": padded * size,
                    "tailscope.batch.wait": rng.uniform(0.001, 0.02),
                },
                links=[Link(m[0].get_span_context()) for m in members],
            )
            sc.spans += 1
            if instance == "replica-1" and rng.random() < 0.02:
                evictions.append((b_end, instance, host, {"tailscope.kv.blocks": rng.randint(4, 64), "tailscope.kv.reason": "capacity", "tailscope.kv.usage": round(rng.uniform(0.85, 0.97), 3)}))
        if instance == "replica-2":
            for c0, c1, length, exp in compiles:
                _span(
                    tracer,
                    "torch.compile",
                    c0,
                    c1,
                    attrs={
                        "tailscope.role": "compile",
                        "tailscope.compile.backend": "inductor",
                        "tailscope.compile.kind": "recompile",
                        "tailscope.compile.reason": f"tensor 'x' size mismatch at index 1. expected {exp}, actual {length}",
                        "tailscope.compile.frame": "forward",
                        "tailscope.compile.shape": f"[1, {length}]",
                        "tailscope.compile.cache": "miss",
                    },
                )
                sc.compiles += 1
                sc.spans += 1

    # --- embed-api: recent traffic and background days, through a provider ---
    provider = {"system": "openai", "address": "api.openai.com", "region": "America/New_York", "base": 0.18}
    tracer = traces.tracer("embed-api", "embed-1", "gpu-node-2", 4201)
    t = start
    while t < now - dt.timedelta(seconds=30):
        request(tracer, "embed-api", "embed-1", "gpu-node-2", 0, t, provider=provider)
        t += dt.timedelta(seconds=rng.expovariate(0.35))
    bg_start = (now - dt.timedelta(days=BACKGROUND_DAYS)).replace(minute=0, second=0)
    hour = bg_start
    while hour < start - dt.timedelta(hours=1):
        for _ in range(6):
            at = hour + dt.timedelta(seconds=rng.uniform(0, 3600))
            request(tracer, "embed-api", "embed-1", "gpu-node-2", 0, at, provider=provider)
        hour += dt.timedelta(hours=1)

    traces.close()
    _send_gpu_metrics(url, now, sc)
    _send_evictions(url, evictions, sc)
    return sc


def wait_ingested(running: Any, sc: Scenario, timeout_s: float = 60.0, extra: int = 0) -> None:
    """Block until every span sent is queryable (ingest acks after commit, but the SDK exports async).

    ``extra``: spans other senders put in the same store.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cur = running.store.cursor()
        try:
            n = cur.execute("SELECT count(*) FROM spans").fetchone()[0]
        finally:
            cur.close()
        if n >= sc.spans + extra:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {n} of {sc.spans + extra} spans arrived within {timeout_s} s")
