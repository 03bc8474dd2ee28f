"""The cause vocabulary (TELEMETRY.md section 9): the ids every slow request and incident is explained with.

One definition for the analyzer, the alert rules that filter on causes, and the
lab that injects them; outside clients key on these strings, so they never change.
"""

from __future__ import annotations

INJECTABLE_CAUSES: tuple[str, ...] = (
    "compile_miss",
    "kv_eviction",
    "batch_contention",
    "queue_saturation",
    "provider_load",
    "gpu_throttle",
    "gpu_contention",
    "cold_start",
)
"""Causes with a mechanism (the lab can inject each one)."""

CAUSES: tuple[str, ...] = INJECTABLE_CAUSES + ("unknown",)
"""Every cause id, ``unknown`` last: the excess no evidence explains."""
