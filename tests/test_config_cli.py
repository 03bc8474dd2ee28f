"""Settings resolution and the stopped-store CLI commands (sql, export, config)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from collector.store import Store, StoreError
from tailscope import cli
from tailscope.config import SETTINGS, ConfigError, load, markdown_table, parse_slo


def test_precedence_flag_over_env_over_default():
    assert load({}, environ={}).port == 4318
    assert load({}, environ={"TAILSCOPE_PORT": "9000"}).port == 9000
    assert load({"port": "9100"}, environ={"TAILSCOPE_PORT": "9000"}).port == 9100
    assert load({}, environ={"TAILSCOPE_TOKENS": "a, b,"}).tokens == ("a", "b")


def test_bad_values_and_unknown_names_fail_with_the_name():
    with pytest.raises(ConfigError, match="TAILSCOPE_PORT"):
        load({}, environ={"TAILSCOPE_PORT": "http"})
    with pytest.raises(ConfigError, match="--queue-max-spans"):
        load({"queue_max_spans": "0"}, environ={})
    with pytest.raises(ConfigError, match="TAILSCOPE_PROT"):
        load({}, environ={"TAILSCOPE_PROT": "1"})
    with pytest.raises(ConfigError, match="unknown setting"):
        load({"nope": 1}, environ={})


def test_slo_parsing():
    assert parse_slo("chat-api=800, embed=120.5") == {"chat-api": 800.0, "embed": 120.5}
    with pytest.raises(ConfigError, match="SERVICE=MILLISECONDS"):
        parse_slo("chat-api")


def test_every_setting_is_documented():
    text = open(cli.__file__.replace("tailscope/cli.py", "docs/configuration.md")).read()
    assert text.strip() == markdown_table().strip(), "regenerate: tailscope config > docs/configuration.md"
    for s in SETTINGS:
        assert s.env in text and s.flag in text, f"{s.name} missing from docs/configuration.md"


@pytest.fixture
def stopped_store(tmp_path):
    path = tmp_path / "stopped.duckdb"
    t0 = dt.datetime(2026, 11, 23, 14)
    with Store(path) as s:
        s.write([("spans", pa.table({
            "trace_id": [f"{i:032x}" for i in range(10)],
            "span_id": [f"{i:016x}" for i in range(10)],
            "start_time": [t0 + dt.timedelta(minutes=i) for i in range(10)],
            "end_time": [t0 + dt.timedelta(minutes=i, seconds=1) for i in range(10)],
            "service_name": ["chat-api"] * 10,
        }))])
    return path


def test_sql_command_on_a_stopped_store(stopped_store, capsys):
    assert cli.main(["sql", "--db", str(stopped_store), "--format", "json", "SELECT count(*) AS n FROM spans"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[10]]
    assert cli.main(["sql", "--db", str(stopped_store), "DELETE FROM spans"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err


def test_sql_command_missing_db_is_one_line(tmp_path, capsys):
    assert cli.main(["sql", "--db", str(tmp_path / "nope.duckdb"), "SELECT 1"]) == 2
    assert "no such database" in capsys.readouterr().err


def test_export_time_range_to_parquet_readable_by_duckdb(stopped_store, tmp_path, capsys):
    out = tmp_path / "export"
    rc = cli.main(["export", "--db", str(stopped_store), "--out", str(out),
                   "--since", "2026-11-23T14:03:00Z", "--until", "2026-11-23T14:07:00Z"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["rows"]["spans"] == 4
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), min(start_time) FROM '{out}/spans.parquet'").fetchone() == (4, dt.datetime(2026, 11, 23, 14, 3))


def test_store_locked_by_a_running_writer_is_a_clear_error(stopped_store):
    code = (
        "import sys, time; from collector.store import Store; s = Store(sys.argv[1]); "
        "print('ready', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(stopped_store)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match="in use by another process"):
            Store(stopped_store, read_only=True)
    finally:
        proc.kill()
        proc.wait()


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "tailscope", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout and "demo" in out.stdout


def test_schema_doc_is_current():
    from collector.schema_doc import render

    doc = open(cli.__file__.replace("tailscope/cli.py", "docs/schema.md")).read()
    assert doc.strip() == render().strip(), "regenerate: python -m collector.schema_doc > docs/schema.md"


def test_compose_file_references_real_entry_points():
    """docker-compose.yml parses, and every command is a tailscope subcommand that accepts its flags."""
    import pathlib

    import yaml

    compose = yaml.safe_load((pathlib.Path(cli.__file__).parent.parent / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"server", "agent", "demo"}
    for name, svc in compose["services"].items():
        command = svc["command"]
        if command[0] in cli._DELEGATED:
            import argparse
            import importlib

            module = importlib.import_module(cli._DELEGATED[command[0]][0])
            parser = argparse.ArgumentParser()
            module.add_arguments(parser)
            parser.parse_args(command[1:])
        else:
            cli.build_parser().parse_args(command)
    gpu = compose["services"]["agent"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
