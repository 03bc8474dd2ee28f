"""``tailscope demo``: argument checks, and one headless run against the real server."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from lab import demo
from lab.scenarios import CATALOG


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return p.parse_args(list(argv))


def test_unknown_scenario_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = demo.run(parse("--headless", "--scenario", "nope", "--db", str(tmp_path / "d.duckdb")))
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown scenario 'nope'" in err and "compile_miss" in err


def test_bad_minutes_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert demo.run(parse("--headless", "--minutes", "0", "--db", str(tmp_path / "d.duckdb"))) == 2
    assert "--minutes" in capsys.readouterr().err


def test_scenario_lists_expand() -> None:
    assert demo._scenarios(["compile_miss,gpu_throttle", "compile_miss"]) == ["compile_miss", "gpu_throttle"]
    assert demo._scenarios(["all"]) == list(CATALOG)
    assert demo._scenarios(None) == list(demo.DEFAULT_MIX)


@pytest.mark.slow
def test_headless_demo_prints_injections_and_incidents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "demo.duckdb"
    rc = demo.run(parse("--headless", "--port", "0", "--db", str(db), "--scenario", "compile_miss"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "server on http://127.0.0.1:" in out
    assert "[1/1] compile_miss" in out and "requests served" in out
    assert "injected: compile_miss on replica-0" in out
    assert "found:" in out
    assert db.is_file()
    truth = json.loads((tmp_path / "demo.truth" / "compile_miss.truth.json").read_text())
    assert truth["scenario"] == "compile_miss" and truth["requests"]


@pytest.mark.slow
def test_demo_keeps_serving_the_dashboard_until_ctrl_c(tmp_path: Path) -> None:
    """The real console script: scenario, links that open, then SIGINT stops it cleanly."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    import httpx

    exe = Path(sys.executable).parent / "tailscope"
    if not exe.is_file():
        pytest.skip("the tailscope console script is not installed in this environment")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAILSCOPE_", "OTEL_"))}
    proc = subprocess.Popen(
        [str(exe), "demo", "--port", "0", "--scenario", "gpu_throttle", "--db", str(tmp_path / "d.duckdb")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        # A suite started from a background shell inherits SIGINT ignored, and an ignored
        # signal stays ignored across exec: give the demo the disposition a terminal gives it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving until Ctrl-C" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(300), "".join(lines)[-3000:]
        text = "".join(lines)
        views = re.findall(r"view:\s+(http://\S+)", text)
        incidents = re.findall(r"(http://\S+/dashboard/incident/\S+)", text)
        assert views, text
        for url in views[:1] + incidents[:1]:
            r = httpx.get(url, timeout=60)
            assert r.status_code == 200, url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    reader.join(timeout=5)
    assert "stopping" in "".join(lines)


def test_progress_throttles_running_counts_but_always_shows_the_last() -> None:
    import io

    out = io.StringIO()
    progress = demo._Progress(out)
    progress("[1/1] compile_miss: 3161 requests")
    progress("[1/1] compile_miss: replica-0: 10/1580 requests served")
    progress("[1/1] compile_miss: replica-0: 1580/1580 requests served")
    lines = out.getvalue().splitlines()
    assert lines == ["[1/1] compile_miss: 3161 requests", "[1/1] compile_miss: replica-0: 1580/1580 requests served"]
