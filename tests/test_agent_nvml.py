"""The agent's NVML layer against a fake NVML library (no GPU here)."""

from __future__ import annotations

import time

import pytest

from agents.gpu_sampler import GpuSampler
from agents.nvml import NA, NVML
from agents.otlp_encode import LogEvent, encode_logs, encode_metrics
from agents.xid_watch import XID_EVENT, XidWatcher

try:  # tests/ is a plain directory; pytest puts it (or the repo root) on sys.path
    from tests import fake_nvml
except ImportError:  # pragma: no cover - depends on how pytest was started
    import fake_nvml  # type: ignore[no-redef]
FakeNvml = fake_nvml.FakeNvml

RES = {"host.name": "node-7", "service.name": "tailscope-agent", "service.instance.id": "node-7"}

SPEC_METRICS = {
    "tailscope.gpu.utilization", "tailscope.gpu.memory.used", "tailscope.gpu.memory.total",
    "tailscope.gpu.sm_clock", "tailscope.gpu.sm_clock.max", "tailscope.gpu.power", "tailscope.gpu.power.limit",
    "tailscope.gpu.temperature", "tailscope.gpu.clock_event_reasons", "tailscope.gpu.process.memory.used",
}


def by_name(points, gpu=None):
    out = {}
    for p in points:
        attrs = dict(p.attributes)
        if gpu is not None and attrs.get("gpu.index") != gpu:
            continue
        out.setdefault(p.name, []).append((p.value, attrs))
    return out


def test_na_is_a_falsy_singleton():
    assert not NA
    assert repr(NA) == "N/A"
    assert type(NA)() is NA


def test_sampler_emits_every_spec_metric_with_units_converted():
    fake = FakeNvml(gpus=2)
    fake.gpus[1].util_gpu = 88
    fake.gpus[1].power_mw = 697_000
    fake.gpus[1].power_limit_mw = 700_000
    fake.gpus[1].sm_clock = 1410
    fake.gpus[1].clocks_event_reasons = 0x4  # SwPowerCap
    sampler = GpuSampler(NVML(fake), RES, interval=1.0)
    points = sampler.sample()
    assert {p.name for p in points} == SPEC_METRICS
    for p in points:
        attrs = dict(p.attributes)
        assert {"gpu.index", "gpu.uuid", "gpu.name"} <= attrs.keys()
        assert dict(p.resource) == RES
        assert p.kind == "gauge"
    g1 = by_name(points, gpu=1)
    assert g1["tailscope.gpu.utilization"][0][0] == pytest.approx(0.88)
    assert g1["tailscope.gpu.power"][0][0] == pytest.approx(697.0)
    assert g1["tailscope.gpu.power.limit"][0][0] == pytest.approx(700.0)
    assert g1["tailscope.gpu.sm_clock"][0][0] == 1410
    assert g1["tailscope.gpu.sm_clock.max"][0][0] == 1980
    assert g1["tailscope.gpu.clock_event_reasons"][0][0] == 0x4
    assert g1["tailscope.gpu.memory.total"][0][0] == 80 * 1024**3
    assert g1["tailscope.gpu.utilization"][0][1]["gpu.uuid"] == fake.gpus[1].uuid
    assert g1["tailscope.gpu.utilization"][0][1]["gpu.name"] == "NVIDIA H100 80GB HBM3"
    # per-process memory: the process with usedGpuMemory=None (no permission) is left out
    procs = by_name(points, gpu=0)["tailscope.gpu.process.memory.used"]
    assert [(v, a["process.pid"]) for v, a in procs] == [(6 * 1024**3, 4242)]
    assert "tailscope.gpu.process.memory.used" not in by_name(points, gpu=1)


def test_readings_follow_the_device_between_samples():
    fake = FakeNvml(gpus=1)
    sampler = GpuSampler(NVML(fake), RES)
    first = by_name(sampler.sample())
    fake.gpus[0].sm_clock = 1005
    fake.gpus[0].clocks_event_reasons = 0x40 | 0x8  # HW thermal + HW slowdown
    second = by_name(sampler.sample())
    assert first["tailscope.gpu.sm_clock"][0][0] == 1980
    assert second["tailscope.gpu.sm_clock"][0][0] == 1005
    assert second["tailscope.gpu.clock_event_reasons"][0][0] == 0x48
    # static device info is read once, readings every time
    assert fake.calls["nvmlDeviceGetUUID"] == 1
    assert fake.calls["nvmlDeviceGetClockInfo"] == 2


def test_unsupported_queries_are_left_out_not_zero():
    fake = FakeNvml(gpus=1)
    fake.unsupported |= {"nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetComputeRunningProcesses"}
    nvml = NVML(fake)
    assert nvml.query("nvmlDeviceGetPowerUsage", nvml.handle(0)) is NA
    assert nvml.query("nvmlDeviceGetPowerUsage", nvml.handle(0), default=-1) == -1
    names = {p.name for p in GpuSampler(nvml, RES).sample()}
    assert "tailscope.gpu.power" not in names and "tailscope.gpu.power.limit" not in names
    assert "tailscope.gpu.process.memory.used" not in names
    assert "tailscope.gpu.utilization" in names


def test_clock_event_reasons_fall_back_to_the_throttle_reasons_call():
    fake = FakeNvml(gpus=1)
    fake.no_clocks_event_api = True  # an old nvidia-ml-py without nvmlDeviceGetCurrentClocksEventReasons
    fake.gpus[0].clocks_event_reasons = 0x20
    pts = by_name(GpuSampler(NVML(fake), RES).sample())
    assert pts["tailscope.gpu.clock_event_reasons"][0][0] == 0x20
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


def test_a_missing_function_in_the_binding_gives_na():
    fake = FakeNvml(gpus=1)
    nvml = NVML(fake)
    assert nvml.query("nvmlDeviceGetSomethingFromTheFuture", 0) is NA


@pytest.mark.parametrize("error, needle", [
    (fake_nvml.NVMLError_LibraryNotFound, "libnvidia-ml.so.1 was not found"),
    (fake_nvml.NVMLError_DriverNotLoaded, "driver is not loaded"),
])
def test_missing_library_is_reported_once_with_a_hint(error, needle):
    fake = FakeNvml(gpus=2, init_error=error)
    messages: list[str] = []
    nvml = NVML(fake, report=messages.append)
    sampler = GpuSampler(nvml, RES)
    for _ in range(3):
        assert sampler.sample() == []
    assert nvml.query("nvmlDeviceGetCount") is NA
    assert len(messages) == 1, messages
    assert needle in messages[0] and "HINT" in messages[0]
    assert fake.init_calls == 1  # not retried on every sample


def test_missing_library_agent_keeps_other_sources(tmp_path, capsys):
    from agents.daemon import Agent, AgentOptions

    fake = FakeNvml(gpus=2, init_error=fake_nvml.NVMLError_LibraryNotFound)
    opts = AgentOptions(server="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool"),
                        profiler_dirs=[str(tmp_path / "traces")], shutdown_timeout=0.1)
    agent = Agent(opts, nvml=NVML(fake, report=None))
    agent._build_sources()
    assert "profiler" in agent.active
    assert "gpu" in agent.off and "libnvidia-ml.so.1" in agent.off["gpu"]
    assert "xid" in agent.off


def test_missing_pynvml_binding_is_reported(monkeypatch):
    import agents.nvml as mod

    monkeypatch.setattr(mod, "load_module", lambda name="pynvml": None)
    messages: list[str] = []
    nvml = NVML(None, report=messages.append)
    assert not nvml.available()
    assert len(messages) == 1 and "pip install nvidia-ml-py" in messages[0]


def test_xid_event_becomes_a_log_record():
    fake = FakeNvml(gpus=2)
    nvml = NVML(fake)
    sampler = GpuSampler(nvml, RES)
    got: list[LogEvent] = []
    watcher = XidWatcher(nvml, sampler.devices(), RES, got.append, wait_ms=50)
    assert watcher.setup()
    assert watcher.registered == [0, 1]
    assert watcher.poll_once() is None  # NVMLError_Timeout: nothing happened
    fake.inject_xid(1, 79)
    ev = watcher.poll_once()
    assert ev is not None
    assert ev.event_name == XID_EVENT == "tailscope.gpu.xid"
    attrs = dict(ev.attributes)
    assert attrs["gpu.index"] == 1 and attrs["tailscope.gpu.xid"] == 79
    assert attrs["gpu.uuid"] == fake.gpus[1].uuid
    assert dict(ev.resource)["host.name"] == "node-7"
    # and it encodes as an OTLP log record carrying the event name both ways
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    req = ExportLogsServiceRequest.FromString(encode_logs([ev]))
    rec = req.resource_logs[0].scope_logs[0].log_records[0]
    keys = {kv.key: kv.value for kv in rec.attributes}
    assert keys["event.name"].string_value == "tailscope.gpu.xid"
    assert keys["tailscope.gpu.xid"].int_value == 79
    assert keys["gpu.index"].int_value == 1
    if "event_name" in rec.DESCRIPTOR.fields_by_name:
        assert rec.event_name == "tailscope.gpu.xid"


def test_xid_watcher_thread_forwards_events():
    fake = FakeNvml(gpus=1)
    nvml = NVML(fake)
    got: list[LogEvent] = []
    watcher = XidWatcher(nvml, GpuSampler(nvml, RES).devices(), RES, lambda e: got.append(e) or True, wait_ms=20)
    assert watcher.setup()
    watcher.start()
    try:
        fake.inject_xid(0, 48)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert [dict(e.attributes)["tailscope.gpu.xid"] for e in got] == [48]


def test_xid_unsupported_reports_why():
    fake = FakeNvml(gpus=1)
    fake.unsupported.add("nvmlDeviceRegisterEvents")
    nvml = NVML(fake)
    watcher = XidWatcher(nvml, GpuSampler(nvml, RES).devices(), RES, lambda e: True)
    assert not watcher.setup()
    assert "XID" in (watcher.off_reason or "")


def test_metrics_encode_as_otlp_gauges():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    fake = FakeNvml(gpus=2)
    points = GpuSampler(NVML(fake), RES).sample()
    req = ExportMetricsServiceRequest.FromString(encode_metrics(points))
    assert len(req.resource_metrics) == 1
    res = {kv.key: kv.value.string_value for kv in req.resource_metrics[0].resource.attributes}
    assert res == RES
    metrics = {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}
    assert set(metrics) == SPEC_METRICS
    util = metrics["tailscope.gpu.utilization"]
    assert len(util.gauge.data_points) == 2
    assert util.gauge.data_points[0].as_double == pytest.approx(0.37)
    assert metrics["tailscope.gpu.memory.used"].gauge.data_points[0].as_int == 10 * 1024**3


def test_real_pynvml_without_a_driver_reports_once():
    """The real nvidia-ml-py binding on a machine without the driver (CI): one message with a hint."""
    pytest.importorskip("pynvml")
    messages: list[str] = []
    nvml = NVML(report=messages.append)
    if nvml.available():
        nvml.shutdown()
        pytest.skip("a real NVIDIA driver is present on this machine")
    assert not nvml.available()
    assert nvml.query("nvmlDeviceGetCount") is NA
    assert GpuSampler(nvml, RES).sample() == []
    assert len(messages) == 1 and "HINT" in messages[0]
