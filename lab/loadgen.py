"""Load generators: Poisson and diurnal arrivals, and replays of public traces.

The public traces (Azure LLM inference 2023, Mooncake FAST'25) are read from
the shared data folder at run time, never copied. Lengths are scaled to the
lab's tiny model (prompts /8, outputs /4, both clipped): the shapes of the
distributions are kept, the absolute sizes are not.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

PROMPT_DIV = 8
OUTPUT_DIV = 4
PROMPT_MAX = 480
OUTPUT_MAX = 96


def default_data_dir() -> Path:
    """``shared/data`` beside the repository (as tests/conftest.py finds it)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass(frozen=True)
class Shape:
    prompt: int
    output: int


def scale_lengths(context: int, generated: int) -> Shape:
    return Shape(
        prompt=max(8, min(PROMPT_MAX, math.ceil(context / PROMPT_DIV))),
        output=max(2, min(OUTPUT_MAX, math.ceil(generated / OUTPUT_DIV))),
    )


def poisson(rate_per_s: float, start: float, end: float, rng: random.Random) -> list[float]:
    """Homogeneous Poisson arrival times in [start, end)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate must be > 0, got {rate_per_s}")
    out, t = [], start
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            return out
        out.append(t)


def inhomogeneous(rate: Callable[[float], float], peak_rate: float, start: float, end: float, rng: random.Random) -> list[float]:
    """Non-homogeneous Poisson arrivals by thinning (``rate(t) <= peak_rate``)."""
    return [t for t in poisson(peak_rate, start, end, rng) if rng.random() * peak_rate <= rate(t)]


def diurnal(mean_rate: float, amplitude: float, period_s: float, start: float, end: float, rng: random.Random, phase_s: float = 0.0) -> list[float]:
    """Sinusoidal day-shaped arrivals: rate = mean x (1 + amplitude x sin)."""
    if not 0 <= amplitude < 1:
        raise ValueError(f"amplitude must be in [0, 1), got {amplitude}")
    peak = mean_rate * (1 + amplitude)
    return inhomogeneous(lambda t: mean_rate * (1 + amplitude * math.sin(2 * math.pi * (t - phase_s) / period_s)), peak, start, end, rng)


def azure_rows(data_dir: Path | None = None) -> list[tuple[float, int, int]]:
    """(seconds from the trace start, context tokens, generated tokens) of the Azure conv trace."""
    path = (data_dir or default_data_dir()) / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv.gz"
    return list(_azure_rows(path))


@functools.lru_cache(maxsize=4)
def _azure_rows(path: Path) -> tuple[tuple[float, int, int], ...]:
    if not path.is_file():
        raise FileNotFoundError(f"Azure LLM trace not found at {path} (expected shared/data beside the repo)")
    rows: list[tuple[float, int, int]] = []
    t0 = None
    with gzip.open(path, "rt", newline="") as fh:
        for rec in csv.DictReader(fh):
            stamp = rec["TIMESTAMP"].strip()
            # 7 fractional digits: Python parses at most 6.
            if "." in stamp:
                head, frac = stamp.split(".", 1)
                stamp = f"{head}.{frac[:6]}"
            t = datetime.fromisoformat(stamp).timestamp()
            t0 = t if t0 is None else t0
            rows.append((t - t0, int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    return tuple(rows)


def mooncake_rows(data_dir: Path | None = None) -> list[tuple[float, int, int, tuple[int, ...]]]:
    """(seconds, input length, output length, prefix-block hash ids) of the Mooncake synthetic trace."""
    path = (data_dir or default_data_dir()) / "mooncake" / "synthetic_trace.jsonl.gz"
    return list(_mooncake_rows(path))


@functools.lru_cache(maxsize=4)
def _mooncake_rows(path: Path) -> tuple[tuple[float, int, int, tuple[int, ...]], ...]:
    if not path.is_file():
        raise FileNotFoundError(f"Mooncake trace not found at {path} (expected shared/data beside the repo)")
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.strip():
                r = json.loads(line)
                rows.append((r["timestamp"] / 1000.0, int(r["input_length"]), int(r["output_length"]), tuple(int(h) for h in r["hash_ids"])))
    return tuple(rows)


class LengthSampler:
    """Draws (prompt, output) pairs from the Azure trace's empirical distribution."""

    def __init__(self, rows: list[tuple[float, int, int]]) -> None:
        if not rows:
            raise ValueError("no rows to sample lengths from")
        self.shapes = [scale_lengths(c, g) for _, c, g in rows]

    def draw(self, rng: random.Random) -> Shape:
        return self.shapes[rng.randrange(len(self.shapes))]


def azure_replay(rows: list[tuple[float, int, int]], start: float, duration: float, speed: float) -> Iterator[tuple[float, Shape]]:
    """Replay the trace's arrivals ``speed`` times faster from ``start`` for ``duration`` s."""
    for t, c, g in rows:
        at = start + t / speed
        if at >= start + duration:
            break
        yield at, scale_lengths(c, g)


# --- stand-ins when the public traces are not beside the repo ------------------
#
# A fresh install has no shared/data folder; the demo must still run. These
# draw from distributions fitted to the traces' published statistics (Azure
# conv: context p50 1,020 / p90 2,735, output p50 129 / p90 424; Mooncake:
# input p50 11,587, output p50 69, 64 % block reuse) and say so.


def synthetic_azure_rows(n: int = 20000, seed: int = 0) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    rows = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(5.5)
        ctx = int(min(14050, max(8, rng.lognormvariate(math.log(1020), 0.77))))
        gen = int(min(1000, max(1, rng.lognormvariate(math.log(129), 0.93))))
        rows.append((t, ctx, gen))
    return rows


def synthetic_mooncake_rows(n: int = 4000, seed: int = 0, span_s: float = 1022.0) -> list[tuple[float, int, int, tuple[int, ...]]]:
    """Requests sharing document prefixes (Zipf-like popularity), 512-token blocks."""
    rng = random.Random(seed)
    docs = [(d, int(min(60000, max(1024, rng.lognormvariate(math.log(5000), 0.9))))) for d in range(300)]
    weights = [1.0 / (k + 1) ** 0.9 for k in range(len(docs))]
    rows = []
    next_id = 10_000_000
    for k in range(n):
        t = span_s * k / n + rng.uniform(0, span_s / n)
        doc, doc_len = rng.choices(docs, weights)[0]
        suffix = int(max(64, rng.lognormvariate(math.log(1000), 1.0)))
        inp = doc_len + suffix
        nblocks = -(-inp // 512)
        shared = doc_len // 512
        hashes = tuple(doc * 1000 + i for i in range(shared)) + tuple(range(next_id, next_id + nblocks - shared))
        next_id += nblocks - shared
        out = int(min(893, max(1, rng.lognormvariate(math.log(69), 1.0))))
        rows.append((t, inp, out, hashes))
    return rows


def azure_or_synthetic(data_dir: Path | None = None) -> tuple[list[tuple[float, int, int]], str]:
    try:
        return azure_rows(data_dir), "azure-llm-2023 conv trace"
    except FileNotFoundError:
        return synthetic_azure_rows(), "synthetic stand-in for the azure-llm-2023 trace (shared/data not found)"


def mooncake_or_synthetic(data_dir: Path | None = None) -> tuple[list[tuple[float, int, int, tuple[int, ...]]], str]:
    try:
        return mooncake_rows(data_dir), "mooncake synthetic_trace"
    except FileNotFoundError:
        return synthetic_mooncake_rows(), "synthetic stand-in for the mooncake trace (shared/data not found)"
