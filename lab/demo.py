"""``tailscope demo``: the whole product on one machine in one command.

Starts the server on an embedded DuckDB file, serves a mix of lab scenarios
through it (each with a known injected cause), then prints what the analyzer
found next to what was injected, and where the dashboard is. ``--headless``
prints and exits; otherwise the server keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

DEFAULT_MIX = ("control", "compile_miss", "kv_eviction", "queue_saturation", "gpu_throttle", "cold_start", "provider_load", "mix_compile_throttle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lab.scenarios import CATALOG

    parser.add_argument("--headless", action="store_true", help="print the incidents as text and exit (no dashboard)")
    parser.add_argument("--db", default=None, help="DuckDB file (default: a new file under ./tailscope-demo/)")
    parser.add_argument("--port", type=int, default=4318, help="HTTP port for OTLP, API and dashboard (0: any free port)")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-time budget for serving scenarios (default 4)")
    parser.add_argument(
        "--scenario", action="append", default=None, metavar="NAME",
        help=f"scenario to run (repeatable or comma-separated; default: {','.join(DEFAULT_MIX)}; known: {', '.join(CATALOG)}, or 'all')",
    )
    parser.add_argument("--data-dir", default=None, help="folder of the public traces (default: shared/data beside the repo)")


def _scenarios(values: list[str] | None) -> list[str]:
    from lab.scenarios import CATALOG

    if not values:
        return list(DEFAULT_MIX)
    names: list[str] = []
    for v in values:
        for n in (x.strip() for x in v.split(",")):
            if not n:
                continue
            if n == "all":
                names.extend(CATALOG)
            elif n not in CATALOG:
                raise ValueError(f"unknown scenario {n!r}; known: {', '.join(CATALOG)}, all")
            else:
                names.append(n)
    return list(dict.fromkeys(names))


_SERVED = re.compile(r"(\d+)/(\d+) requests served")


class _Progress:
    """One status line on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = 0.0

    def __call__(self, msg: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + msg[:150])
            self.out.flush()
            if msg.endswith(("labelled slow", "compiles")) or "done in" in msg or "skipping" in msg:
                self.out.write("\n")
            return
        now = time.monotonic()
        done = _SERVED.search(msg)
        final = done is not None and done.group(1) == done.group(2)
        if done and not final and now - self.last < 5.0:
            return  # throttle the running count; a replica's last count is always shown
        self.last = now
        print(msg, file=self.out, flush=True)


def _short(ts: str) -> str:
    return ts.replace("T", " ")[:19]


def _rfc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(base_url: str, results: list[Any], out: TextIO, dashboard: bool = False) -> list[dict[str, Any]]:
    """Print, per scenario, what was injected and what the analyzer found
    (with dashboard links to the scenario's time range and each incident)."""
    from urllib.parse import urlencode

    import httpx

    found_all = []
    with httpx.Client(timeout=120) as client:
        for r in results:
            resp = client.get(base_url + "/api/v1/incidents", params={"service": r.service, "start": r.start, "end": r.end})
            if resp.status_code != 200:
                print(f"\n{r.name}: the analyzer answered HTTP {resp.status_code}: {resp.text[:200]}", file=out)
                continue
            incidents = resp.json().get("incidents", [])
            found_all.append({"scenario": r.name, "incidents": incidents})
            print(f"\n== {r.name} ({r.service}, {_short(datetime.fromtimestamp(r.start, timezone.utc).isoformat())} UTC, {r.requests} requests)", file=out)
            if r.injections:
                for inj in r.injections:
                    where = inj["instance"] or "all replicas"
                    print(f"   injected: {inj['cause']} on {where}, {_short(inj['start'])} to {_short(inj['end'])} ({inj['labelled_slow']} requests labelled slow by it)", file=out)
            else:
                print("   injected: nothing (control traffic)", file=out)
            if dashboard:
                q = urlencode({"start": _rfc(r.start), "end": _rfc(r.end + 300), "service": r.service})
                print(f"   view:     {base_url}/dashboard/?{q}", file=out)
            if not incidents:
                print("   found:    no incident", file=out)
            for inc in incidents:
                causes = ", ".join(f"{c.get('cause')} {c.get('share') or 0:.0%}" for c in (inc.get("causes") or [])[:3])
                print(f"   found:    incident {_short(inc['start'])} to {_short(inc['end'])}: p99 {inc.get('p99_ms') or 0:.0f} ms "
                      f"(usual {inc.get('baseline_p99_ms') or 0:.0f} ms), {inc.get('slow_requests', 0)} slow; causes: {causes or 'none'}", file=out)
                top = (inc.get("causes") or [None])[0]
                if top and top.get("recommendation"):
                    rec = top["recommendation"]
                    text = rec if isinstance(rec, str) else rec.get("text") or rec.get("summary") or str(rec)
                    wrapped = textwrap.wrap(text, width=100) or [""]
                    print(f"             fix: {wrapped[0]}", file=out)
                    for line in wrapped[1:]:
                        print(f"                  {line}", file=out)
                if dashboard and inc.get("id"):
                    print(f"             {base_url}/dashboard/incident/{inc['id']}", file=out)
    return found_all


def run(args: argparse.Namespace) -> int:
    from tailscope.config import ConfigError, load
    from tailscope.server import build_server

    from lab.runner import run_scenarios

    out = sys.stdout
    try:
        names = _scenarios(args.scenario)
    except ValueError as exc:
        print(f"tailscope demo: {exc}", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print(f"tailscope demo: --minutes must be > 0, got {args.minutes}", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    db = Path(args.db) if args.db else Path("tailscope-demo") / f"demo-{stamp}.duckdb"
    db.parent.mkdir(parents=True, exist_ok=True)
    truth_dir = db.parent / f"{db.stem}.truth"
    data_dir = Path(args.data_dir) if args.data_dir else None
    try:
        config = load({"db": str(db), "port": args.port, "grpc_port": 0, "dashboard": not args.headless, "host": "127.0.0.1"})
    except ConfigError as exc:
        print(f"tailscope demo: {exc}", file=sys.stderr)
        return 2
    server = build_server(config)
    try:
        port = server.serve_in_thread()
    except OSError as exc:
        server.close()
        print(f"tailscope demo: cannot listen on 127.0.0.1:{args.port} ({exc.strerror or exc}); pass --port 0 for any free port", file=sys.stderr)
        return 1
    base = f"http://127.0.0.1:{port}"
    token = config.tokens[0] if config.tokens else None
    try:
        print(f"tailscope demo: server on {base} (store: {db}, ground truth: {truth_dir}/)", file=out)
        if not args.headless:
            print(f"dashboard: {base}/dashboard/ (fills in as scenarios finish)", file=out)
        print(f"serving {len(names)} scenario(s) on a virtual clock, about {args.minutes:g} minutes of wall time at most", file=out, flush=True)
        try:
            results = run_scenarios(names, base, truth_dir, token=token, progress=_Progress(out), budget_s=args.minutes * 60, data_dir=data_dir)
        except FileNotFoundError as exc:
            print(f"tailscope demo: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ntailscope demo: interrupted; stopping the server", file=sys.stderr)
            return 130
        print("\nwhat the analyzer found (GET /api/v1/incidents), next to what the lab injected:", file=out)
        report(base, results, out, dashboard=not args.headless)
        if args.headless:
            return 0
        print(f"\ndashboard: {base}/dashboard/   API: {base}/api/v1/incidents   SQL: tailscope sql --db {db} (after stopping)", file=out)
        print("serving until Ctrl-C", file=out, flush=True)
        stop = threading.Event()
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            print("\nstopping", file=out)
        return 0
    finally:
        server.shutdown_thread()
