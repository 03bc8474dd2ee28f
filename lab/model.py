"""A tiny decoder-only transformer and its compiled executor.

Why a real model: the lab must produce compile stalls and batch costs from
real execution, not from a formula. The weights come from a fixed seed at
start (no downloads); the model is small enough that a forward on two shared
CPU cores takes milliseconds.

Each replica compiles its own copy of the forward function (a distinct code
object, ``<replica-N>``): torch.compile caches per code object, so replicas in
one process recompile independently, as separate serving processes would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 512


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Embedding, ``layers`` pre-norm blocks, tied LM head."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, max_len: int = 2048) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)[:, -1] @ self.tok.weight.T


def build_model(seed: int = 0, **kw: Any) -> TinyLM:
    """Weights from a fixed seed: every run of the lab serves the same model."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = TinyLM(**kw).eval()
    finally:
        torch.random.set_rng_state(gen_state)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_FORWARD_SRC = """
def forward(model, ids):
    return model(ids)
"""


def _fresh_forward(tag: str) -> Any:
    """A new code object per replica: its own torch.compile cache."""
    ns: dict[str, Any] = {}
    exec(compile(_FORWARD_SRC, f"<{tag}>", "exec"), ns)  # noqa: S102 - fixed source, see module docstring
    return ns["forward"]


@dataclass
class CompileEvent:
    """One real compile measured on this machine."""

    shape: tuple[int, int]
    seconds: float
    kind: str  # first | recompile
    reason: str
    frame: str
    backend: str
    wall_start: float
    wall_end: float
    raw: Any = None  # dynamo's CompilationMetrics record


@dataclass
class RunResult:
    seconds: float
    compile: CompileEvent | None


_LIMIT_KEYS = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit")


def compile_limit(limit: int) -> dict[str, int]:
    """Raise dynamo's recompile limit (default 8) so a run without bucketing
    keeps recompiling instead of silently falling back to eager after 8 shapes.
    Returns the previous values (for :func:`restore_compile_limit`)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    prev = {k: getattr(cfg, k) for k in _LIMIT_KEYS if hasattr(cfg, k)}
    if "recompile_limit" in prev:
        cfg.recompile_limit = limit
    if "cache_size_limit" in prev:
        cfg.cache_size_limit = limit
    if "accumulated_recompile_limit" in prev:
        cfg.accumulated_recompile_limit = max(prev["accumulated_recompile_limit"], limit * 8)
    return prev


def restore_compile_limit(prev: dict[str, int]) -> None:
    import torch._dynamo

    for k, v in prev.items():
        setattr(torch._dynamo.config, k, v)


@dataclass
class Executor:
    """Runs the real compiled forward for one replica ("process").

    ``run(batch, length)`` executes the forward on a ``(batch, length)`` input
    and reports whether torch.compile compiled for it (from dynamo's own
    ``CompilationMetrics``), with the real measured compile time and the
    guard-failure text.
    """

    model: TinyLM
    tag: str
    backend: str = "eager"
    compiled: bool = True
    _fn: Any = None
    _shapes: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """A new process: a fresh code object, so every shape compiles again."""
        fn = _fresh_forward(self.tag)
        self._fn = torch.compile(fn, backend=self.backend, dynamic=False) if self.compiled else fn
        self._shapes = set()

    @property
    def has_run(self) -> bool:
        return bool(self._shapes)

    def run(self, batch: int, length: int) -> RunResult:
        from torch._dynamo.utils import get_compilation_metrics

        ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 7919 + length))
        before = len(get_compilation_metrics())
        w0 = time.time()
        t0 = time.thread_time()
        with torch.no_grad():
            self._fn(self.model, ids)
        dt = time.thread_time() - t0
        w1 = time.time()
        event = None
        new = [m for m in get_compilation_metrics()[before:] if getattr(m, "co_name", "") == "forward"]
        if new:
            m = new[-1]
            # CPU time of the compiling thread, not dynamo's wall-clock duration:
            # other work on a shared machine must not leak into the lab's timeline.
            secs = dt
            reason = getattr(m, "recompile_reason", None) or ""
            if ": " in reason and reason.split(": ", 1)[0].count("/") == 1:
                reason = reason.split(": ", 1)[1]  # drop dynamo's "0/3: " compile-id prefix
            event = CompileEvent(
                shape=(batch, length),
                seconds=secs,
                kind="recompile" if self._shapes else "first",
                reason=reason,
                frame="forward",
                backend=self.backend,
                wall_start=w0,
                wall_end=w1,
                raw=m,
            )
        self._shapes.add((batch, length))
        return RunResult(seconds=dt, compile=event)


@dataclass
class CostModel:
    """Steady-state forward cost on this machine, measured at start.

    Why a fitted model rather than each call's own timing: the lab's
    counterfactual reruns must charge the same work the same time, and two
    shared cores give noisy single timings. The fit (least squares on
    ``a + b*B*L + c*B*L^2``) is made from medians of real timed forwards.
    """

    a: float
    b: float
    c: float
    step: dict[int, float]

    def prefill(self, batch: int, length: int) -> float:
        n = batch * length
        return max(self.a + self.b * n + self.c * n * length, 1e-5)

    def reference_work(self) -> float:
        """The CPU seconds of a fixed piece of work (a 4 x 64 prefill and 16 decode steps at batch 4):
        how fast this machine is at the moment, for :class:`lab.runner.Lab`'s time scale."""
        return self.prefill(4, 64) + 16 * self.decode_step(4)

    def decode_step(self, batch: int) -> float:
        keys = sorted(self.step)
        for k in keys:
            if k >= batch:
                return self.step[k]
        return self.step[keys[-1]] * batch / keys[-1]


def calibrate(model: TinyLM, batches: tuple[int, ...] = (1, 2, 4, 8), lengths: tuple[int, ...] = (16, 64, 256), reps: int = 5) -> CostModel:
    """Time real eager forwards (the same ops the eager backend runs).

    CPU time of this thread (torch runs one intra-op thread in the lab), the
    least of ``reps`` runs: robust to the other processes of a shared machine.
    """
    rows: list[tuple[int, int, float]] = []
    with torch.no_grad():
        for b in batches:
            for n in lengths + (1,):
                ids = torch.randint(0, VOCAB, (b, n))
                model(ids)  # warm
                ts = []
                for _ in range(reps):
                    t0 = time.thread_time()
                    model(ids)
                    ts.append(time.thread_time() - t0)
                rows.append((b, n, min(ts)))
    step: dict[int, float] = {}
    for b, n, t in sorted(rows):
        if n == 1:
            step[b] = max(t, max(step.values(), default=0.0))  # a bigger batch never steps faster
    fit = [(b, n, t) for b, n, t in rows if n > 1]
    X = torch.tensor([[1.0, b * n, b * n * n] for b, n, _ in fit], dtype=torch.float64)
    y = torch.tensor([t for _, _, t in fit], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1).tolist()
    a, bcoef, c = coef
    # Costs must not fall with size: clamp negative terms from noisy fits.
    bcoef = max(bcoef, 0.0)
    c = max(c, 0.0)
    a = max(a, min(t for _, _, t in fit) * 0.5)
    return CostModel(a=a, b=bcoef, c=c, step=step)


def padded_len(length: int, buckets: tuple[int, ...] | None, multiple: int = 1) -> int:
    """The sequence length kernels run with: the smallest bucket that fits, or
    the exact length rounded up to ``multiple`` when bucketing is off."""
    if buckets:
        for b in buckets:
            if b >= length:
                return b
        return int(math.ceil(length / buckets[-1]) * buckets[-1])
    return int(math.ceil(length / multiple) * multiple)


def batch_bucket(n: int, max_batch: int) -> int:
    """Batch dimension padded to a power of two (bounded by ``max_batch``)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(max_batch, n))
