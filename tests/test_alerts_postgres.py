"""The control plane on a real PostgreSQL server behaves as on SQLite.

A throwaway cluster is created per test session (``initdb`` + ``pg_ctl`` from
Debian's ``postgresql`` package, as the ``postgres`` user when running as
root) on a free loopback port in a temporary directory. Without the binaries
the tests are skipped with the reason; with them, nothing is mocked.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from analyzer.alerts import signing
from analyzer.alerts.service import AlertService
from conftest import free_port
from tailscope.config import load
from test_alerts_evaluator import ScriptedIncidents, incident
from test_alerts_receiver import Receiver


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


class PgCluster:
    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql): cannot test the PostgreSQL control DB")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed (pip install 'psycopg[binary]'): cannot test the PostgreSQL control DB")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="tailscope-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            runuser = shutil.which("runuser")
            self.as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -F"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")
        self.admin_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_user and self.as_user[0] == "su":
            cmd = [*self.as_user, " ".join(f"'{c}'" for c in cmd)]
        elif self.as_user:
            cmd = [*self.as_user, *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(self.root))
        if proc.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()[-800:]} {log[-800:]}")

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def control_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/control.sqlite"
    return request.getfixturevalue("pg").new_database()


def make_service(tmp_path: Path, source: Any, control_db: str, **settings: Any) -> AlertService:
    settings.setdefault("db", str(tmp_path / "store.duckdb"))
    settings.setdefault("alert_hold_down_s", 0)
    return AlertService(load({"control_db": control_db, **settings}, environ={}), source, sender_options={"backoff_base_s": 0.3})


def wait_until(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_same_lifecycle_on_both_backends(tmp_path: Path, control_db: str) -> None:
    """open → updated → resolved, one retry, a restart mid-retry: identical on SQLite and PostgreSQL."""
    receiver = Receiver([500])
    services: list[AlertService] = []
    try:
        source = ScriptedIncidents()
        first = make_service(tmp_path, source, control_db)
        services.append(first)
        first.add_webhook(receiver.url + "/hook", "pg-secret")
        first.add_rule(service="chat-api", slo_ms=1000)
        source.items = [incident()]
        assert len(first.evaluate_now()["opened"]) == 1
        first.stop()  # down before anything was sent: the outbox row waits in the control DB
        second = make_service(tmp_path, source, control_db)
        services.append(second)
        second.start()
        receiver.wait_for(lambda rs: any(r.status == 200 for r in rs))
        source.items = [incident(causes=[("kv_eviction", 0.7)])]
        second.evaluate_now()
        assert second.evaluate_now()["updated"]
        source.items = [incident(open=False, causes=[("kv_eviction", 0.7)])]
        assert second.evaluate_now()["resolved"]
        receiver.wait_for(lambda rs: sum(r.status == 200 for r in rs) == 3)
        ok = receiver.ok()
        assert [r.json()["event"] for r in ok] == ["open", "updated", "resolved"]
        assert [r.json()["top_causes"][0]["cause"] for r in ok] == ["compile_miss", "kv_eviction", "kv_eviction"]
        for r in ok:
            assert signing.verify("pg-secret", r.header(signing.TIMESTAMP_HEADER), r.body, r.header(signing.SIGNATURE_HEADER))
        alerts = second.list_alerts()
        assert len(alerts) == 1 and alerts[0]["state"] == "resolved" and alerts[0]["seq"] == 3
        wait_until(lambda: all(d["status"] == "delivered" for d in second.list_deliveries()))
        d = second.list_deliveries()
        assert sorted(x["attempts"] for x in d) == [1, 1, 2]
        assert second.status()["control_db"].startswith(control_db.split(":")[0])
    finally:
        for s in services:
            s.stop()
        receiver.close()


def test_two_servers_sharing_postgres_send_each_alert_once(tmp_path: Path, pg: PgCluster) -> None:
    """Two evaluators and two senders on one control DB: one alert, one delivery per transition."""
    url = pg.new_database()
    receiver = Receiver()
    services: list[AlertService] = []
    try:
        source = ScriptedIncidents()
        a = make_service(tmp_path / "a", source, url, alert_interval_s=1)
        b = make_service(tmp_path / "b", source, url, alert_interval_s=1)
        services += [a, b]
        a.add_webhook(receiver.url + "/hook", "k")
        source.items = [incident(f"inc-{i}", service=f"svc-{i}") for i in range(5)]
        a.sender.poll_s = b.sender.poll_s = 0.02
        a.start()
        b.start()
        receiver.wait_for(lambda rs: len(rs) >= 5)
        time.sleep(2.5)  # both evaluators and senders keep running
        assert len(receiver.received) == 5
        assert sorted(r.json()["incident"]["id"] for r in receiver.received) == [f"inc-{i}" for i in range(5)]
        assert len(a.list_alerts()) == 5
    finally:
        for s in services:
            s.stop()
        receiver.close()


def test_server_with_a_postgres_control_db(make_server: Any, pg: PgCluster) -> None:
    url = pg.new_database()
    srv = make_server(control_db=url)
    r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json={"url": "http://127.0.0.1:1/x", "secret": "s", "format": "alertmanager"})
    assert r.status_code == 201, r.text
    assert httpx.get(srv.url + "/api/v1/alerts/webhooks").json()["webhooks"][0]["format"] == "alertmanager"
    assert httpx.get(srv.url + "/api/v1/alerts/status").json()["control_db"].startswith("postgresql+psycopg://postgres@127.0.0.1")
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as con:
        assert con.execute("SELECT format FROM alert_webhooks").fetchall() == [("alertmanager",)]


def test_unreachable_control_db_fails_at_startup_with_the_setting_named(tmp_path: Path) -> None:
    from tailscope.config import ConfigError

    url = f"postgresql://nobody:pw@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(ConfigError) as err:
        AlertService(load({"db": str(tmp_path / "x.duckdb"), "control_db": url}, environ={}), None)
    assert "control database" in str(err.value) and "pw" not in str(err.value).replace("postgresql", "")
    with pytest.raises(ConfigError, match="control-db"):
        AlertService(load({"db": str(tmp_path / "x.duckdb"), "control_db": "not a url"}, environ={}), None)
