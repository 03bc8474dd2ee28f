"""A tiny PyTorch model served by a small batching loop, instrumented with agents.torch.

What it shows (see docs/instrumentation.md):
- a ``model_load`` stage and the ``tailscope.replica.ready`` event at start;
- per request: a request span with queue / prefill / decode stages;
- per forward batch: a batch span linked to its members, made active so that
  torch.compile's compile spans nest under it;
- ``torch.compile(dynamic=False)``: every new padded length is a recompile,
  visible as a compile span with its guard-failure reason and shape; with
  ``--buckets 16,32,64`` lengths are padded to a few buckets and the
  recompiles stop after the first of each;
- a small KV-block pool that evicts the oldest sequence when full
  (``tailscope.kv.eviction``) and reports its usage (``tailscope.kv.usage``).

Run a server first (``tailscope serve``), then::

    python examples/serve_tiny.py --endpoint http://127.0.0.1:4318 --requests 200

and look: ``tailscope sql "SELECT compile_kind, compile_reason, compile_shape,
duration_ms FROM spans WHERE role = 'compile'"``. Finishes in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from agents.torch import instrument  # noqa: E402

HIDDEN = 32
VOCAB = 128


class TinyLM(torch.nn.Module):
    """Embedding -> Linear+ReLU -> vocabulary logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mlp = torch.nn.Linear(HIDDEN, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mlp(self.emb(tokens))))


class KVPool:
    """A fixed number of KV blocks; the least recently admitted sequence is evicted when full."""

    def __init__(self, blocks: int, block_tokens: int = 16) -> None:
        self.blocks = blocks
        self.block_tokens = block_tokens
        self.used: OrderedDict[str, int] = OrderedDict()

    def usage(self) -> float:
        return sum(self.used.values()) / self.blocks

    def admit(self, key: str, tokens: int) -> list[tuple[str, int]]:
        need = -(-tokens // self.block_tokens)
        evicted = []
        while self.used and sum(self.used.values()) + need > self.blocks:
            victim, n = self.used.popitem(last=False)
            evicted.append((victim, n))
        self.used[key] = min(need, self.blocks)
        return evicted


def pad_to(length: int, buckets: list[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return length


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Serve a tiny model with tailscope instrumentation.")
    ap.add_argument("--endpoint", default="http://127.0.0.1:4318", help="tailscope server (OTLP/HTTP base URL)")
    ap.add_argument("--token", default=None, help="bearer token, if the server requires one")
    ap.add_argument("--service", default="tiny-api")
    ap.add_argument("--instance-id", default="tiny-0")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=48, help="longest prompt (tokens)")
    ap.add_argument("--buckets", default="", help="comma-separated pad buckets, e.g. 16,32,64 (default: no padding)")
    ap.add_argument("--backend", default="eager", help="torch.compile backend (eager is fast on CPU; inductor is real)")
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--kv-blocks", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    buckets = sorted(int(b) for b in args.buckets.split(",") if b.strip())
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    from agents.torch import compile_events

    h = instrument(service=args.service, endpoint=args.endpoint, instance_id=args.instance_id, token=args.token)
    compiles_before = compile_events.watcher().emitted  # the watcher is process-wide
    t_start = time.time()
    with h.stage("model_load") as load:
        model = TinyLM().eval()
        forward = torch.compile(model, backend=args.backend, dynamic=False)
    h.replica_ready(load_seconds=(load.end_ns - load.start_ns) / 1e9)

    kv = KVPool(args.kv_blocks)
    finished: dict[str, object] = {}  # span id -> request span, to name eviction victims
    waiting = []
    for i in range(args.requests):
        length = rng.randint(4, args.max_len)
        req = h.start_request(model="tiny", input_tokens=length, session_id=f"s{i % 17}",
                              request_id=f"req-{i}", priority="interactive")
        queue = h.start_stage("queue", parent=req)
        waiting.append((req, queue, length))

    stats = {"requests": 0, "batches": 0, "evictions": 0}
    batch_no = 0
    while waiting:
        members, waiting = waiting[: args.batch_size], waiting[args.batch_size:]
        lengths = [m[2] for m in members]
        padded = pad_to(max(lengths), buckets)
        for _req, queue, _len in members:
            queue.end()
        reqs = [m[0] for m in members]
        batch = h.start_batch(f"b-{batch_no}", members=reqs, max_len=max(lengths), min_len=min(lengths),
                              real_tokens=sum(lengths), padded_tokens=padded * len(members))
        batch_no += 1
        tokens = torch.randint(0, VOCAB, (len(members), padded))
        with h.active(batch):  # a compile here becomes a child of this batch span
            prefills = [h.start_stage("prefill", parent=r) for r in reqs]
            with torch.no_grad():
                logits = forward(tokens)
            for p in prefills:
                p.end()
            decodes = [h.start_stage("decode", parent=r) for r in reqs]
            with torch.no_grad():
                for _ in range(args.decode_steps):
                    nxt = logits[:, -1:, :].argmax(-1)
                    tokens = torch.cat([tokens[:, 1:], nxt], dim=1)  # same length: no new shape
                    logits = forward(tokens)
            for d in decodes:
                d.end()
        batch.end()
        for req, _queue, length in members:
            for victim_id, blocks in kv.admit(req.span_id, length + args.decode_steps):
                h.kv_eviction(blocks=blocks, reason="capacity", victim=finished.pop(victim_id, None),
                              usage=kv.usage())
                stats["evictions"] += 1
            finished[req.span_id] = req
            h.set_kv_usage(kv.usage())
            req.set(output_tokens=args.decode_steps, shape_len=padded)
            req.end()
            stats["requests"] += 1
        stats["batches"] += 1

    stats["compile_spans"] = compile_events.watcher().emitted - compiles_before
    stats["distinct_padded_lengths"] = len({pad_to(n, buckets) for n in range(4, args.max_len + 1)}) if buckets else None
    stats["seconds"] = round(time.time() - t_start, 2)
    stats["flushed"] = h.flush(30)
    h.shutdown()
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
