"""Decoder throughput: OTLP export requests of spec-shaped request spans → Arrow tables.

Builds ``--batches`` distinct ExportTraceServiceRequests of ``--spans`` request
spans each (12 attributes per span as in TELEMETRY.md section 3: role, model,
token counts, vLLM latencies, request/session/batch ids, shape, GPU, priority;
ids, token counts and latencies differ from span to span, so the decoder's
once-per-batch handling of repeated attributes helps only where real traffic
repeats too), encodes them as protobuf and as OTLP/JSON, and times
``collector.otlp.decode`` on each (one process, one core): protobuf with the
compiled decoder (collector/_otlpfast.c, when built) and with the pure-Python
one, and OTLP/JSON. Prints one JSON object:

    {"spans_per_batch", "batches", "protobuf": {"spans_per_s", "us_per_span",
     "cpu_spans_per_s", "cpu_us_per_span", "runs_spans_per_s"} (compiled when built),
     "protobuf_python": {...}, "protobuf_compiled": {...} | null, "json": {...},
     "naive_loop_reference": {...}, "bytes_per_span": {...}, "load_average": [...]}

``naive_loop_reference`` times a plain per-attribute Python loop over the stock
classes (no typed columns, no validation, no Arrow) on the same bodies, as a
yardstick that moves with the machine's load.

``spans_per_s`` is the median over ``--runs`` runs, each decoding every batch
once (wall clock); ``cpu_spans_per_s`` the same per CPU second of this process,
which is the steadier figure when other work shares the cores.

Usage: ``python benchmarks/decode.py [--spans 1000] [--batches 20] [--runs 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from collector import otlp  # noqa: E402

MODELS = ["llama-3-8b", "llama-3-70b", "mistral-7b"]


def build_request(rng: random.Random, n: int, base_ns: int, seq: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for key, val in (("service.name", "chat-api"), ("service.instance.id", f"replica-{seq % 4}"),
                     ("host.name", f"gpu-node-{seq % 2}"), ("process.pid", 4242 + seq % 4)):
        kv = rs.resource.attributes.add(key=key)
        if isinstance(val, int):
            kv.value.int_value = val
        else:
            kv.value.string_value = val
    ss = rs.scope_spans.add()
    ss.scope.name = "tailscope.bench"
    for i in range(n):
        s = ss.spans.add()
        s.trace_id = rng.randbytes(16)
        s.span_id = rng.randbytes(8)
        s.name = "llm_request"
        s.kind = 2
        start = base_ns + i * 1_000_000
        s.start_time_unix_nano = start
        s.end_time_unix_nano = start + rng.randint(50, 5000) * 1_000_000
        inp, out = rng.randint(16, 4096), rng.randint(1, 1024)
        attrs = (
            ("tailscope.role", "request"),
            ("gen_ai.request.model", rng.choice(MODELS)),
            ("gen_ai.usage.input_tokens", inp),
            ("gen_ai.usage.output_tokens", out),
            ("gen_ai.latency.time_in_queue", rng.random() * 0.2),
            ("gen_ai.latency.time_to_first_token", rng.random()),
            ("gen_ai.latency.e2e", rng.random() * 5),
            ("gen_ai.request.id", f"cmpl-{rng.getrandbits(64):016x}"),
            ("session.id", f"sess-{rng.randrange(5000)}"),
            ("tailscope.shape.len", 1 << max(4, (inp - 1).bit_length())),
            ("tailscope.batch.id", f"b-{seq}-{i // 16}"),
            ("tailscope.gpu.index", rng.randrange(8)),
        )
        for key, val in attrs:
            kv = s.attributes.add(key=key)
            if isinstance(val, str):
                kv.value.string_value = val
            elif isinstance(val, int):
                kv.value.int_value = val
            else:
                kv.value.double_value = val
    return req


def to_otlp_json(req: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as exporters write it: hex ids, int64 as strings, camelCase."""
    from collector.otlp_json import to_otlp_json as encode

    return json.dumps(encode(req)).encode()


def _timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return time.perf_counter() - t0, time.process_time() - c0, n


def _summary(walls: list[float], cpus: list[float], spans: int) -> dict[str, object]:
    rate, cpu_rate = spans / statistics.median(walls), spans / statistics.median(cpus)
    return {"spans_per_s": round(rate), "us_per_span": round(1e6 / rate, 2),
            "cpu_spans_per_s": round(cpu_rate), "cpu_us_per_span": round(1e6 / cpu_rate, 2),
            "runs_spans_per_s": [round(spans / w) for w in walls]}


def naive_decode(body: bytes) -> int:
    """Reference point, not the product: the straightforward loop over stock classes
    (oneof per attribute, dict, json.dumps), without typed columns or validation."""
    req = ExportTraceServiceRequest.FromString(body)
    rows = []
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                attrs = {}
                for kv in s.attributes:
                    v = kv.value
                    attrs[kv.key] = getattr(v, v.WhichOneof("value"))
                rows.append((s.trace_id.hex(), s.span_id.hex(), s.name, s.start_time_unix_nano,
                             s.end_time_unix_nano, json.dumps(attrs)))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spans", type=int, default=1000, help="spans per export request")
    ap.add_argument("--batches", type=int, default=20, help="distinct requests per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = 1_763_900_000 * 10**9
    reqs = [build_request(rng, args.spans, base + k * 10**12, k) for k in range(args.batches)]
    pb = [r.SerializeToString() for r in reqs]
    js = [to_otlp_json(r) for r in reqs]
    # warm-up (imports, Arrow kernels) outside the timed runs
    otlp.warm_up()
    naive_decode(pb[0])
    spans = args.spans * args.batches
    compiled = otlp.compiled_available()
    runs: list[tuple[str, Callable[[], int]]] = [
        ("naive", lambda: sum(naive_decode(b) for b in pb)),
        ("protobuf_python", lambda: sum(otlp.decode("traces", b, otlp.PROTOBUF, decoder="python").accepted for b in pb)),
        ("json", lambda: sum(otlp.decode("traces", b, otlp.JSON).accepted for b in js)),
    ]
    if compiled:
        runs.insert(1, ("protobuf_compiled", lambda: sum(otlp.decode("traces", b, otlp.PROTOBUF, decoder="compiled").accepted for b in pb)))
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k, _ in runs}
    for _ in range(args.runs):  # interleaved, so load changes on a shared machine hit all alike
        for key, fn in runs:
            wall, cpu, n = _timed(fn)
            assert n == spans, (key, n)
            times[key][0].append(wall)
            times[key][1].append(cpu)
    result = {
        "spans_per_batch": args.spans,
        "batches": args.batches,
        "attributes_per_span": 12,
        "protobuf": _summary(*times["protobuf_compiled" if compiled else "protobuf_python"], spans),
        "protobuf_python": _summary(*times["protobuf_python"], spans),
        "protobuf_compiled": _summary(*times["protobuf_compiled"], spans) if compiled else None,
        "json": _summary(*times["json"], spans),
        "naive_loop_reference": _summary(*times["naive"], spans),
        "bytes_per_span": {"protobuf": round(sum(map(len, pb)) / spans), "json": round(sum(map(len, js)) / spans)},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
