"""Decoder throughput: OTLP export requests of spec-shaped request spans → Arrow tables.

Builds ``--batches`` distinct ExportTraceServiceRequests of ``--spans`` request
spans each (12 attributes per span as in TELEMETRY.md section 3: role, model,
token counts, vLLM latencies, request/session/batch ids, shape, GPU, priority;
ids, token counts and latencies differ from span to span, so the decoder's
memo of repeated attributes helps only where real traffic repeats too), encodes
them as protobuf and as OTLP/JSON, and times ``collector.otlp.decode`` on each
(one process, one core). Prints one JSON object:

    {"spans_per_batch", "batches", "protobuf": {"spans_per_s", "us_per_span",
     "cpu_spans_per_s", "cpu_us_per_span", "runs_spans_per_s"}, "json": {...},
     "bytes_per_span": {...}, "load_average": [...]}

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


def time_runs(bodies: list[bytes], content_type: str, runs: int, n_spans: int) -> dict[str, object]:
    """Wall-clock and CPU-time rates; on a shared machine the CPU figure is the steadier one."""
    rates, cpu_rates = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0
        for body in bodies:
            total += otlp.decode("traces", body, content_type).accepted
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        assert total == n_spans * len(bodies), total
        rates.append(total / dt)
        cpu_rates.append(total / dc)
    med, cpu_med = statistics.median(rates), statistics.median(cpu_rates)
    return {"spans_per_s": round(med), "us_per_span": round(1e6 / med, 2),
            "cpu_spans_per_s": round(cpu_med), "cpu_us_per_span": round(1e6 / cpu_med, 2),
            "runs_spans_per_s": [round(r) for r in rates]}


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
    # warm-up (imports, descriptor pool) outside the timed runs
    otlp.decode("traces", pb[0], otlp.PROTOBUF)
    otlp.decode("traces", js[0], otlp.JSON)
    result = {
        "spans_per_batch": args.spans,
        "batches": args.batches,
        "attributes_per_span": 12,
        "protobuf": time_runs(pb, otlp.PROTOBUF, args.runs, args.spans),
        "json": time_runs(js, otlp.JSON, args.runs, args.spans),
        "bytes_per_span": {"protobuf": round(sum(map(len, pb)) / (args.spans * args.batches)),
                           "json": round(sum(map(len, js)) / (args.spans * args.batches))},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
