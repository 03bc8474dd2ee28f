"""Profiler-trace uploads with real Kineto traces from HolisticTraceAnalysis (shared data)."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
from pathlib import Path

import httpx

URL = "/api/v1/profiler-traces"


def test_multipart_upload_of_a_gzipped_kineto_trace(make_server, shared_data: Path, tmp_path):
    srv = make_server(profiler_dir=str(tmp_path / "traces"))
    path = shared_data / "kineto" / "hta_sampled_rank-0.json.gz"
    raw = path.read_bytes()
    summary = {"top_ops": [["aten::mm", 12.5]], "steps": 3}
    with path.open("rb") as fh:
        r = httpx.post(
            srv.url + URL,
            files={"file": (path.name, fh, "application/gzip")},
            data={"host.name": "node-7", "service.instance.id": "replica-2", "service.name": "chat-api", "summary": json.dumps(summary)},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    body = r.json()
    sha = hashlib.sha256(raw).hexdigest()
    assert body["sha256"] == sha and body["size_bytes"] == len(raw) and body["events"] == 4855
    assert body["duplicate"] is False
    stored = tmp_path / "traces" / f"{sha}.json.gz"
    assert stored.read_bytes() == raw
    rows = srv.sql(
        "SELECT id, host_name, service_instance_id, service_name, filename, path, size_bytes, sha256, trace_start, trace_end, "
        "json_extract(summary, '$.steps')::INT FROM profiler_traces"
    )
    assert len(rows) == 1
    row = rows[0]
    assert row[0] == body["id"]
    assert row[1:8] == ("node-7", "replica-2", "chat-api", path.name, str(stored), len(raw), sha)
    # No baseTimeNanoseconds in this file: ts are already epoch µs (2023-04-28 23:51:37 UTC, ~2.08 s of events).
    start = dt.datetime.fromisoformat(row[8].rstrip("Z"))
    end = dt.datetime.fromisoformat(row[9].rstrip("Z"))
    assert start == dt.datetime(2023, 4, 28, 23, 51, 37, 226747)
    events = [e for e in json.loads(gzip.decompress(raw))["traceEvents"] if e.get("ph") != "M" and "ts" in e]
    last_end = max(e["ts"] + e.get("dur", 0) for e in events)  # the end of the longest-running last event
    assert end == dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=last_end)
    assert row[10] == 3

    # The same file again (an agent retrying after a lost answer): same id, no second row.
    r2 = httpx.post(
        srv.url + URL + "?host.name=node-7&service.instance.id=replica-2&service.name=chat-api&filename=" + path.name,
        content=raw,
        timeout=60,
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["id"] == body["id"] and r2.json()["duplicate"] is True
    assert srv.sql("SELECT count(*) FROM profiler_traces") == [(1,)]


def test_raw_upload_with_base_time(make_server, shared_data: Path, tmp_path):
    """ROCm trace with baseTimeNanoseconds: event time = base/1000 + ts (µs)."""
    srv = make_server(profiler_dir=str(tmp_path / "p"))
    raw = gzip.decompress((shared_data / "kineto" / "hta_amd_mi250_rocm.json.gz").read_bytes())
    doc = json.loads(raw)
    r = httpx.post(srv.url + URL + "?filename=mi250.json&host.name=amd-1", content=raw, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["events"] == len(doc["traceEvents"]) == 220
    timed = [e for e in doc["traceEvents"] if e.get("ph") != "M" and "ts" in e]
    first = min(e["ts"] for e in timed)
    expected = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=doc["baseTimeNanoseconds"] / 1000 + first)
    got = dt.datetime.fromisoformat(body["trace_start"].rstrip("Z"))
    assert abs(got - expected) < dt.timedelta(microseconds=2)
    assert (tmp_path / "p" / f"{body['sha256']}.json").exists()
    assert srv.sql("SELECT host_name, service_name FROM profiler_traces") == [("amd-1", None)]


def test_default_directory_is_next_to_the_db(make_server, tmp_path):
    db = tmp_path / "x.duckdb"
    srv = make_server(db=str(db))
    r = httpx.post(srv.url + URL + "?filename=t.json", content=b'{"traceEvents": [{"ph": "X", "ts": 1, "dur": 2}]}', timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["trace_start"] is None  # relative µs without a base time: no wall-clock time claimed
    assert (tmp_path / "x.duckdb.profiler" / f"{r.json()['sha256']}.json").exists()


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["ok"] is False
    return r.json()["error"]


def test_bad_uploads_are_refused_and_leave_nothing_behind(make_server, tmp_path):
    pdir = tmp_path / "pd"
    srv = make_server(profiler_dir=str(pdir), max_profiler_bytes=200_000)
    assert "Chrome trace" in _error(httpx.post(srv.url + URL, content=b'{"events": []}', timeout=30), 400)
    assert "not valid JSON" in _error(httpx.post(srv.url + URL, content=b"{nope", timeout=30), 400)
    assert "not valid gzip" in _error(httpx.post(srv.url + URL, content=b"\x1f\x8b\x08garbage", timeout=30), 400)
    assert "empty upload" in _error(httpx.post(srv.url + URL, content=b"", timeout=30), 400)
    # A gzip bomb: 30 KB that inflates past the limit.
    bomb = gzip.compress(b'{"traceEvents": [' + b" " * 30_000_000 + b"]}")
    assert len(bomb) < 200_000
    assert "decompresses to more than" in _error(httpx.post(srv.url + URL, content=bomb, timeout=30), 413)
    _error(httpx.post(srv.url + URL, content=b" " * 300_000, timeout=30), 413)
    _error(httpx.post(srv.url + URL, files={"other": ("a.json", b"{}")}, timeout=30), 400)
    r = httpx.post(srv.url + URL, files={"file": ("t.json", b'{"traceEvents": []}')}, data={"summary": "[1, 2"}, timeout=30)
    assert "summary" in _error(r, 400)
    assert srv.sql("SELECT count(*) FROM profiler_traces") == [(0,)]
    assert [p.name for p in pdir.iterdir()] == []  # no temp files left
    r = httpx.post(srv.url + URL, files={"file": ("ok.json", b'{"traceEvents": []}')}, timeout=30)
    assert r.status_code == 200 and r.json()["events"] == 0
