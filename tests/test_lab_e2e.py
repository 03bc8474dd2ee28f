"""One short lab scenario through the real server: the telemetry tables it must fill.

A two-replica scenario of a few virtual minutes with three mechanisms on
(bucketing off on replica-0 so new shapes really compile, a KV squeeze on
replica-0, a restart of replica-1), served with the real compiled executor
and sent through the instrumentation to a real server; read back via SQL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from lab.loadgen import LengthSampler, azure_rows, poisson  # noqa: E402
from lab.runner import Lab, LabConfig, plan_epochs  # noqa: E402
from lab.scenarios import Injection, Scenario, Sessions, chat_requests  # noqa: E402
from lab.sim import ReplicaSpec, Window  # noqa: E402


def scenario(data_dir: Path) -> Scenario:
    rng = random.Random(5)
    sampler = LengthSampler(azure_rows(data_dir))
    sessions = Sessions(16, rng)
    reqs = chat_requests(poisson(3.0, 0.0, 180.0, rng), 2, rng, sampler, sessions)
    specs = [ReplicaSpec(kv_blocks=65536, pad_multiple=64, buckets=(64, 128, 256, 512)) for _ in range(2)]
    specs[0].no_bucketing.append(Window(40.0, 100.0))
    specs[0].kv_squeeze.append((Window(120.0, 160.0), 64))
    specs[1].restarts.append((60.0, 5.0))
    inj = [
        Injection("compile_miss", 40.0, 100.0, 0),
        Injection("kv_eviction", 120.0, 160.0, 0),
        Injection("cold_start", 60.0, 65.0, 1),
    ]
    return Scenario("e2e_mix", "test", "lab-e2e", 180.0, specs, reqs, inj)


def test_the_time_scale_makes_up_for_the_machines_speed() -> None:
    """A scenario must inject the same effect on a fast sitting as on a slow one: the fixed calibration
    workload always lasts scale x reference on the virtual clock; without a reference, the machine's own time."""
    with Lab(LabConfig(scale=10.0, reference_work_ms=None)) as raw:
        assert raw.scale == 10.0
    with Lab(LabConfig(scale=10.0, reference_work_ms=9.0)) as lab:
        assert lab.cost.reference_work() * lab.scale == pytest.approx(10.0 * 9.0 / 1000)
        assert lab.measured_work_ms == pytest.approx(lab.cost.reference_work() * 1000)


@pytest.mark.slow
def test_short_scenario_fills_the_telemetry_tables(make_server: Any, shared_data: Path, tmp_path: Path) -> None:
    srv = make_server()
    scn = scenario(shared_data)
    (epoch,) = plan_epochs([scn])
    with Lab(LabConfig(scale=10.0)) as lab:
        res = lab.run(scn, srv.url, epoch, tmp_path)
    assert res.requests == len(scn.requests)
    assert res.compiles >= 1

    roles = dict(srv.sql("select role, count(*) from spans where service_name = 'lab-e2e' group by role"))
    assert sum(roles.values()) == res.spans  # the count callers wait on is exact
    n = len(scn.requests)
    assert roles["request"] == n
    assert roles["queue"] >= n * 0.5 and roles["prefill"] >= n and roles["decode"] >= n
    assert roles["batch"] >= 1 and roles["model_load"] == 1
    assert roles["compile"] >= res.compiles  # in-window recompiles plus the restart's warm-up compiles

    # compile spans: dynamo's own reason, the padded shape, parented to a batch or the model load
    rows = srv.sql(
        "select c.compile_kind, c.compile_reason, c.compile_shape, p.role from spans c join spans p "
        "on c.parent_span_id = p.span_id and c.trace_id = p.trace_id where c.role = 'compile'"
    )
    assert {r[3] for r in rows} <= {"batch", "model_load"}
    in_batches = [r for r in rows if r[3] == "batch"]
    assert in_batches and all(r[0] == "recompile" and "size mismatch" in r[1] for r in in_batches)
    assert all(json.loads(r[2])[1] % 64 == 0 for r in in_batches)

    # batches link their members; members carry the batch id and the padded length
    links = srv.sql("select count(*) from span_links l join spans s on l.linked_span_id = s.span_id where s.role = 'request'")[0][0]
    assert links >= n
    bad = srv.sql("select count(*) from spans where role = 'request' and service_name = 'lab-e2e' and (batch_id is null or shape_len is null or gpu_index is null)")[0][0]
    assert bad == 0

    # KV evictions and preemptions, the replica's ready event, its new pid
    events = dict(srv.sql("select coalesce(kv_reason, event_name), count(*) from logs group by 1"))
    assert events.get("tailscope.replica.ready") == 1
    assert events.get("prefix_lru", 0) + events.get("capacity", 0) + events.get("preemption", 0) >= 1
    pids = srv.sql("select distinct process_pid from spans where service_instance_id = 'replica-1' and role = 'request'")
    assert len(pids) == 2

    # emulated GPU metrics under the spec's names, joined by host and GPU index
    names = {r[0] for r in srv.sql("select distinct name from metrics")}
    for want in ("tailscope.gpu.utilization", "tailscope.gpu.sm_clock", "tailscope.gpu.clock_event_reasons",
                 "tailscope.gpu.memory.used", "tailscope.gpu.process.memory.used", "tailscope.kv.usage"):
        assert want in names
    assert srv.sql("select count(distinct gpu_index) from metrics where name = 'tailscope.gpu.utilization'")[0][0] == 2

    # the ground truth sits next to the run, keyed by the trace ids the server holds, and never in the store
    truth = json.loads(Path(res.truth_path).read_text())
    assert len(truth["requests"]) == n
    assert truth["scale"] == pytest.approx(lab.scale)  # the time scale the run used, after the speed normalization
    ids = {r[0] for r in srv.sql("select trace_id from spans where role = 'request' and service_name = 'lab-e2e'")}
    assert {r["trace_id"] for r in truth["requests"]} == ids
    slow = [r for r in truth["requests"] if r["slow"]]
    assert slow and {r["cause"] for r in slow} <= {"compile_miss", "kv_eviction", "cold_start"}
    leaked = srv.sql("select count(*) from spans where cast(attributes as varchar) like '%excess%' or cast(attributes as varchar) like '%cause%'")[0][0]
    assert leaked == 0
    # nor does anything the server holds name the scenario or an injected cause
    pattern = "'.*(e2e_mix|compile_miss|kv_eviction|cold_start).*'"
    # every text column (typed or JSON) of every telemetry table, so a label can hide nowhere
    text = {}
    for table in ("spans", "logs", "metrics", "span_events", "span_links"):
        cols = srv.sql(
            "select column_name from information_schema.columns "
            f"where table_name = '{table}' and data_type in ('VARCHAR', 'JSON')"
        )
        text[table] = " || ".join(f"coalesce(cast({c[0]} as varchar), '')" for c in cols)
    for table, expr in text.items():
        rows = srv.sql(f"select count(*) from {table} where lower({expr}) similar to {pattern}")
        assert rows[0][0] == 0, table
    assert srv.sql("select count(*) from spans where request_id like 'req-%'")[0][0] == n
    # virtual time: the spans sit inside the scenario's planned window
    lo, hi = srv.sql("select min(epoch(start_time)), max(epoch(end_time)) from spans where service_name = 'lab-e2e'")[0]
    assert epoch - 1 <= lo and hi <= epoch + 180.0 + 600.0
