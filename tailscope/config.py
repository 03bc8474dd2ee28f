"""Every server setting, declared once.

The table below drives the CLI flags (``--db``), the environment variables
(``TAILSCOPE_DB``) and docs/configuration.md, so the three cannot drift apart.
Precedence: CLI flag, then environment variable, then default. Bad values fail
at startup with a message that names the setting (a server that silently falls
back to a default is harder to debug than one that refuses to start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str

    @property
    def env(self) -> str:
        return "TAILSCOPE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _decoder(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "python", "compiled"):
        raise ValueError("expected auto, python or compiled")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value}")
    return value


SETTINGS: tuple[Setting, ...] = (
    # --- server and store -------------------------------------------------
    Setting("db", "tailscope.duckdb", "DuckDB file the server owns (created if missing)."),
    Setting("host", "127.0.0.1", "Address the HTTP server (OTLP/HTTP, API, dashboard) listens on."),
    Setting("port", 4318, "OTLP/HTTP, API and dashboard port (4318 is the standard OTLP/HTTP port).", _port),
    Setting("grpc_port", 4317, "OTLP/gRPC port; 0 turns the gRPC receiver off.", _port),
    Setting("tokens", (), "Comma-separated bearer tokens accepted on ingest; empty means ingest is open.", _tokens),
    Setting("max_body_bytes", 16 * 1024 * 1024, "Largest request body accepted, after decompression (413 beyond).", _positive_int),
    Setting("queue_max_spans", 200_000, "Items (spans, points, records) waiting to be written before ingest answers 429.", _positive_int),
    Setting("flush_interval_ms", 20, "Longest time the writer waits to gather a group commit.", _positive_int),
    Setting("retry_after_s", 1, "Retry-After seconds sent with 429/503.", _positive_int),
    Setting("retention_hours", 0, "Delete telemetry older than this many hours; 0 keeps everything.", _non_negative_int),
    Setting("max_attribute_bytes", 64 * 1024, "Longer string attribute values are truncated (and counted) on ingest.", _positive_int),
    Setting("checkpoint_threshold_mb", 64, "DuckDB folds its write-ahead log into the file once the log is this many MiB (larger: less ingest CPU, longer restart replay).", _positive_int),
    Setting("decoder", "auto", "OTLP protobuf traces decoder: auto (the compiled one when it is built, else Python), python (force the pure-Python decoder, for debugging), compiled (refuse to start without the compiled one). /healthz says which runs.", _decoder),
    Setting("decode_workers", 0, "Processes that decode OTLP/HTTP bodies in parallel; 0 decodes on the server's own threads.", _non_negative_int),
    Setting("max_profiler_bytes", 256 * 1024 * 1024, "Largest profiler trace accepted, compressed or not (413 beyond).", _positive_int),
    Setting("profiler_dir", "", "Where uploaded profiler traces are kept; default: <db>.profiler/ next to the DuckDB file."),
    # --- SQL console ------------------------------------------------------
    Setting("sql_time_limit_ms", 5000, "Ad-hoc SQL is interrupted after this long (400 names the limit).", _positive_int),
    Setting("sql_max_rows", 10_000, "Ad-hoc SQL returns at most this many rows, with truncated=true beyond.", _positive_int),
    # --- analyzer ---------------------------------------------------------
    Setting("slo_ms", "", "Per-service p99 SLOs, e.g. 'chat-api=800,embed=120' (empty: spike detection only)."),
    Setting("analysis_step_s", 60, "Width of the windows p99 is computed and compared over.", _positive_int),
    # --- alerts -----------------------------------------------------------
    Setting("control_db", "", "SQLAlchemy URL for alert rules, webhooks and deliveries; default sqlite next to the DuckDB file."),
    Setting("alert_interval_s", 10, "How often the alert evaluator looks at the freshest data.", _positive_int),
    Setting("alert_hold_down_s", 120, "Seconds an incident must stay recovered before its alert resolves (no flapping).", _non_negative_int),
    Setting("webhook_allow_hosts", (), "Comma-separated hosts webhooks may be sent to; empty allows any.", _tokens),
    Setting("public_url", "", "Base URL of the dashboard used in alert links; default http://HOST:PORT."),
    # --- dashboard --------------------------------------------------------
    Setting("dashboard", True, "Mount the Dash dashboard at /dashboard/.", _bool),
    # --- logging ----------------------------------------------------------
    Setting("log_level", "info", "Server log level (debug, info, warning, error)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Resolved settings; build with :func:`load`."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> "Config":
        unknown = set(changes) - set(_BY_NAME)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        merged = dict(self.values)
        merged.update(changes)
        return Config(merged)


def _coerce(setting: Setting, raw: Any, source: str) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid value for {source}: {raw!r} ({exc})") from None


def load(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Resolve settings: ``overrides`` (CLI flags, tests) beat ``TAILSCOPE_*`` beat defaults.

    Unknown ``TAILSCOPE_*`` variables are refused: a typo in a deployment
    manifest should stop the server, not be ignored.
    """
    env = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    known_env = {s.env for s in SETTINGS}
    stray = sorted(k for k in env if k.startswith("TAILSCOPE_") and k not in known_env and k not in _NON_SETTING_ENV)
    if stray:
        raise ConfigError(f"unknown environment variable(s): {', '.join(stray)}")
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.name in overrides:
            values[s.name] = _coerce(s, overrides[s.name], s.flag)
        elif s.env in env:
            values[s.name] = _coerce(s, env[s.env], s.env)
        else:
            values[s.name] = s.default
    return Config(values)


# Variables read by other parts (the agent, tests) that are not server settings.
_NON_SETTING_ENV = frozenset({"TAILSCOPE_SERVER", "TAILSCOPE_TOKEN", "TAILSCOPE_AGENT_SPOOL"})


def parse_slo(text: str) -> dict[str, float]:
    """``'chat-api=800,embed=120'`` → ``{'chat-api': 800.0, 'embed': 120.0}`` (ms)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        service, sep, ms = part.rpartition("=")
        if not sep or not service:
            raise ConfigError(f"invalid --slo-ms entry {part!r}: expected SERVICE=MILLISECONDS")
        try:
            out[service] = float(ms)
        except ValueError:
            raise ConfigError(f"invalid --slo-ms entry {part!r}: {ms!r} is not a number") from None
    return out


def markdown_table() -> str:
    """docs/configuration.md, whole (regenerate with ``tailscope config > docs/configuration.md``)."""
    rows = [
        "# Configuration",
        "",
        "Every server setting is a CLI flag of `tailscope serve` and an environment variable with",
        "the same name (`--queue-max-spans` <-> `TAILSCOPE_QUEUE_MAX_SPANS`). A flag beats the",
        "variable, the variable beats the default. An unknown `TAILSCOPE_*` variable or a bad",
        "value stops the server at startup with a message naming it. Generated by `tailscope config`.",
        "",
        "| flag | environment variable | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        rows.append(f"| `{s.flag}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)


__all__ = ["Config", "ConfigError", "SETTINGS", "Setting", "load", "parse_slo", "markdown_table", "fields"]
