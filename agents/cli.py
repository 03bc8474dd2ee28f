"""``tailscope agent ...`` / ``python -m agents ...``: the node agent's command line.

Flags are the agent's own (it runs on GPU nodes without the server's
settings table); the environment supplies ``TAILSCOPE_SERVER``,
``TAILSCOPE_TOKEN`` and ``TAILSCOPE_AGENT_SPOOL`` defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

__all__ = ["add_arguments", "run", "main", "options_from_args"]


class _ScrapeAction(argparse.Action):
    """``--scrape URL`` starts a target; ``--scrape-service`` / ``--scrape-instance`` name the last one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        from agents.daemon import ScrapeTarget

        targets = list(getattr(namespace, "scrape", None) or [])
        if option_string == "--scrape":
            targets.append(ScrapeTarget(url=value))
        else:
            if not targets:
                parser.error(f"{option_string} must follow the --scrape URL it names")
            if option_string == "--scrape-service":
                targets[-1].service = value
            else:
                targets[-1].instance = value
        namespace.scrape = targets


def _size(text: str) -> int:
    """``268435456``, ``256M``, ``1G``, ``512k``."""
    t = text.strip().upper().removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0: {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags (the lead's ``tailscope agent`` subparser calls this)."""
    g = parser.add_argument_group("delivery")
    g.add_argument("--server", default=os.environ.get("TAILSCOPE_SERVER", "http://127.0.0.1:4318"),
                   help="tailscope server (OTLP/HTTP base URL); env TAILSCOPE_SERVER; default %(default)s")
    g.add_argument("--token", default=os.environ.get("TAILSCOPE_TOKEN"),
                   help="bearer token for ingest; env TAILSCOPE_TOKEN")
    g.add_argument("--spool-dir", default=None,
                   help="disk spool for payloads not yet delivered; env TAILSCOPE_AGENT_SPOOL; "
                        "default ~/.cache/tailscope/spool")
    g.add_argument("--spool-max-bytes", type=_size, default=256 * 1024 * 1024,
                   help="spool bound; the oldest payloads are dropped (and counted) beyond it; default 256M")
    g.add_argument("--queue-size", type=int, default=20_000, help="in-memory items before new ones are dropped")
    g.add_argument("--batch-interval", type=_positive, default=1.0, help="seconds items are batched before spooling")
    g.add_argument("--shutdown-timeout", type=_positive, default=5.0, help="seconds to keep draining on SIGTERM")
    s = parser.add_argument_group("sources")
    s.add_argument("--interval", type=_positive, default=1.0, help="GPU sampling interval in seconds (default 1)")
    s.add_argument("--no-gpu", action="store_true", help="do not sample GPUs through NVML")
    s.add_argument("--profiler-dir", action="append", default=[], metavar="DIR",
                   help="watch DIR for PyTorch profiler traces (*.json, *.json.gz) and upload them; repeatable")
    s.add_argument("--profiler-interval", type=_positive, default=2.0, help="seconds between profiler-dir scans")
    s.add_argument("--scrape", action=_ScrapeAction, default=[], metavar="URL",
                   help="Prometheus /metrics URL of a serving engine (vLLM, SGLang, TGI); repeatable")
    s.add_argument("--scrape-service", action=_ScrapeAction, dest="scrape", metavar="NAME",
                   help="service.name for the preceding --scrape URL")
    s.add_argument("--scrape-instance", action=_ScrapeAction, dest="scrape", metavar="ID",
                   help="service.instance.id for the preceding --scrape URL")
    s.add_argument("--scrape-interval", type=_positive, default=5.0, help="seconds between scrapes")
    r = parser.add_argument_group("identity")
    r.add_argument("--service-name", default="tailscope-agent", help="service.name of the agent's own telemetry")
    r.add_argument("--host-name", default=None, help="host.name (default: this machine's hostname)")
    r.add_argument("--instance-id", default=None, help="service.instance.id of the agent (default: host name)")
    parser.add_argument("--duration", type=_positive, default=None, help="exit after this many seconds (default: run until stopped)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    # Benchmarks only: a pynvml look-alike by dotted name (tests.fake_nvml); not for production.
    parser.add_argument("--nvml-module", default=None, help=argparse.SUPPRESS)


def options_from_args(args: argparse.Namespace) -> Any:
    from agents.daemon import AgentOptions

    return AgentOptions(
        server=args.server, token=args.token, interval=args.interval, gpu=not args.no_gpu,
        nvml_module=args.nvml_module, profiler_dirs=list(args.profiler_dir), profiler_interval=args.profiler_interval,
        scrapes=list(args.scrape or []), scrape_interval=args.scrape_interval, spool_dir=args.spool_dir,
        spool_max_bytes=args.spool_max_bytes, queue_size=args.queue_size, batch_interval=args.batch_interval,
        service_name=args.service_name, host_name=args.host_name, instance_id=args.instance_id,
        shutdown_timeout=args.shutdown_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Run the agent; returns the process exit status (2 for bad options)."""
    from agents.daemon import Agent

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(options_from_args(args))
    except (ValueError, OSError, ImportError) as exc:
        print(f"tailscope agent: error: {exc}", file=sys.stderr)
        return 2
    return agent.run(args.duration)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailscope agent", description="tailscope node agent: NVML, profiler traces, "
                                     "Prometheus scrape, disk spool, OTLP/HTTP delivery.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
