"""``tailscope alerts …``: the alerts API from a shell, against a running server.

Examples::

    tailscope alerts webhooks add https://hooks.example.com/tailscope --secret-env HOOK_SECRET
    tailscope alerts webhooks test 1
    tailscope alerts rules add --service chat-api --slo-ms 800 --cause compile_miss
    tailscope alerts silence --service chat-api --for 2h --comment "deploy"
    tailscope alerts list --state active
    tailscope alerts ack 3 --by alice

The server is ``--server`` (default ``$TAILSCOPE_SERVER``, else
``http://127.0.0.1:4318``). Output is JSON; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:4318"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` → seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 2h, 1d)")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help=f"server base URL [env TAILSCOPE_SERVER; default {DEFAULT_SERVER}]")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token, needed for changes when the server has tokens configured [env TAILSCOPE_TOKEN]",
    )
    sub = parser.add_subparsers(dest="alerts_command", metavar="COMMAND", required=True)

    wh = sub.add_parser("webhooks", help="add, list, delete and test-send webhooks").add_subparsers(dest="action", metavar="ACTION", required=True)
    add = wh.add_parser("add", help="add a webhook")
    add.add_argument("url")
    add.add_argument("--secret", default=None, help="HMAC key (visible in the process list; prefer --secret-env)")
    add.add_argument("--secret-env", default=None, metavar="VAR", help="read the HMAC key from this environment variable")
    add.add_argument("--format", default="generic", choices=("generic", "slack", "alertmanager"))
    add.add_argument("--name", default="")
    upd = wh.add_parser("update", help="rotate a secret, enable/disable, change url or format")
    upd.add_argument("id", type=int)
    upd.add_argument("--url", default=None)
    upd.add_argument("--secret", default=None)
    upd.add_argument("--secret-env", default=None, metavar="VAR")
    upd.add_argument("--format", default=None, choices=("generic", "slack", "alertmanager"))
    upd.add_argument("--name", default=None)
    onoff = upd.add_mutually_exclusive_group()
    onoff.add_argument("--enable", dest="enabled", action="store_const", const=True, default=None)
    onoff.add_argument("--disable", dest="enabled", action="store_const", const=False)
    wh.add_parser("list", help="list webhooks (secrets are never shown)")
    for action, help_text in (("delete", "delete a webhook and cancel its pending deliveries"), ("test", "send a sample alert now")):
        p = wh.add_parser(action, help=help_text)
        p.add_argument("id", type=int)

    rules = sub.add_parser("rules", help="add, list and delete alert rules").add_subparsers(dest="action", metavar="ACTION", required=True)
    radd = rules.add_parser("add", help="add a rule (with no rule, every incident goes to every webhook)")
    radd.add_argument("--name", default="")
    radd.add_argument("--service", default=None)
    radd.add_argument("--slo-ms", type=float, default=None, help="fire only when the incident's p99 is at least this")
    radd.add_argument("--spike-factor", type=float, default=None, help="fire only when p99 >= factor x baseline p99")
    radd.add_argument("--window", type=parse_duration, default=None, help="fire only once the incident has lasted this long (e.g. 2m)")
    radd.add_argument("--min-requests", type=int, default=0)
    radd.add_argument("--cause", action="append", default=[], help="fire only when the top cause is this (repeatable)")
    radd.add_argument("--webhook", type=int, action="append", default=[], help="send to this webhook id only (repeatable; default all)")
    rules.add_parser("list", help="list rules")
    rdel = rules.add_parser("delete", help="delete a rule")
    rdel.add_argument("id", type=int)

    sil = sub.add_parser("silence", help="mute notifications for a service and/or cause")
    sil.add_argument("--service", default=None)
    sil.add_argument("--cause", default=None)
    sil.add_argument("--for", dest="duration", type=parse_duration, required=True, help="how long, e.g. 30m, 2h")
    sil.add_argument("--comment", default="")
    sil.add_argument("--by", default="")
    sils = sub.add_parser("silences", help="list silences")
    sils.add_argument("--all", action="store_true", help="include expired ones")
    unsil = sub.add_parser("unsilence", help="end a silence now")
    unsil.add_argument("id", type=int)

    lst = sub.add_parser("list", help="list alerts")
    lst.add_argument("--state", default=None, choices=("active", "open", "updated", "resolved"))
    lst.add_argument("--service", default=None)
    lst.add_argument("--limit", type=int, default=100)
    show = sub.add_parser("show", help="one alert with its deliveries")
    show.add_argument("id", type=int)
    ack = sub.add_parser("ack", help="acknowledge an alert (cause updates stop paging)")
    ack.add_argument("id", type=int)
    ack.add_argument("--by", default="")
    ack.add_argument("--comment", default="")
    dl = sub.add_parser("deliveries", help="the delivery log")
    dl.add_argument("--alert", type=int, default=None)
    dl.add_argument("--status", default=None, choices=("pending", "delivered", "failed", "cancelled"))
    dl.add_argument("--limit", type=int, default=100)
    sub.add_parser("status", help="evaluator and outbox status")
    sub.add_parser("evaluate", help="run one evaluation now")


class CliError(Exception):
    pass


def _request(args: argparse.Namespace, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None) -> Any:
    base = (args.server or os.environ.get("TAILSCOPE_SERVER") or DEFAULT_SERVER).rstrip("/")
    params = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        token = args.token or os.environ.get("TAILSCOPE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        resp = httpx.request(
            method, base + path, json=body, params=params, headers=headers, timeout=args.timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the server at {base} ({exc.__class__.__name__}: {exc}); is `tailscope serve` running? (--server URL)") from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        msg = data.get("error") if isinstance(data, dict) else resp.text[:200]
        raise CliError(f"{method} {path}: {resp.status_code} {msg}")
    return data


def run(args: argparse.Namespace) -> int:
    try:
        out = _dispatch(args)
    except CliError as exc:
        print(f"tailscope alerts: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if isinstance(out, dict) and out.get("ok") is False:
        return 1
    return 0


def _secret(args: argparse.Namespace) -> str | None:
    if args.secret_env:
        if args.secret_env not in os.environ:
            raise CliError(f"--secret-env: environment variable {args.secret_env} is not set")
        return os.environ[args.secret_env]
    return args.secret


def _dispatch(args: argparse.Namespace) -> Any:
    cmd = args.alerts_command
    if cmd == "webhooks":
        if args.action == "add":
            secret = _secret(args) or ""
            return _request(args, "POST", "/api/v1/alerts/webhooks", body={"url": args.url, "secret": secret, "format": args.format, "name": args.name})
        if args.action == "update":
            body = {"url": args.url, "secret": _secret(args), "format": args.format, "name": args.name, "enabled": args.enabled}
            return _request(args, "PATCH", f"/api/v1/alerts/webhooks/{args.id}", body={k: v for k, v in body.items() if v is not None})
        if args.action == "list":
            return _request(args, "GET", "/api/v1/alerts/webhooks")
        if args.action == "delete":
            return _request(args, "DELETE", f"/api/v1/alerts/webhooks/{args.id}")
        return _request(args, "POST", f"/api/v1/alerts/webhooks/{args.id}/test")
    if cmd == "rules":
        if args.action == "add":
            body = {
                "name": args.name,
                "service": args.service,
                "slo_ms": args.slo_ms,
                "spike_factor": args.spike_factor,
                "window_s": args.window or 0,
                "min_requests": args.min_requests,
                "causes": args.cause,
                "webhook_ids": args.webhook,
            }
            return _request(args, "POST", "/api/v1/alerts/rules", body=body)
        if args.action == "list":
            return _request(args, "GET", "/api/v1/alerts/rules")
        return _request(args, "DELETE", f"/api/v1/alerts/rules/{args.id}")
    if cmd == "silence":
        if not args.service and not args.cause:
            raise CliError("silence: give --service and/or --cause")
        body = {"service": args.service, "cause": args.cause, "duration_s": args.duration, "comment": args.comment, "created_by": args.by}
        return _request(args, "POST", "/api/v1/alerts/silences", body=body)
    if cmd == "silences":
        return _request(args, "GET", "/api/v1/alerts/silences", params={"include_expired": "true" if args.all else None})
    if cmd == "unsilence":
        return _request(args, "DELETE", f"/api/v1/alerts/silences/{args.id}")
    if cmd == "list":
        return _request(args, "GET", "/api/v1/alerts", params={"state": args.state, "service": args.service, "limit": args.limit})
    if cmd == "show":
        return _request(args, "GET", f"/api/v1/alerts/{args.id}")
    if cmd == "ack":
        return _request(args, "POST", f"/api/v1/alerts/{args.id}/ack", body={"by": args.by, "comment": args.comment})
    if cmd == "deliveries":
        return _request(args, "GET", "/api/v1/alerts/deliveries", params={"alert_id": args.alert, "status": args.status, "limit": args.limit})
    if cmd == "status":
        return _request(args, "GET", "/api/v1/alerts/status")
    if cmd == "evaluate":
        return _request(args, "POST", "/api/v1/alerts/evaluate")
    raise CliError(f"unknown command {cmd!r}")
