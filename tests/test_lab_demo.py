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
