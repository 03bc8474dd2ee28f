"""``tailscope`` — one command, one subcommand per job.

Each subcommand imports its part lazily, so ``tailscope agent`` runs on a GPU
node that installed only the agent (no DuckDB, Dash or torch there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
from typing import Any, Callable, Sequence

from tailscope.config import SETTINGS, ConfigError, load, markdown_table

# Subcommands that live in their own package: name -> (module, help).
_DELEGATED: dict[str, tuple[str, str]] = {
    "agent": ("agents.cli", "run the node agent (NVML, profiler traces, engine metrics) and ship to a server"),
    "analyze": ("analyzer.cli", "find incidents and explain slow requests in a stopped server's store"),
    "demo": ("lab.demo", "start a server, run the lab's scenarios through it and show what it found"),
    "alerts": ("analyzer.alerts.cli", "add, list, test-send and silence alert webhooks and rules"),
}


def parse_time(text: str) -> dt.datetime:
    """RFC 3339 / ISO 8601 (naive means UTC) or unix seconds → naive UTC datetime."""
    try:
        return dt.datetime.fromtimestamp(float(text), tz=dt.timezone.utc).replace(tzinfo=None)
    except ValueError:
        pass
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use RFC 3339 like 2026-11-23T14:00:00Z or unix seconds)") from None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        parser.add_argument(
            s.flag,
            dest=s.name,
            default=None,
            metavar=s.name.upper(),
            help=f"{s.help} [env {s.env}; default {default!s}]",
        )


def _cmd_serve(args: argparse.Namespace) -> int:
    from tailscope.logs import setup_logging
    from tailscope.server import build_server

    overrides = {s.name: getattr(args, s.name) for s in SETTINGS}
    config = load(overrides)
    setup_logging(config.log_level)
    server = build_server(config)
    grpc = server.parts.get("grpc")
    print(
        f"tailscope: store {config.db}\n"
        f"  OTLP/HTTP, API and dashboard on http://{config.host}:{config.port}"
        f" (dashboard: /dashboard/, SQL: POST /api/v1/sql, health: /healthz)\n"
        f"  OTLP/gRPC on {config.host}:{config.grpc_port if grpc else 'off'}\n"
        f"  ingest auth: {'bearer token required' if config.tokens else 'OFF (set TAILSCOPE_TOKENS to require a token)'}",
        flush=True,
    )
    server.serve()
    return 0


def _open_read_only(path: str) -> Any:
    from collector.sql import lock_down
    from collector.store import Store

    store = Store(path, read_only=True)
    lock_down(store.cursor())
    return store


def _cmd_sql(args: argparse.Namespace) -> int:
    from collector.sql import run_query

    config = load({"db": args.db} if args.db else {})
    sql = args.query if args.query != "-" else sys.stdin.read()
    store = _open_read_only(config.db)
    try:
        result = run_query(
            store, sql, time_limit_ms=args.time_limit_ms or config.sql_time_limit_ms, max_rows=args.max_rows or config.sql_max_rows
        )
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result["columns"])
        writer.writerows(result["rows"])
    else:
        _print_table(result["columns"], result["rows"])
    if result["truncated"]:
        print(f"(truncated at {len(result['rows'])} rows; raise --max-rows)", file=sys.stderr)
    return 0


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[("" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for v in row] for row in rows]
    widths = [min(60, max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v[:w].ljust(w) for v, w in zip(row, widths)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def _cmd_export(args: argparse.Namespace) -> int:
    from collector.export import EXPORT_TABLES, export_parquet

    config = load({"db": args.db} if args.db else {})
    tables = tuple(args.tables.split(",")) if args.tables else EXPORT_TABLES
    store = _open_read_only(config.db)
    try:
        counts = export_parquet(
            store,
            args.out,
            start=args.since,
            end=args.until,
            tables=tables,
            progress=lambda t, n: print(f"  {t}: {n} rows", file=sys.stderr, flush=True),
        )
    finally:
        store.close()
    print(json.dumps({"out": args.out, "rows": counts}))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(markdown_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailscope",
        description="Tail-latency diagnosis for ML inference: why is p99 bad right now, and what fixes it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server: OTLP collector, DuckDB store, analyzer API, dashboard")
    _add_setting_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    sql = sub.add_parser("sql", help="read-only SQL on a stopped server's DuckDB file")
    sql.add_argument("query", help="one SELECT statement ('-' reads it from stdin)")
    sql.add_argument("--db", help="DuckDB file [env TAILSCOPE_DB; default tailscope.duckdb]")
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sql.add_argument("--max-rows", type=int, default=None)
    sql.add_argument("--time-limit-ms", type=int, default=None)
    sql.set_defaults(func=_cmd_sql)

    export = sub.add_parser("export", help="export a time range of a stopped server's store to Parquet")
    export.add_argument("--db", help="DuckDB file [env TAILSCOPE_DB; default tailscope.duckdb]")
    export.add_argument("--out", required=True, help="directory for <table>.parquet files")
    export.add_argument("--since", type=parse_time, default=None, help="RFC 3339 or unix seconds (inclusive)")
    export.add_argument("--until", type=parse_time, default=None, help="RFC 3339 or unix seconds (exclusive)")
    export.add_argument("--tables", default=None, help="comma-separated subset of tables")
    export.set_defaults(func=_cmd_export)

    config = sub.add_parser("config", help="print the configuration reference (flags, variables, defaults)")
    config.set_defaults(func=_cmd_config)

    for name, (module, help_text) in _DELEGATED.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=None, delegate=module)
    return parser


def _delegate(module_name: str, name: str, argv: Sequence[str]) -> int:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"tailscope {name}: this install lacks what it needs ({exc.name or exc}); "
            f"install the server extra: pip install 'tailscope[server]'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"tailscope {name}", description=_DELEGATED[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    run: Callable[[argparse.Namespace], int] = module.run
    return int(run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        try:
            return _delegate(_DELEGATED[argv[0]][0], argv[0], argv[1:])
        except KeyboardInterrupt:
            return 130
        except ConfigError as exc:
            print(f"tailscope {argv[0]}: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from tailscope.errors import TailscopeError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, TailscopeError) as exc:
        print(f"tailscope {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # store errors and the like: one line, no traceback
        from collector.store import StoreError

        if isinstance(exc, StoreError):
            print(f"tailscope {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
