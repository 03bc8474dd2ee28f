"""Prometheus text parsing and forwarding of serving-engine metrics."""

from __future__ import annotations

import http.server
import math
import threading
import time

import pytest

from agents.otlp_encode import encode_metrics
from agents.prom_scrape import PromScraper, parse_exposition, parse_sample_line, to_points, ExpositionError

RES = {"service.name": "vllm-chat", "service.instance.id": "replica-3", "host.name": "node-1"}


@pytest.fixture
def vllm_text(shared_data) -> str:
    return (shared_data / "serving-metrics" / "vllm_docs_metrics_example.prom").read_text()


def test_vllm_docs_example_keeps_what_is_valid(vllm_text):
    result = parse_exposition(vllm_text)
    assert result.invalid_lines == 0
    assert len(result.samples) == 20
    assert result.types["vllm:time_to_first_token_seconds"] == "histogram"
    points = {(p.name, tuple(sorted(dict(p.attributes).items()))): p for p in to_points(result, RES, 10**18, 10**17)}
    model = ("model_name", "meta-llama/Llama-3.1-8B-Instruct")
    running = points[("vllm:num_requests_running", (model,))]
    assert running.kind == "gauge" and running.value == 8.0
    gen = points[("vllm:generation_tokens_total", (model,))]
    assert gen.kind == "sum" and gen.monotonic and gen.value == 27453.0 and gen.start_time_unix_nano == 10**17
    length = points[("vllm:request_success_total", (("finished_reason", "length"), model))]
    assert length.value == 131.0
    # the TTFT histogram has no +Inf bucket and no _sum: kept, total taken from _count, counted as incomplete
    ttft = points[("vllm:time_to_first_token_seconds", (model,))]
    assert ttft.kind == "histogram"
    assert ttft.explicit_bounds == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1)
    assert ttft.bucket_counts == (0, 0, 0, 13, 84, 26, 15, 2, 0)
    assert ttft.count == 140 == sum(ttft.bucket_counts)
    assert ttft.hist_sum is None
    assert result.incomplete_histograms == 1 and result.invalid_histograms == 0
    info = points[("vllm:cache_config_info", tuple(sorted({"block_size": "16", "cache_dtype": "auto", "calculate_kv_scales": "False",
                                                           "cpu_offload_gb": "0", "enable_prefix_caching": "False",
                                                           "gpu_memory_utilization": "0.9"}.items())))]
    assert info.value == 1.0
    # untyped samples (the http_* lines have no TYPE) are forwarded as gauges under their own names
    assert points[("http_request_duration_highr_seconds_count", ())].kind == "gauge"
    assert all(dict(p.resource) == RES for p in points.values())
    # and the whole set encodes as one OTLP request
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    req = ExportMetricsServiceRequest.FromString(encode_metrics(list(points.values())))
    metrics = {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}
    h = metrics["vllm:time_to_first_token_seconds"].histogram.data_points[0]
    assert list(h.bucket_counts) == [0, 0, 0, 13, 84, 26, 15, 2, 0] and not h.HasField("sum")
    assert metrics["vllm:request_success_total"].sum.is_monotonic


def test_labels_with_escapes_inf_nan_and_timestamps():
    s = parse_sample_line(r'm{path="C:\\dir",msg="say \"hi\"\nbye",empty=""} +Inf 1700000000123')
    assert dict(s.labels) == {"path": "C:\\dir", "msg": 'say "hi"\nbye', "empty": ""}
    assert s.value == math.inf and s.timestamp_ms == 1700000000123
    assert math.isnan(parse_sample_line("m NaN").value)
    assert parse_sample_line("m -Inf").value == -math.inf
    assert parse_sample_line('m{a="1",} 2').labels == (("a", "1"),)  # trailing comma is allowed
    for bad in ('m{a="1" 2', "m{a=1} 2", "m", "m 1 2 3", "9m 1", "m{=\"x\"} 1", "m abc"):
        with pytest.raises(ExpositionError):
            parse_sample_line(bad)


def test_malformed_lines_are_counted_and_the_rest_kept():
    text = """# HELP good a gauge
# TYPE good gauge
good{a="x"} 1.5
broken{a="x" 2
also broken
# TYPE lat histogram
lat_bucket{le="0.5"} 3
lat_bucket{le="1"} 5
lat_bucket{le="+Inf"} 6
lat_sum 4.25
lat_count 6
# TYPE bad histogram
bad_bucket{le="1"} 5
bad_bucket{le="2"} 3
bad_count 5
# TYPE nototal histogram
nototal_bucket{le="1"} 5
# TYPE rpc summary
rpc{quantile="0.99"} 0.8
rpc_sum 10
rpc_count 20
# EOF
"""
    result = parse_exposition(text)
    assert result.invalid_lines == 2
    points = {p.name: p for p in to_points(result, RES, 1, 0)}
    assert points["good"].value == 1.5
    lat = points["lat"]
    assert lat.bucket_counts == (3, 2, 1) and lat.explicit_bounds == (0.5, 1.0) and lat.hist_sum == 4.25 and lat.count == 6
    assert "bad" not in points and "nototal" not in points  # non-cumulative / no total: dropped, counted
    assert result.invalid_histograms == 2
    assert points["rpc"].kind == "gauge" and dict(points["rpc"].attributes) == {"quantile": "0.99"}
    assert points["rpc_count"].kind == "sum" and points["rpc_count"].monotonic


def test_scrape_forwards_to_the_real_server(make_server, vllm_text, tmp_path):
    """A loopback /metrics endpoint serving the vLLM docs example → the agent → the real store."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = vllm_text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    srv = make_server()
    try:
        from agents.cli import main

        code = main(["--server", srv.url, "--no-gpu", "--spool-dir", str(tmp_path / "spool"),
                     "--scrape", f"http://127.0.0.1:{engine.server_address[1]}/metrics",
                     "--scrape-service", "vllm-chat", "--scrape-instance", "replica-3",
                     "--scrape-interval", "0.5", "--batch-interval", "0.1", "--duration", "1.2"])
    finally:
        engine.shutdown()
        engine.server_close()
    assert code == 0
    rows = srv.sql("SELECT service_name, service_instance_id, type, value, count, is_monotonic FROM metrics "
                   "WHERE name = 'vllm:num_requests_running' ORDER BY time")
    assert rows and all(r[:2] == ("vllm-chat", "replica-3") for r in rows)
    assert rows[0][2] == "gauge" and rows[0][3] == 8.0
    hist = srv.sql("SELECT type, count, bucket_counts FROM metrics WHERE name = 'vllm:time_to_first_token_seconds' LIMIT 1")
    assert hist and hist[0][1] == 140 and list(hist[0][2]) == [0, 0, 0, 13, 84, 26, 15, 2, 0]
    counter = srv.sql("SELECT is_monotonic, value FROM metrics WHERE name = 'vllm:generation_tokens_total' LIMIT 1")
    assert counter == [(True, 27453.0)]


def test_scrape_failure_is_logged_once_and_not_fatal(caplog):
    scraper = PromScraper("http://127.0.0.1:9/metrics", RES, lambda p: True, interval=1, timeout=0.5)
    with caplog.at_level("WARNING"):
        assert scraper.scrape_once() == [] and scraper.scrape_once() == []
    assert scraper.failures == 2
    assert sum("scrape of http://127.0.0.1:9/metrics failed" in r.message for r in caplog.records) == 1
    scraper.stop()


def test_scrape_url_is_validated():
    with pytest.raises(ValueError, match="must start with http"):
        PromScraper("localhost:8000/metrics", RES, lambda p: True)


from hypothesis import given, settings, strategies as st  # noqa: E402

_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
_label_values = st.text(max_size=20)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_parsed_without_raising(text):
    result = parse_exposition(text)
    to_points(result, RES, 1, 0)
    assert result.invalid_lines >= 0


@settings(max_examples=200, deadline=None)
@given(_names, st.dictionaries(_names.filter(lambda n: ":" not in n), _label_values, max_size=4),
       st.floats(allow_nan=False, width=64))
def test_rendered_samples_parse_back(name, labels, value):
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    line = f"{name}{{{body}}} {value!r}" if labels else f"{name} {value!r}"
    s = parse_sample_line(line.replace("inf", "Inf"))
    assert s.name == name and dict(s.labels) == labels and s.value == value
