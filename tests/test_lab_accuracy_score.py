"""The accuracy benchmark's scoring rules, on hand-made answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("accuracy", Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(accuracy)  # type: ignore[union-attr]

TRUTH = {
    "start": "2026-01-01T10:00:00Z",
    "end": "2026-01-01T11:00:00Z",
    "injections": [
        {"cause": "compile_miss", "instance": "replica-0", "start": "2026-01-01T10:10:00Z", "end": "2026-01-01T10:20:00Z", "effect_end": "2026-01-01T10:22:00Z"},
        {"cause": "gpu_throttle", "instance": "replica-1", "start": "2026-01-01T10:15:00Z", "end": "2026-01-01T10:25:00Z", "effect_end": "2026-01-01T10:25:00Z"},
    ],
    "requests": [
        {"trace_id": "a", "slow": True, "cause": "compile_miss"},
        {"trace_id": "b", "slow": True, "cause": "compile_miss"},
        {"trace_id": "c", "slow": True, "cause": "gpu_throttle"},
        {"trace_id": "d", "slow": True, "cause": "gpu_throttle"},
        {"trace_id": "e", "slow": False, "cause": None},
    ],
}


def inc(start: str, end: str, *causes: tuple[str, float]) -> dict:
    return {"start": start, "end": end, "causes": [{"cause": c, "share": s} for c, s in causes]}


def test_scoring_counts_recall_false_incidents_and_request_accuracy() -> None:
    incidents = [
        inc("2026-01-01T10:12:00Z", "2026-01-01T10:18:00Z", ("compile_miss", 0.7), ("gpu_throttle", 0.2)),
        inc("2026-01-01T10:40:00Z", "2026-01-01T10:45:00Z", ("unknown", 1.0)),
    ]
    slow = [
        {"trace_id": "a", "causes": [{"cause": "compile_miss"}]},
        {"trace_id": "c", "causes": [{"cause": "unknown"}]},
        {"trace_id": "d", "causes": [{"cause": "compile_miss"}]},
        {"trace_id": "e", "causes": [{"cause": "gpu_throttle"}]},
    ]
    s = accuracy.score(TRUTH, incidents, slow, truncated=False)
    assert s["incident_recall"] == 0.5  # compile_miss on top; throttle overlapped but not on top
    assert s["incident_recall_any_cause"] == 1.0
    assert s["incident_recall_listed"] == 1.0  # throttle listed with 20 %
    assert s["false_incidents"] == 1
    # clean time: 60 min less the union of [10:10, 10:22] and [10:15, 10:25] (15 min)
    assert s["false_incidents_per_hour"] == pytest.approx(1 / (45 / 60))
    assert s["coverage"] == 0.75  # a, c, d of a, b, c, d
    assert s["top1_accuracy"] == pytest.approx(1 / 3)
    assert s["top1_accuracy_all"] == 0.25
    assert s["unknown_share"] == pytest.approx(1 / 3)
    assert s["precision"] == 0.75
    o = accuracy.overall({"x": s})
    assert o["incident_recall"] == 0.5 and o["coverage"] == 0.75
