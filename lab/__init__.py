"""The lab: a small real serving stack that reproduces every tail-latency cause,
with ground truth kept outside the telemetry store (see docs/lab.md)."""
