"""``tailscope analyze``: the incident report for a stopped store.

Opens the DuckDB file read-only (so it works on a copy, or on the file of a
server that has stopped) and prints the incidents with their causes and
recommendations, as text or as the same JSON the API serves.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, help="the DuckDB file to analyse (opened read-only)")
    parser.add_argument("--since", default=None, help="start: RFC 3339 or unix seconds (default: 24 h before the newest span)")
    parser.add_argument("--until", default=None, help="end: RFC 3339 or unix seconds (default: the newest span)")
    parser.add_argument("--service", default=None, help="only this service")
    parser.add_argument("--slo-ms", dest="slo_ms", default="", help="per-service p99 SLOs, e.g. 'chat-api=800'")
    parser.add_argument("--step", type=int, default=60, help="window width in seconds (default 60)")
    parser.add_argument("--slow", type=int, default=0, help="also list this many slow requests")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from collector.store import Store, StoreError
    from tailscope.config import ConfigError, load
    from tailscope.errors import TailscopeError

    from analyzer.service import Analyzer

    try:
        config = load({"db": args.db, "slo_ms": args.slo_ms or None, "analysis_step_s": str(args.step)}, environ={})
        store = Store(args.db, read_only=True)
    except (StoreError, ConfigError) as exc:
        print(f"tailscope analyze: {exc}", file=sys.stderr)
        return 2
    try:
        analyzer = Analyzer(store, config)
        report: dict[str, Any] = analyzer.incidents(service=args.service, start=args.since, end=args.until)
        if args.slow:
            report["slow_requests"] = analyzer.slow_requests(service=args.service, start=args.since, end=args.until,
                                                             limit=args.slow)["requests"]
    except TailscopeError as exc:
        print(f"tailscope analyze: {exc.message}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    """Human-readable incident report."""
    lines = []
    incidents = report.get("incidents", [])
    if not incidents:
        lines.append("no incidents: p99 stayed within its normal range")
    for inc in incidents:
        lines.append(
            f"{inc['id']}  {inc['service']}  {inc['start']} → {inc['end']}{'  (open)' if inc.get('open') else ''}\n"
            f"  p99 {inc['p99_ms']:.0f} ms vs baseline {inc['baseline_p99_ms']:.0f} ms; "
            f"{inc['slow_requests']} slow of {inc['requests']} requests"
        )
        for c in inc.get("causes", []):
            lines.append(f"  {c['share'] * 100:5.1f}%  {c['cause']:<17} {c['excess_ms'] / 1000:.1f} s of excess over {c['requests']} requests")
            rec = (c.get("recommendation") or {}).get("summary")
            if rec:
                lines.append(f"         → {rec}")
        for row in inc.get("contrast", [])[:3]:
            lines.append(f"  over-represented: {row['dimension']}={row['value']} ({row['slow_share']:.0%} of slow vs "
                         f"{row['baseline_share']:.0%} of others, lift {row['lift']})")
    for r in report.get("slow_requests", []):
        top = r["causes"][0]["cause"] if r["causes"] else "-"
        lines.append(f"slow {r['trace_id']} {r['service']} {r['start']} {r['latency_ms']:.0f} ms (+{r['excess_ms']:.0f}) {top}")
    return "\n".join(lines)

