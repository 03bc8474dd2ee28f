"""Run scenarios: serve them for real, label them, send their telemetry.

One :class:`Lab` per process: it builds the model from a fixed seed and
measures this machine's forward costs once. ``run(scenario, endpoint, ...)``
serves every replica with the real compiled executor (virtual clock), computes
the counterfactual labels, sends the telemetry to the server at ``endpoint``
and writes the ground truth next to the run as ``<out_dir>/<name>.truth.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

from lab import truth
from lab.burner import Burner
from lab.emit import emit_chat, emit_gateway
from lab.model import Executor, build_model, calibrate, compile_limit, restore_compile_limit
from lab.scenarios import Scenario
from lab.sim import ReplicaRun, simulate

Progress = Callable[[str], None]


# CostModel.reference_work() in the sitting of 2026-12-06 15:11 (decode step at batch 1 0.435 ms; the
# work measured 20.7x the decode step in four calibrations a minute later), where every scenario injected
# its designed effect (the surge saturated both replicas: p50 6.2 s; control p50 0.49 s). Sittings that
# day ranged over about 0.5x-1.5x of it (control p50 0.23-0.74 s).
REFERENCE_WORK_MS = 9.0


@dataclass
class LabConfig:
    """Knobs of a lab run (not server settings: the lab is a client)."""

    scale: float = 10.0  # virtual seconds per CPU second of the reference machine (the lab's "model size")
    # The calibration workload's CPU time (CostModel.reference_work) on the machine state the scenarios
    # were designed on. Measured costs are scaled by reference / measured, so a scenario injects the same
    # effect whatever this shared machine's speed at the moment (a fast sitting's replicas would otherwise
    # have the capacity to absorb the ×5 surge). None: this machine's own speed, as measured.
    reference_work_ms: float | None = REFERENCE_WORK_MS
    backend: str = "eager"  # torch.compile backend; eager recompiles in tenths of a second, inductor in seconds
    recompile_limit: int = 64
    seed: int = 0
    execute_all: bool = False  # run the forward for every batch, not only for shapes new to the replica


@dataclass
class ScenarioResult:
    name: str
    service: str
    start: float  # epoch seconds
    end: float
    injections: list[dict[str, Any]]
    requests: int
    labelled_slow: int
    spans: int
    events: int
    metric_points: int
    compiles: int
    wall_s: float
    truth_path: str
    stats: dict[str, Any] = field(default_factory=dict)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def plan_epochs(scenarios: list[Scenario], now: float | None = None) -> list[float]:
    """Give each scenario its own past day (the newest ends before yesterday's end).

    Scenario k starts at its ``start_local`` hour on day (today - N + k - 1) in
    its own time zone, so scenarios never overlap and the provider scenario's
    hours are the provider's local hours.
    """
    now = time.time() if now is None else now
    today = datetime.fromtimestamp(now, tz=timezone.utc).date()
    out = []
    n = len(scenarios)
    for k, s in enumerate(scenarios):
        tz, hour = s.start_local
        day = today - timedelta(days=n - k + 1)
        local = datetime(day.year, day.month, day.day, hour, tzinfo=ZoneInfo(tz))
        out.append(local.timestamp())
    return out


class Lab:
    def __init__(self, config: LabConfig | None = None, progress: Progress | None = None) -> None:
        import torch

        self.config = config or LabConfig()
        self.progress = progress or (lambda msg: None)
        self._saved = (torch.get_num_threads(), compile_limit(self.config.recompile_limit))
        torch.set_num_threads(1)  # one intra-op thread: CPU-time measurements stay per thread
        self.model = build_model(self.config.seed)
        self.cost = calibrate(self.model)
        self.measured_work_ms = self.cost.reference_work() * 1000
        ref = self.config.reference_work_ms
        # virtual seconds per measured CPU second in this run
        self.scale = self.config.scale * (ref / self.measured_work_ms if ref else 1.0)
        self._runs = 0

    def close(self) -> None:
        """Give torch back its thread count and dynamo its limits."""
        import torch
        import torch._dynamo

        threads, limits = self._saved
        torch.set_num_threads(threads)
        restore_compile_limit(limits)
        torch._dynamo.reset()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self, scn: Scenario, burner: Burner | None = None) -> dict[int, ReplicaRun]:
        """The actual run: every replica served with the real compiled forward."""
        import torch._dynamo

        torch._dynamo.reset()
        runs: dict[int, ReplicaRun] = {}
        for r, spec in enumerate(scn.specs):
            mine = [q for q in scn.requests if q.replica == r]
            # a neutral tag: nothing the server receives may name the scenario (the analyzer must not see labels)
            self._runs += 1
            ex = Executor(self.model, f"lab-run{self._runs}-replica-{r}", backend=self.config.backend)
            total = len(mine)
            last = [0.0]

            def tick(done: int, r: int = r, total: int = total) -> None:
                now = time.monotonic()
                if now - last[0] > 1.0 or done == total:
                    last[0] = now
                    self.progress(f"replica-{r}: {done}/{total} requests served")

            runs[r] = simulate(r, mine, spec, self.cost, self.scale, executor=ex,
                               on_window=burner.toggle if burner else None, progress=tick,
                               execute_all=self.config.execute_all)
        return runs

    def run(self, scn: Scenario, endpoint: str, base_epoch: float, out_dir: Path, token: str | None = None) -> ScenarioResult:
        t0 = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        runs: dict[int, ReplicaRun] = {}
        if scn.provider is None:
            with Burner() as burner:
                runs = self.serve(scn, burner)
            actual = {rid: o.latency for run in runs.values() for rid, o in run.outcomes.items()}
        else:
            actual = truth.provider_latencies(scn, base_epoch, loaded=True)
        compile_costs = {r: run.compile_costs for r, run in runs.items()}
        load_real = {r: run.loads[0].real_seconds for r, run in runs.items() if run.loads}
        self.progress("labelling: counterfactual reruns")
        labels = truth.label(scn, actual, self.cost, self.scale, compile_costs, load_real, base_epoch, self.progress)
        self.progress("sending telemetry")
        if scn.provider is None:
            emitted = emit_chat(scn, runs, base_epoch, endpoint, self.scale, token, self.progress)
        else:
            emitted = emit_gateway(scn, actual, base_epoch, endpoint, token)
        injections = self._windows(scn, base_epoch, labels, runs)
        doc = {
            "scenario": scn.name,
            "description": scn.description,
            "sources": scn.sources,
            "service": scn.service,
            "start": iso(base_epoch),
            "end": iso(base_epoch + scn.duration),
            "base_epoch": base_epoch,
            "scale": self.scale,
            "backend": self.config.backend,
            "thresholds": {"slow_abs_s": truth.SLOW_ABS_S, "slow_rel": truth.SLOW_REL},
            "injections": injections,
            "requests": [
                {
                    "trace_id": emitted.trace_ids[lab.rid],
                    "span_id": emitted.span_ids[lab.rid],
                    "instance": emitted.instance[lab.rid],
                    "start": iso(base_epoch + lab.arrival),
                    "latency_ms": round(lab.latency * 1000, 3),
                    "baseline_ms": round(lab.baseline * 1000, 3),
                    "total_excess_ms": round(lab.total_excess * 1000, 3),
                    "excess_ms": {m: round(e * 1000, 3) for m, e in lab.excess.items()},
                    "slow": lab.slow,
                    "cause": lab.cause,
                }
                for lab in sorted(labels.values(), key=lambda x: x.arrival)
            ],
        }
        path = out_dir / f"{scn.name}.truth.json"
        path.write_text(json.dumps(doc))
        compiles = sum(1 for run in runs.values() for b in run.batches if b.compile is not None)
        compiles += sum(len(l.warmup) for run in runs.values() for l in run.loads)
        lat = sorted(labels[r].latency for r in labels)
        stats = {
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
            "kv_evictions": sum(1 for run in runs.values() for e in run.kv_log if e.reason != "preemption"),
            "preemptions": sum(1 for run in runs.values() for e in run.kv_log if e.reason == "preemption"),
            # How fast this sitting's machine was, and the time scale that made up for it.
            "decode_step_ms": round(self.cost.decode_step(1) * 1000, 4),
            "measured_work_ms": round(self.measured_work_ms, 3), "scale": round(self.scale, 3),
        }
        return ScenarioResult(
            name=scn.name, service=scn.service, start=base_epoch, end=base_epoch + scn.duration, injections=injections,
            requests=len(labels), labelled_slow=sum(1 for x in labels.values() if x.slow), spans=emitted.spans,
            events=emitted.events, metric_points=emitted.metric_points, compiles=compiles,
            wall_s=round(time.monotonic() - t0, 2), truth_path=str(path), stats=stats,
        )

    @staticmethod
    def _windows(scn: Scenario, base_epoch: float, labels: dict[int, truth.Label], runs: dict[int, ReplicaRun]) -> list[dict[str, Any]]:
        out = []
        for inj in scn.injections:
            start, end = inj.start, inj.end
            if inj.cause == "cold_start" and inj.replica in runs:
                # the replica is down for the weight load plus its real warm-up compiles
                end = max([end] + [l.end for l in runs[inj.replica].loads if l.start >= inj.start])
            if inj.cause == "provider_load" and scn.provider is not None:
                a, b = scn.provider.busy_hours_utc(base_epoch + scn.duration / 2)
                start, end = a - base_epoch, b - base_epoch
            affected = [x for x in labels.values() if x.slow and x.cause == inj.cause and (inj.replica is None or x.replica == inj.replica)]
            effect_end = max((x.arrival + x.latency for x in affected), default=end)
            out.append({
                "cause": inj.cause,
                "instance": None if inj.replica is None else (f"gateway-{inj.replica}" if scn.provider else f"replica-{inj.replica}"),
                "start": iso(base_epoch + start),
                "end": iso(base_epoch + end),
                "effect_end": iso(base_epoch + max(end, effect_end)),
                "labelled_slow": len(affected),
                "detail": inj.detail,
            })
        return out


def result_dict(r: ScenarioResult) -> dict[str, Any]:
    d = asdict(r)
    d["start"] = iso(r.start)
    d["end"] = iso(r.end)
    return d


def run_scenarios(
    names: list[str],
    endpoint: str,
    out_dir: Path,
    config: LabConfig | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    budget_s: float | None = None,
    data_dir: Path | None = None,
) -> list[ScenarioResult]:
    """Build, serve, label and send each named scenario in turn.

    ``budget_s`` bounds the wall time: scenarios not started when it is spent
    are skipped (reported through ``progress``).
    """
    from lab.scenarios import build

    say = progress or (lambda msg: None)
    scns = [build(n, data_dir=data_dir) for n in names]
    epochs = plan_epochs(scns)
    t0 = time.monotonic()
    current = [""]
    results = []
    with Lab(config, progress=lambda msg: say(f"{current[0]}: {msg}")) as lab:
        for k, (scn, epoch) in enumerate(zip(scns, epochs), start=1):
            if budget_s is not None and results and time.monotonic() - t0 > budget_s:
                say(f"time budget spent: skipping {', '.join(s.name for s in scns[k - 1:])}")
                break
            current[0] = f"[{k}/{len(scns)}] {scn.name}"
            say(f"{current[0]}: {len(scn.requests)} requests, {scn.description} (driven by {'; '.join(scn.sources)})")
            results.append(lab.run(scn, endpoint, epoch, out_dir, token))
            r = results[-1]
            say(f"{current[0]}: done in {r.wall_s:.1f} s: {r.requests} requests sent, {r.labelled_slow} labelled slow, {r.compiles} compiles")
    return results
