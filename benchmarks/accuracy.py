"""Attribution accuracy: the lab's scenarios through the real server and analyzer.

Runs every scenario (or ``--scenarios a,b``) of the lab into a fresh server on
loopback, then scores the analyzer's answers (``GET /api/v1/incidents`` and
``GET /api/v1/slow-requests``) against the lab's ground truth (labels kept in
files next to the run, never in the store). Prints one JSON object:

- per scenario and overall:
  - ``incident_recall``: injections whose window [start, effect_end] is
    overlapped by an incident whose top cause is the injected cause
    (``incident_recall_any_cause``: by any incident; ``incident_recall_listed``:
    by one listing the injected cause with a share of at least 10 %, which is
    what a mixture of two causes in one incident can be expected to get);
  - ``false_incidents``: incidents overlapping no injection window, and
    ``false_incidents_per_hour`` of the traffic outside injection windows;
  - slow requests are read in halves of the range when one page (5,000)
    is full (``reported_truncated`` says if that was still not enough);
  - ``top1_accuracy``: over labelled-slow requests the analyzer also reports
    slow, the share whose top cause is the labelled cause
    (``top1_accuracy_all``: over every labelled-slow request, a miss counting wrong);
  - ``coverage``: share of labelled-slow requests the analyzer reports slow;
  - ``unknown_share``: share of those reported with ``unknown`` as top cause;
  - ``precision``: share of the analyzer's slow requests that are labelled slow.
- ``false_incidents_per_hour_control``: incidents per hour of the control
  scenarios (those with nothing injected).

Usage: ``python benchmarks/accuracy.py [--scenarios control,compile_miss] [--keep DIR]``,
or ``--rescore DIR`` to score the analyzer again on what a ``--keep`` run left.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SLOW_LIMIT = 5000  # the API's largest page
MIN_LISTED_SHARE = 0.1  # incident_recall_listed: the injected cause among the causes with at least this share


def _t(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _overlap(a0: float, a1: float, b0: float, b1: float) -> bool:
    return a0 < b1 and b0 < a1


def score(truth: dict[str, Any], incidents: list[dict[str, Any]], slow: list[dict[str, Any]], truncated: bool) -> dict[str, Any]:
    """Score one scenario's analyzer answers against its ground truth."""
    start, end = _t(truth["start"]), _t(truth["end"])
    windows = [(_t(i["start"]), max(_t(i["end"]), _t(i["effect_end"])), i) for i in truth["injections"]]
    inc_spans = [(_t(x["start"]), _t(x["end"]), x) for x in incidents]
    recalled = any_recalled = listed = 0
    per_injection = []
    for w0, w1, inj in windows:
        over = [x for a, b, x in inc_spans if _overlap(a, b, w0, w1)]
        hit = any((x.get("causes") or [{}])[0].get("cause") == inj["cause"] for x in over)
        recalled += hit
        any_recalled += bool(over)
        listed += any(c.get("cause") == inj["cause"] and c.get("share", 0) >= MIN_LISTED_SHARE for x in over for c in x.get("causes") or [])
        per_injection.append({"cause": inj["cause"], "instance": inj["instance"], "detected": bool(over), "top_cause_right": hit,
                              "found_top_causes": [(x.get("causes") or [{}])[0].get("cause") for x in over]})
    false = [x for a, b, x in inc_spans if not any(_overlap(a, b, w0, w1) for w0, w1, _ in windows)]
    injected_s = 0.0  # the union of the injection windows (mixtures overlap)
    reach = start
    for w0, w1, _ in sorted(windows, key=lambda w: w[0]):
        a, b = max(w0, reach, start), min(w1, end)
        if b > a:
            injected_s += b - a
        reach = max(reach, w1)
    clean_hours = max(end - start - injected_s, 0.0) / 3600

    labelled = {r["trace_id"]: r for r in truth["requests"] if r["slow"]}
    reported = {r["trace_id"]: r for r in slow}
    both = [t for t in labelled if t in reported]
    right = sum(1 for t in both if (reported[t].get("causes") or [{}])[0].get("cause") == labelled[t]["cause"])
    unknown = sum(1 for t in both if (reported[t].get("causes") or [{}])[0].get("cause") in (None, "unknown"))
    by_cause: dict[str, dict[str, int]] = {}
    for t, r in labelled.items():
        c = by_cause.setdefault(r["cause"], {"labelled": 0, "reported": 0, "right": 0})
        c["labelled"] += 1
        if t in reported:
            c["reported"] += 1
            c["right"] += (reported[t].get("causes") or [{}])[0].get("cause") == r["cause"]
    return {
        "requests": len(truth["requests"]),
        "labelled_slow": len(labelled),
        "reported_slow": len(reported),
        "reported_truncated": truncated,
        "injections": len(windows),
        "incidents": len(incidents),
        "incident_recall": recalled / len(windows) if windows else None,
        "incident_recall_any_cause": any_recalled / len(windows) if windows else None,
        "incident_recall_listed": listed / len(windows) if windows else None,
        "false_incidents": len(false),
        "false_incidents_per_hour": len(false) / clean_hours if clean_hours > 0 else None,
        "clean_hours": round(clean_hours, 3),
        "top1_accuracy": right / len(both) if both else None,
        "top1_accuracy_all": right / len(labelled) if labelled else None,
        "coverage": len(both) / len(labelled) if labelled else None,
        "unknown_share": unknown / len(both) if both else None,
        "precision": sum(1 for t in reported if t in labelled) / len(reported) if reported else None,
        "by_cause": by_cause,
        "per_injection": per_injection,
        "_counts": {"recalled": recalled, "any": any_recalled, "listed": listed, "both": len(both), "right": right, "unknown": unknown,
                    "reported_true": sum(1 for t in reported if t in labelled), "false": len(false)},
    }


def overall(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Micro-averages over every scenario."""
    tot = lambda k: sum(s[k] for s in scores.values())  # noqa: E731
    cnt = lambda k: sum(s["_counts"][k] for s in scores.values())  # noqa: E731
    inj, lab, rep = tot("injections"), tot("labelled_slow"), tot("reported_slow")
    clean = sum(s["clean_hours"] for s in scores.values())
    controls = [s for s in scores.values() if s["injections"] == 0]
    control_hours = sum(s["clean_hours"] for s in controls)
    return {
        "scenarios": len(scores),
        "injections": inj,
        "incident_recall": cnt("recalled") / inj if inj else None,
        "incident_recall_any_cause": cnt("any") / inj if inj else None,
        "incident_recall_listed": cnt("listed") / inj if inj else None,
        "false_incidents": cnt("false"),
        "false_incidents_per_hour": cnt("false") / clean if clean else None,
        "false_incidents_per_hour_control": sum(s["incidents"] for s in controls) / control_hours if control_hours else None,
        "labelled_slow": lab,
        "top1_accuracy": cnt("right") / cnt("both") if cnt("both") else None,
        "top1_accuracy_all": cnt("right") / lab if lab else None,
        "coverage": cnt("both") / lab if lab else None,
        "unknown_share": cnt("unknown") / cnt("both") if cnt("both") else None,
        "precision": cnt("reported_true") / rep if rep else None,
    }


def slow_requests(client: Any, base: str, service: str, start: float, end: float, depth: int = 0) -> tuple[list[dict[str, Any]], bool]:
    """Every slow request in [start, end): a range that fills the API's page is
    asked again in halves (at most 5 levels); returns (requests, still truncated)."""
    r = client.get(base + "/api/v1/slow-requests", params={"service": service, "start": start, "end": end, "limit": SLOW_LIMIT})
    if r.status_code != 200:
        raise RuntimeError(f"slow-requests answered {r.status_code}: {r.text[:300]}")
    got = r.json()["requests"]
    if len(got) < SLOW_LIMIT:
        return got, False
    if depth >= 5:
        return got, True
    mid = (start + end) / 2
    a, ta = slow_requests(client, base, service, start, mid, depth + 1)
    b, tb = slow_requests(client, base, service, mid, end, depth + 1)
    seen: dict[str, dict[str, Any]] = {}
    for x in a + b:
        seen.setdefault(x["trace_id"], x)
    return list(seen.values()), ta or tb


def rescore(folder: Path, names: list[str], say: Any) -> dict[str, Any]:
    """Score the analyzer again on a store and truth files a ``--keep`` run left (no lab run).

    The lab's costs are measured CPU time, so two runs never serve the same
    requests; re-scoring the same kept data is how an analyzer change is
    compared. Reads the store read-only through :class:`Analyzer` (the
    API's own code path) with the same queries as the HTTP scoring above.
    """
    from analyzer.service import Analyzer
    from collector.store import Store
    from tailscope.config import load

    store = Store(folder / "accuracy.duckdb", read_only=True)
    analyzer = Analyzer(store, load({}, environ={}))

    class Direct:  # the two endpoints the scoring calls, answered in-process
        def get(self, url: str, params: dict[str, Any]) -> Any:
            kind = url.rsplit("/", 1)[-1]
            if kind == "incidents":
                body = analyzer.incidents(params["service"], params["start"], params["end"])
            else:
                body = analyzer.slow_requests(params["service"], params["start"], params["end"], limit=params["limit"])
            return type("R", (), {"status_code": 200, "json": staticmethod(lambda: body), "text": ""})()

    client = Direct()
    scores: dict[str, dict[str, Any]] = {}
    t1 = time.monotonic()
    try:
        for name in names:
            path = folder / "truth" / f"{name}.truth.json"
            if not path.exists():
                continue
            truth = json.loads(path.read_text())
            start, end = _t(truth["start"]), _t(truth["end"])
            q_end = max([_t(i["effect_end"]) for i in truth["injections"]] + [end]) + 60
            inc = client.get("/api/v1/incidents", {"service": truth["service"], "start": start, "end": q_end}).json()
            slow, truncated = slow_requests(client, "", truth["service"], start, q_end)
            scores[name] = score(truth, inc["incidents"], slow, truncated=truncated)
            say(f"rescored {name}")
    finally:
        store.close()
    return {"benchmark": "accuracy", "rescored": str(folder), "overall": overall(scores),
            "scenarios": {k: {kk: vv for kk, vv in v.items() if kk != "_counts"} for k, v in scores.items()},
            "wall_s": {"analyzer_queries": round(time.monotonic() - t1, 1)}}


def main(argv: list[str] | None = None) -> int:
    from lab.runner import LabConfig, run_scenarios
    from lab.scenarios import CATALOG

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join(CATALOG), help="comma-separated (default: all)")
    ap.add_argument("--keep", default=None, help="keep the store and truth files in this folder (default: a temp dir)")
    ap.add_argument("--scale", type=float, default=LabConfig.scale, help="virtual seconds per CPU second of the reference machine")
    ap.add_argument("--own-speed", action="store_true",
                    help="time the scenarios by this machine's speed as measured (no normalization to the reference machine)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--rescore", default=None, help="score again the store and truth a --keep run left in this folder (no lab run)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(CATALOG)}", file=sys.stderr)
        return 2

    if args.rescore:
        say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(rescore(Path(args.rescore), names, say), indent=1, default=str))
        return 0

    import httpx

    from tailscope.config import load
    from tailscope.server import build_server

    tmp = None
    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tailscope-accuracy-")
        folder = Path(tmp.name)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    server = build_server(load({"db": str(folder / "accuracy.duckdb"), "port": 0, "grpc_port": 0, "dashboard": False}, environ={}))
    port = server.serve_in_thread()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        results = run_scenarios(names, base, folder / "truth", LabConfig(scale=args.scale, reference_work_ms=None if args.own_speed else LabConfig.reference_work_ms), progress=say)
        lab_wall = time.monotonic() - t0
        scores: dict[str, dict[str, Any]] = {}
        t1 = time.monotonic()
        with httpx.Client(timeout=300) as client:
            for r in results:
                truth = json.loads(Path(r.truth_path).read_text())
                q_end = max([_t(i["effect_end"]) for i in truth["injections"]] + [r.end]) + 60
                params = {"service": r.service, "start": r.start, "end": q_end}
                inc = client.get(base + "/api/v1/incidents", params=params)
                if inc.status_code != 200:
                    raise RuntimeError(f"{r.name}: the analyzer answered {inc.status_code}: {inc.text[:300]}")
                slow, truncated = slow_requests(client, base, r.service, r.start, q_end)
                scores[r.name] = score(truth, inc.json()["incidents"], slow, truncated=truncated)
                say(f"scored {r.name}")
        analyzer_wall = time.monotonic() - t1
        out = {
            "benchmark": "accuracy",
            "overall": overall(scores),
            "scenarios": {k: {kk: vv for kk, vv in v.items() if kk != "_counts"} for k, v in scores.items()},
            "lab": {r.name: {"requests": r.requests, "labelled_slow": r.labelled_slow, "compiles": r.compiles, "wall_s": r.wall_s, **r.stats} for r in results},
            "wall_s": {"lab": round(lab_wall, 1), "analyzer_queries": round(analyzer_wall, 1)},
        }
        print(json.dumps(out, indent=1, default=str))
        return 0
    finally:
        server.shutdown_thread()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
