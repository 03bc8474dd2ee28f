"""Parsing torch's compile records and log texts, including older torch shapes.

Only torch 2.13 is installed here, so records as older versions deliver them
(torch 2.4/2.5: ``start_time`` in seconds plus ``entire_frame_compile_time_s``,
no ``recompile_reason``; the limit named ``cache_size_limit``; callbacks
without arguments) are built by hand from torch's source of those versions.
The 2.13 shapes are checked against live records in test_torch_compile.py.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest

from agents.torch import compile_events as ce
from agents.torch.attributes import map_keywords


def _record(**fields):
    base = dict(
        compile_id="0/1", co_name="forward", co_filename="/app/model.py", co_firstlineno=12,
        start_time_us=1_700_000_000_000_000, end_time_us=1_700_000_000_080_000, duration_us=80_000,
        recompile_reason="0/0: tensor 'x' size mismatch at index 1. expected 10, actual 11",
        graph_node_shapes="{'l_self_modules_lin_parameters_weight_': [16, 16], 'l_x_': [2, 11, 16], 'relu': [2, 11, 16]}",
        fail_type=None, fail_reason=None, is_runtime=False,
        inductor_fx_local_cache_hit_count=0, inductor_fx_local_cache_miss_count=0,
        aotautograd_local_cache_hit_count=0, aotautograd_local_cache_miss_count=0,
    )
    base.update(fields)
    return SimpleNamespace(**base)


def test_parse_a_2_13_record():
    rec = ce.parse_metrics(_record())
    assert rec is not None
    assert (rec.compile_id, rec.frame, rec.kind) == ("0/1", "forward", "recompile")
    assert rec.reason == "tensor 'x' size mismatch at index 1. expected 10, actual 11"
    assert rec.end_ns - rec.start_ns == 80_000_000
    assert ce.pick_shape(rec, None) == [2, 11, 16]
    assert rec.cache == "miss" and rec.failure is None and not rec.limit_hit


def test_parse_an_old_record_without_us_times_or_reason():
    old = SimpleNamespace(
        compile_id="0/2", co_name="forward", co_filename="/app/model.py", co_firstlineno=12,
        start_time=1_700_000_000.25, entire_frame_compile_time_s=1.5,
        fail_type=None, fail_reason=None, graph_node_shapes=None,
    )
    rec = ce.parse_metrics(old)
    assert rec is not None
    assert rec.start_ns == 1_700_000_000_250_000_000
    assert rec.end_ns - rec.start_ns == 1_500_000_000
    assert rec.kind == "recompile"  # from the compile id's attempt number
    assert rec.reason is None


def test_first_compile_and_cache_hit():
    rec = ce.parse_metrics(_record(compile_id="0/0", recompile_reason=None,
                                   inductor_fx_local_cache_hit_count=1, aotautograd_local_cache_hit_count=1))
    assert rec.kind == "first" and rec.cache == "hit"
    partial = ce.parse_metrics(_record(inductor_fx_local_cache_hit_count=1, inductor_fx_local_cache_miss_count=1))
    assert partial.cache == "miss"
    # as 2.13 reports a warm FX graph cache for an inference graph
    warm = ce.parse_metrics(_record(inductor_fx_local_cache_hit_count=1, aotautograd_local_cache_miss_count=1,
                                    remote_cache_time_saved_s=39.9))
    assert warm.cache == "hit" and warm.cache_saved_s == 39.9


def test_runtime_and_limit_records():
    assert ce.parse_metrics(_record(is_runtime=True)) is None
    limit = ce.parse_metrics(_record(co_name=None, fail_type="Unsupported",
                                     fail_reason="Dynamo recompile limit exceeded\n  Explanation: ..."))
    assert limit.limit_hit and limit.failure == "Unsupported: Dynamo recompile limit exceeded"
    old_limit = ce.parse_metrics(_record(fail_type="CacheLimitExceeded", fail_reason="cache_size_limit reached"))
    assert old_limit.limit_hit
    assert ce.parse_metrics(SimpleNamespace(compile_id="0/0", co_name="f")) is None  # no times at all


def test_clean_reason_strips_compile_ids_on_every_line():
    text = "0/0: tensor 'x' size mismatch at index 1. expected 10, actual 11\n  - 0/1: len(args) == 2"
    assert ce.clean_reason(text) == (
        "tensor 'x' size mismatch at index 1. expected 10, actual 11\nlen(args) == 2"
    )
    assert ce.clean_reason(None) is None and ce.clean_reason("  ") is None


def test_limit_warning_new_and_old_names():
    new = (
        "torch._dynamo hit config.recompile_limit (8)\n   function: 'forward' (/app/m.py:12)\n"
        "   last reason: 0/7: tensor 'x' size mismatch at index 1. expected 17, actual 18\n"
        'To log all recompilation reasons, use TORCH_LOGS="recompiles".'
    )
    assert ce.parse_limit_warning(new) == {
        "limit_type": "recompile_limit", "limit": 8, "frame": "forward", "location": "/app/m.py:12",
        "reason": "tensor 'x' size mismatch at index 1. expected 17, actual 18",
    }
    old = "torch._dynamo hit config.cache_size_limit (8)\n   function: 'forward' (/app/m.py:12)\n   last reason: L['x'].size()[1] == 17"
    parsed = ce.parse_limit_warning(old)
    assert parsed["limit_type"] == "cache_size_limit" and parsed["reason"] == "L['x'].size()[1] == 17"
    assert ce.parse_limit_warning("some other warning") is None


def test_pick_shape_prefers_the_tensor_named_in_the_guard_failure():
    rec = ce.parse_metrics(_record(
        recompile_reason="0/0: tensor 'mask' size mismatch at index 1. expected 10, actual 11",
        graph_node_shapes="{'l_x_': [2, 11, 16], 'l_mask_': [2, 11]}",
    ))
    assert ce.pick_shape(rec, None) == [2, 11]
    snap = ce.StartSnapshot(thread=1, span=None, handle=None, start_ns=0,
                            inputs={"x": [2, 11, 16], "mask": [2, 11]}, input_order=["x", "mask"])
    assert ce.pick_shape(rec, snap) == [2, 11]
    # nn.Sequential compiles frame `inner(*args)`: the guard names args[0]
    seq = ce.parse_metrics(_record(
        recompile_reason="0/0: tensor 'args[0]' size mismatch at index 1. expected 3, actual 4",
        graph_node_shapes="{'l_args_0_': [1, 4, 16]}",
    ))
    assert ce.pick_shape(seq, None) == [1, 4, 16]
    no_shapes = ce.parse_metrics(_record(graph_node_shapes=None, recompile_reason=None))
    assert ce.pick_shape(no_shapes, snap) == [2, 11, 16]
    assert ce.pick_shape(no_shapes, None) is None


def test_old_torch_reason_comes_from_the_recompiles_log(monkeypatch):
    """Before ``recompile_reason`` existed, the recompiles artifact log carried the text."""
    w = ce.CompileWatcher()
    emitted = []
    handle = SimpleNamespace()
    w._handles.append(handle)  # type: ignore[arg-type]
    w._needs_recompiles_log = True
    monkeypatch.setattr(w, "_emit_compile", lambda h, parent, record, snap: emitted.append((h, parent, record)))
    log_record = logging.LogRecord(
        ce.RECOMPILES_LOGGER, logging.DEBUG, __file__, 1,
        "Recompiling function forward in /app/m.py:12\n    triggered by the following guard failure(s):\n"
        "    - 0/0: tensor 'x' size mismatch at index 1. expected 10, actual 11", None, None,
    )
    w._on_log(ce.RECOMPILES_LOGGER, log_record)
    old = SimpleNamespace(compile_id="0/1", co_name="forward", start_time=1.0,
                          entire_frame_compile_time_s=0.07, fail_type=None)
    metrics_record = logging.LogRecord(ce.METRICS_LOGGER, logging.INFO, __file__, 1, "%s", (old,), None)
    w._on_log(ce.METRICS_LOGGER, metrics_record)
    assert len(emitted) == 1
    h, parent, record = emitted[0]
    assert h is handle and parent is None
    assert record.kind == "recompile"
    assert record.reason == "tensor 'x' size mismatch at index 1. expected 10, actual 11"
    # The same record seen again (e.g. by polling) is not emitted twice.
    w._on_log(ce.METRICS_LOGGER, metrics_record)
    assert len(emitted) == 1


def test_callbacks_without_arguments_are_matched_by_thread(monkeypatch):
    """torch 2.4 called start callbacks with no arguments (no compile id)."""
    w = ce.CompileWatcher()
    handle = SimpleNamespace()
    w._handles.append(handle)  # type: ignore[arg-type]
    monkeypatch.setattr(w, "poll", lambda: None)
    emitted = []
    monkeypatch.setattr(w, "_emit_compile", lambda h, parent, record, snap: emitted.append(snap))
    w._on_start()  # no args
    snap = w._thread_snapshot[threading.get_ident()]
    rec = _record(compile_id="3/0", recompile_reason=None, start_time_us=snap.start_ns // 1000,
                  end_time_us=snap.start_ns // 1000 + 5)
    w._on_log(ce.METRICS_LOGGER, logging.LogRecord(ce.METRICS_LOGGER, logging.INFO, __file__, 1, "%s", (rec,), None))
    assert emitted == [snap]
    assert threading.get_ident() not in w._thread_snapshot


def test_short_keywords_map_to_spec_names():
    out = map_keywords({"model": "m", "input_tokens": 3, "ttft": 1, "session_id": None}, {})
    assert out == {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 3,
                   "gen_ai.latency.time_to_first_token": 1.0}
    with pytest.raises(TypeError, match="must be an int"):
        map_keywords({"input_tokens": True}, {})
