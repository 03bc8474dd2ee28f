"""Interleaved A/B of the warm incident list: two checkouts of tailscope on one store. Prints JSON.

The shared machine's speed drifts by tens of percent within minutes, so a
change is judged against its base in one sitting, alternating: each round
starts a fresh process per side, which opens the store read-only, makes one
call to warm DuckDB's buffers, then times ``--calls`` calls with the result
cache off and nothing kept across calls (``Analyzer.incremental`` off).
Medians and minima over all timed calls per side.

    git worktree add /tmp/base 5eeb795
    .venv/bin/python benchmarks/analyze_ab.py --base /tmp/base --db /tmp/tailscope-bench/analyze-10000000.duckdb
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

_ONE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from collector.store import Store
from analyzer.service import Analyzer
store = Store(sys.argv[2], read_only=True)
a = Analyzer(store)
a.use_cache = False
if hasattr(a, "incremental"):  # versions that keep figures across calls: compute everything, as benchmarks/analyze.py's warm
    a.incremental = False
a.incidents()
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    a.incidents()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def _side(repo: Path, db: Path, calls: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", _ONE, str(repo), str(db), str(calls)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{repo}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a checkout of the version to compare against")
    parser.add_argument("--new", default=str(HERE), help="the version under test (default: this checkout)")
    parser.add_argument("--db", required=True, help="a store written by benchmarks/analyze.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process")
    args = parser.parse_args()
    for p in (args.base, args.new, args.db):
        if not Path(p).exists():
            parser.error(f"{p}: no such file or folder")
    sides: dict[str, list[float]] = {"base": [], "new": []}
    for k in range(args.rounds):
        for name, repo in (("base", args.base), ("new", args.new)):
            sides[name] += _side(Path(repo), Path(args.db), args.calls)
        print(f"round {k + 1}/{args.rounds}: base {statistics.median(sides['base']):.3f} s, "
              f"new {statistics.median(sides['new']):.3f} s (medians so far)", file=sys.stderr, flush=True)
    out = {"benchmark": "analyze_ab", "db": args.db, "base": args.base, "new": args.new}
    for name, times in sides.items():
        out[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "calls": len(times),
                     "runs_s": [round(t, 3) for t in times]}
    out["ratio"] = round(out["new"]["median_s"] / out["base"]["median_s"], 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
