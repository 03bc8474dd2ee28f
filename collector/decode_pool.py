"""Where OTLP bodies are decompressed and decoded: off the event loop, optionally in processes.

Why: turning protobuf into columns is a Python loop that holds the GIL
(about 75 k spans/s per core), so on the event loop it would stall every
other request, and on threads it still uses one core. With
``decode_workers > 0`` the CPU work runs in that many worker processes
(started with ``forkserver``: the server has threads, and forking a threaded
process is unsafe); the server process only moves bytes in and Arrow tables
out. With 0 it runs on a small thread pool, which keeps tests and small
deployments free of extra processes.

The default is 0 because on two cores processes gained nothing in
measurements (benchmarks/ingest.py, docs/ingest.md): DuckDB's insert already
runs on native threads beside the decoding thread, and each body's Arrow
tables cost a pickle round trip (~8 % more CPU per span). Use processes on
machines with more cores, where decode would otherwise be held to one core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import threading
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from tailscope.errors import Unavailable

if TYPE_CHECKING:
    from collector.decoded import Decoded
    from tailscope.config import Config

log = logging.getLogger("tailscope.ingest")


def decode_body(signal: str, body: bytes, content_type: str, content_encoding: str, limit: int, max_attribute_bytes: int,
                decoder: str = "auto") -> "Decoded":
    """Decompress (bounded by ``limit``) and decode one OTLP/HTTP body; runs in a worker."""
    from collector import otlp

    raw = otlp.decompress(body, content_encoding, limit=limit)
    return otlp.decode(signal, raw, content_type, max_attribute_bytes=max_attribute_bytes, decoder=decoder)


def _warm() -> int:
    """Import the decoder in a fresh worker so the first real request does not pay for it."""
    import collector.otlp  # noqa: F401

    return 0


class DecodePool:
    """Runs :func:`decode_body` on threads (``workers == 0``) or in ``workers`` processes."""

    def __init__(self, config: "Config") -> None:
        self.workers = int(config.decode_workers)
        self.limit = int(config.max_body_bytes)
        self.max_attribute_bytes = int(config.max_attribute_bytes)
        self.retry_after = str(int(config.retry_after_s))
        self.decoder = str(config.decoder)
        from collector import otlp

        try:
            # "compiled" without the extension stops the server here, at startup
            self.active = otlp.active_decoder(self.decoder)
        except RuntimeError as exc:
            from tailscope.config import ConfigError

            raise ConfigError(f"decoder=compiled: {exc}") from None
        self._lock = threading.Lock()
        self._pool: concurrent.futures.Executor | None = None

    def _executor(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._pool is None:
                if self.workers > 0:
                    ctx = multiprocessing.get_context("forkserver")
                    self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
                else:
                    self._pool = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="tailscope-decode")
            return self._pool

    def start(self) -> None:
        """Start the workers now (a process pool takes a second to import the decoder)."""
        pool = self._executor()
        if self.workers > 0:
            for f in [pool.submit(_warm) for _ in range(self.workers)]:
                f.result(timeout=120)

    def stop(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _reset(self, broken: concurrent.futures.Executor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def decode(self, signal: str, body: bytes, content_type: str, content_encoding: str) -> "Decoded":
        """Decode on the pool; raises the decoder's BadPayload / PayloadTooLarge / 415 as is."""
        pool = self._executor()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                pool, decode_body, signal, body, content_type, content_encoding, self.limit, self.max_attribute_bytes,
                self.decoder,
            )
        except BrokenProcessPool:
            # A worker died (OOM-killed, …): the request was not decoded, so the
            # sender may retry it; the next request gets a fresh pool.
            log.error("a decode worker died; restarting the decode pool")
            self._reset(pool)
            raise Unavailable("the decoder restarted; retry later", headers={"Retry-After": self.retry_after}) from None
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise Unavailable("the server is shutting down; retry later", headers={"Retry-After": self.retry_after}) from None
            raise
