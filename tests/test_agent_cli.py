"""The agent as users run it: ``python -m agents`` / ``tailscope agent``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_agent_imports_nothing_of_the_server():
    code = ("import sys, agents.daemon, agents.cli, agents.profiler_summary;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'duckdb', 'pandas', 'torch', 'pyarrow', 'numpy', 'collector', 'analyzer', 'dashboard', 'uvicorn'));"
            "print(bad); raise SystemExit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys):
    from agents.cli import main

    assert main(["--server", "localhost:4318", "--spool-dir", str(tmp_path)]) == 2
    assert "--server must be an http:// or https:// URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--scrape-service", "x"])
    assert exc.value.code == 2
    assert "must follow the --scrape URL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--interval", "0"])
    with pytest.raises(SystemExit):
        main(["--spool-max-bytes", "lots"])


def test_spool_dir_defaults(monkeypatch, tmp_path):
    from agents.spool import default_spool_dir

    monkeypatch.setenv("TAILSCOPE_AGENT_SPOOL", str(tmp_path / "s"))
    assert default_spool_dir() == tmp_path / "s"
    monkeypatch.delenv("TAILSCOPE_AGENT_SPOOL")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_spool_dir() == tmp_path / "cache" / "tailscope" / "spool"


@pytest.mark.slow
def test_sigterm_flushes_and_exits_cleanly(make_server, tmp_path):
    srv = make_server()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents", "--server", srv.url, "--nvml-module", "tests.fake_nvml",
         "--interval", "0.2", "--batch-interval", "30", "--spool-dir", str(tmp_path / "spool"),
         "--host-name", "node-sig", "--profiler-dir", str(tmp_path / "traces")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        end = time.monotonic() + 60
        while not any("off: scrape" in line for line in lines) and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)  # started: the banner is printed once the sources run
        time.sleep(2.0)  # ~10 samples, all still in memory (batch interval 30 s)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "on:  gpu: 2 GPU(s)" in err and "on:  xid" in err and "on:  profiler" in err
    assert "off: scrape: no --scrape URL given" in err
    assert "stopped; sent" in err and "0 left in the spool" in err
    rows = srv.sql("SELECT count(*), count(DISTINCT time) FROM metrics "
                   "WHERE name = 'tailscope.gpu.utilization' AND host_name = 'node-sig'")
    n, samples = rows[0]
    assert samples >= 5 and n == 2 * samples  # two GPUs per sample, nothing lost at shutdown
