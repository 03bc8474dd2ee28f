"""Profiler traces: the summary (checked against HTA on real Kineto files) and the directory watcher."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from agents.profiler_summary import TraceError, load_trace, summarize, union_length
from agents.profiler_watch import ProfilerWatcher, is_trace_name

RES = {"host.name": "node-p", "service.name": "chat-api", "service.instance.id": "replica-1"}


def small_trace() -> dict:
    """Two streams on GPU 0 with overlap, one memcpy, launches matched by correlation, compile regions."""
    ev = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 10, "tid": 10, "ts": 0, "dur": 50},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 10, "tid": 10, "ts": 5, "dur": 5, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 10, "tid": 10, "ts": 12, "dur": 4, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "pid": 10, "tid": 10, "ts": 20, "dur": 2, "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": 20, "dur": 30, "args": {"correlation": 1, "stream": 7, "device": 0}},
        {"ph": "X", "cat": "kernel", "name": "relu", "pid": 0, "tid": 9, "ts": 40, "dur": 20.5, "args": {"correlation": 2, "stream": 9, "device": 0}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "pid": 0, "tid": 7, "ts": 100, "dur": 10, "args": {"correlation": 3, "stream": 7, "device": 0}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 1, "tid": 7, "ts": 30, "dur": 10, "args": {"stream": 7, "device": 1}},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "step", "pid": 0, "tid": 7, "ts": 0, "dur": 200},
        {"ph": "X", "cat": "user_annotation", "name": "Torch-Compiled Region: 0/1", "pid": 10, "tid": 10, "ts": 0, "dur": 40},
        {"ph": "X", "cat": "python_function", "name": "entire_frame_compile", "pid": 10, "tid": 10, "ts": 120, "dur": 30},
        {"ph": "X", "cat": "python_function", "name": "backend_compile", "pid": 10, "tid": 10, "ts": 125, "dur": 20},
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": 10, "tid": 10, "ts": 5},
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
    ]
    return {"schemaVersion": 1, "displayTimeUnit": "ns", "baseTimeNanoseconds": 1_700_000_000_000_000_000, "traceEvents": ev}


def test_summary_figures_on_a_known_trace():
    s = summarize(small_trace())
    d0 = next(d for d in s["devices"] if d["device"] == 0)
    # union of [20,50) [40,60.5) [100,110) = 40.5 + 10; span 20..110
    assert d0["busy_us"] == pytest.approx(50.5) and d0["span_us"] == pytest.approx(90)
    assert d0["idle_us"] == pytest.approx(39.5) and d0["busy_ratio"] == pytest.approx(50.5 / 90, rel=1e-5)
    assert d0["streams"] == [7, 9] and d0["memcpy_us"] == 10 and d0["kernel_us"] == pytest.approx(50.5)
    assert s["gpu"]["devices"] == 2 and s["gpu"]["busy_us"] == pytest.approx(60.5)
    assert s["top_kernels"][0] == {"name": "gemm", "count": 2, "total_us": 40.0, "mean_us": 20.0, "max_us": 30.0}
    assert s["kernel_count"] == 3
    launch = s["launch"]
    assert launch["launch_calls"] == 2 and launch["launch_us"] == 9 and launch["runtime_calls"] == 3
    # delays: kernel start - launch end: 20-10=10, 40-16=24
    assert launch["delay_us"]["count"] == 2 and launch["delay_us"]["mean"] == 17 and launch["delay_us"]["max"] == 24
    comp = s["compile"]
    assert comp["regions"]["Torch-Compiled Region"] == {"count": 1, "total_us": 40.0}
    assert comp["compiling_us"] == 30 and comp["region_us"] == 70
    assert s["trace_start_us"] == pytest.approx(1_700_000_000_000_000.0)  # baseTimeNanoseconds/1000 + ts
    assert s["trace_end_us"] == pytest.approx(1_700_000_000_000_000.0 + 200)
    assert s["categories"]["kernel"] == 3 and s["categories"]["ac2g"] == 1
    assert s["window"] == "whole_trace"


def test_union_length():
    assert union_length([]) == 0
    assert union_length([(0, 10), (5, 15), (20, 21)]) == 16
    assert union_length([(0, 10), (2, 3)]) == 10


def test_load_trace_rejects_incomplete_files(tmp_path):
    data = json.dumps(small_trace()).encode()
    (tmp_path / "half.json").write_bytes(data[: len(data) // 2])
    gz = gzip.compress(data)
    (tmp_path / "half.json.gz").write_bytes(gz[: len(gz) - 10])
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for name in ("half.json", "half.json.gz", "other.json"):
        with pytest.raises(TraceError):
            load_trace(tmp_path / name)
    (tmp_path / "arr.json").write_text(json.dumps(small_trace()["traceEvents"]))  # Chrome's array form
    assert summarize(tmp_path / "arr.json")["kernel_count"] == 3


def test_summary_of_every_shared_kineto_file(shared_data):
    for path in sorted((shared_data / "kineto").glob("*.json.gz")):
        s = summarize(path)
        assert s["gpu"]["devices"] >= 1, path.name
        assert 0 < s["gpu"]["busy_us"] <= s["gpu"]["span_us"], path.name
        assert s["top_kernels"] and s["kernel_count"] > 0
        assert s["trace_start_us"] > 1.6e15  # a 2023+ epoch in µs, not a relative offset
        json.dumps(s)  # serialisable for the upload


HTA_FILES = {
    # file: tolerance on busy time relative to HTA. HTA truncates fractional µs (the V100 file is
    # ns-resolution) and counts cuda_sync events on GPU streams (the A100 file); we do neither.
    "hta_resnet_ddp_v100_ns.json.gz": 0.02,
    "hta_alexnet_a100_cudasync.json.gz": 0.01,
    "hta_sampled_rank-0.json.gz": 0.001,
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", sorted(HTA_FILES))
def test_busy_time_agrees_with_holistic_trace_analysis(shared_data, name):
    pytest.importorskip("hta", reason="holistictraceanalysis is not installed")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from profiler_vs_hta import hta_figures
    finally:
        sys.path.pop(0)
    path = shared_data / "kineto" / name
    try:
        hta = hta_figures(path)
    except Exception as exc:  # noqa: BLE001 - HTA's own parsing limits are not our failure
        pytest.skip(f"HTA cannot read {name}: {type(exc).__name__}: {exc}")
    summary = summarize(path, exclude_last_step=True)
    ours = summary["gpu"]
    assert ours["busy_us"] == pytest.approx(hta["busy_us"], rel=HTA_FILES[name])
    assert ours["busy_ratio"] == pytest.approx(hta["busy_ratio"], abs=0.02)
    # the same top kernels, with the same total times (HTA truncates fractional µs per event)
    ours_top = {k["name"]: k["total_us"] for k in summary["top_kernels"]}
    for k in hta["top_kernels"]:
        assert ours_top.get(k["name"]) == pytest.approx(k["total_us"], rel=0.02), k["name"][:80]


def test_trace_names():
    assert is_trace_name("host_123.1700.pt.trace.json") and is_trace_name("x.pt.trace.json.gz")
    assert not is_trace_name("x.json.tmp") and not is_trace_name(".x.json") and not is_trace_name("x.txt")


def test_watcher_uploads_a_slowly_written_file_once(make_server, tmp_path):
    srv = make_server()
    traces = tmp_path / "traces"
    traces.mkdir()
    state = tmp_path / "state.json"
    w = ProfilerWatcher([traces], srv.url, None, RES, state, interval=0.1)
    data = json.dumps(small_trace()).encode()
    gz = gzip.compress(data)
    plain, zipped = traces / "node.1.pt.trace.json", traces / "sub" / "node.2.pt.trace.json.gz"
    zipped.parent.mkdir()
    plain.write_bytes(data[:100])
    zipped.write_bytes(gz[: len(gz) // 2])
    for _ in range(4):  # partial files, stable in size: still not complete (they do not parse)
        assert w.poll_once() == 0
    with open(plain, "ab") as f:
        f.write(data[100:])
    with open(zipped, "ab") as f:
        f.write(gz[len(gz) // 2:])
    assert w.poll_once() == 0  # changed since the last poll: wait for it to settle
    assert w.poll_once() == 2
    for _ in range(3):
        assert w.poll_once() == 0
    w.stop()
    # a restarted agent remembers what it uploaded
    w2 = ProfilerWatcher([traces], srv.url, None, RES, state, interval=0.1)
    for _ in range(3):
        assert w2.poll_once() == 0
    plain.unlink()  # a deleted trace is forgotten by the state file
    w2.poll_once()
    w2.stop()
    assert [Path(k).name for k in json.loads(state.read_text())["files"]] == ["node.2.pt.trace.json.gz"]
    rows = srv.sql("SELECT filename, host_name, service_name, service_instance_id, size_bytes, summary "
                   "FROM profiler_traces ORDER BY filename")
    assert [r[0] for r in rows] == ["node.1.pt.trace.json", "node.2.pt.trace.json.gz"]
    assert all(r[1:4] == ("node-p", "chat-api", "replica-1") for r in rows)
    assert rows[0][4] == len(data) and rows[1][4] == len(gz)
    summary = json.loads(rows[0][5])
    assert summary["gpu"]["busy_us"] == pytest.approx(60.5) and summary["top_kernels"][0]["name"] == "gemm"


def test_watcher_uploads_a_real_kineto_file_and_gives_up_on_garbage(make_server, tmp_path, shared_data):
    srv = make_server()
    traces = tmp_path / "traces"
    traces.mkdir()
    shutil.copy(shared_data / "kineto" / "hta_amd_mi250_rocm.json.gz", traces / "mi250.pt.trace.json.gz")
    (traces / "garbage.json").write_text("{ not json")
    w = ProfilerWatcher([traces, tmp_path / "not-there-yet"], srv.url, None, RES, tmp_path / "state.json",
                        interval=0.1, invalid_after=3)
    uploaded = sum(w.poll_once() for _ in range(6))
    assert uploaded == 1
    st = json.loads((tmp_path / "state.json").read_text())["files"]
    statuses = {Path(k).name: v["status"] for k, v in st.items()}
    assert statuses == {"mi250.pt.trace.json.gz": "uploaded", "garbage.json": "invalid"}
    w.stop()
    rows = srv.sql("SELECT filename, epoch_us(trace_start), summary FROM profiler_traces")
    assert len(rows) == 1 and rows[0][0] == "mi250.pt.trace.json.gz"
    assert json.loads(rows[0][2])["device_names"][0] == "AMD Radeon Graphics"


def test_upload_failure_is_retried_later(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "t.json").write_text(json.dumps(small_trace()))
    w = ProfilerWatcher([traces], "http://127.0.0.1:9", None, RES, tmp_path / "state.json", interval=0.1)
    assert w.poll_once() == 0 and w.poll_once() == 0  # connection refused: kept for a retry, nothing recorded
    assert not (tmp_path / "state.json").exists()
    w.stop()


@pytest.mark.slow
def test_real_torch_profile_with_a_recompile(make_server, tmp_path):
    """A real PyTorch (CPU) profile around a torch.compile recompile, picked up and summarised."""
    torch = pytest.importorskip("torch")
    import time

    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 16)

    def forward(x):
        return torch.relu(lin(x))

    compiled = torch.compile(forward, backend="eager", dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(2, 4, 16))  # first compile, outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled(torch.randn(2, 4, 16))  # cached
            t0 = time.perf_counter()
            compiled(torch.randn(2, 5, 16))  # new length: recompile 0/1
            stall_us = (time.perf_counter() - t0) * 1e6
    traces = tmp_path / "traces"
    traces.mkdir()
    prof.export_chrome_trace(str(traces / "replica.pt.trace.json"))
    srv = make_server()
    w = ProfilerWatcher([traces], srv.url, None, RES, tmp_path / "state.json", interval=0.1)
    assert sum(w.poll_once() for _ in range(3)) == 1
    w.stop()
    (summary_text,) = srv.sql("SELECT summary FROM profiler_traces")[0]
    s = json.loads(summary_text)
    comp = s["compile"]
    assert [c["compile_id"] for c in comp["compiles"]] == ["0/1"]
    assert 0 < comp["compiles"][0]["dur_us"] <= stall_us  # the compile is inside the caller's stall
    assert comp["compiling_us"] >= 0.5 * stall_us  # and most of it
    assert comp["regions"]["Torch-Compiled Region"]["count"] == 2
    assert comp["regions"]["TorchDynamo Cache Lookup"]["count"] == 2
    assert s["gpu"]["devices"] == 0  # a CPU-only profile: no GPU activity, no made-up busy time
    assert abs(s["trace_start_us"] / 1e6 - time.time()) < 600  # epoch from baseTimeNanoseconds
    torch._dynamo.reset()


from hypothesis import given, settings, strategies as st  # noqa: E402

_scalars = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8), st.booleans())
_event = st.fixed_dictionaries(
    {"ph": st.sampled_from(["X", "M", "s", "f", "i", None]),
     "cat": st.sampled_from(["kernel", "gpu_memcpy", "cuda_runtime", "cpu_op", "Trace", None]),
     "name": st.one_of(st.sampled_from(["gemm", "cudaLaunchKernel", "dynamo", "Torch-Compiled Region: 0/1", "ProfilerStep#1"]), st.text(max_size=10)),
     "ts": _scalars, "dur": _scalars, "pid": _scalars},
    optional={"args": st.dictionaries(st.sampled_from(["correlation", "device", "stream"]), _scalars, max_size=3)},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_event, _scalars), max_size=30), st.booleans())
def test_summary_never_crashes_on_odd_events(events, exclude_last_step):
    s = summarize({"traceEvents": events}, exclude_last_step=exclude_last_step)
    json.dumps(s, allow_nan=False)  # strict JSON: the server stores it
    for d in s["devices"]:
        assert d["busy_us"] <= d["span_us"] + 1e-6
