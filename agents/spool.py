"""A bounded, durable on-disk queue of encoded OTLP payloads.

Why a disk spool: the server may be down, restarting or shedding load
(429/503) for minutes, and the agent itself may be restarted meanwhile; GPU
samples taken during that time are exactly the evidence a postmortem needs.
Every payload is written here (fsync'ed, atomically renamed) before any send
is tried, removed only after the server answered 200, and drained oldest
first. The spool is bounded in bytes: when full, the *oldest* payloads are
dropped (fresh data is worth more to an on-call engineer) and counted.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tailscope.agent.spool")

__all__ = ["Spool", "SpoolItem", "default_spool_dir"]

_NAME = re.compile(r"^(\d{20})-([a-z]+)\.otlp$")
KINDS = ("metrics", "logs")


def default_spool_dir() -> Path:
    """``$TAILSCOPE_AGENT_SPOOL`` or ``~/.cache/tailscope/spool``."""
    env = os.environ.get("TAILSCOPE_AGENT_SPOOL")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tailscope" / "spool"


@dataclass(frozen=True)
class SpoolItem:
    seq: int
    kind: str
    path: Path
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class Spool:
    """Payload files ``<seq>-<kind>.otlp`` in one directory; ``seq`` orders them.

    Args:
        directory: created if missing; existing payloads (from a previous run) are kept.
        max_bytes: the bound; oldest payloads are dropped to stay under it.
        fsync: write durably (tests of other parts may turn it off for speed).
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = 256 * 1024 * 1024, fsync: bool = True) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._items: list[SpoolItem] = []
        self.bytes = 0
        self.dropped_payloads = 0  # dropped to stay under max_bytes (or larger than it)
        self.dropped_bytes = 0
        for leftover in self.dir.glob("*.tmp"):  # a write interrupted by a crash: never renamed, never acknowledged
            leftover.unlink(missing_ok=True)
        for p in sorted(self.dir.iterdir()):
            m = _NAME.match(p.name)
            if m and m.group(2) in KINDS:
                size = p.stat().st_size
                self._items.append(SpoolItem(int(m.group(1)), m.group(2), p, size))
                self.bytes += size
        self._items.sort(key=lambda i: i.seq)
        self._next_seq = (self._items[-1].seq + 1) if self._items else 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, kind: str, payload: bytes) -> bool:
        """Store a payload durably; ``False`` when it alone exceeds ``max_bytes`` (dropped, counted)."""
        if kind not in KINDS:
            raise ValueError(f"unknown payload kind {kind!r}; expected one of {KINDS}")
        size = len(payload)
        with self._lock:
            if size > self.max_bytes:
                self.dropped_payloads += 1
                self.dropped_bytes += size
                log.warning("dropped a %d-byte %s payload larger than the whole spool (%d bytes)", size, kind, self.max_bytes)
                return False
            while self._items and self.bytes + size > self.max_bytes:
                self._drop_oldest_locked()
            seq = self._next_seq
            self._next_seq += 1
            path = self.dir / f"{seq:020d}-{kind}.otlp"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(payload)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.fsync:
                self._fsync_dir()
            self._items.append(SpoolItem(seq, kind, path, size))
            self.bytes += size
            return True

    def _drop_oldest_locked(self) -> None:
        item = self._items.pop(0)
        item.path.unlink(missing_ok=True)
        self.bytes -= item.size
        self.dropped_payloads += 1
        self.dropped_bytes += item.size
        if self.dropped_payloads == 1 or self.dropped_payloads % 100 == 0:
            log.warning("spool full (%d bytes): dropped the oldest payload (%d dropped so far)", self.max_bytes, self.dropped_payloads)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:  # e.g. platforms without directory fds
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def oldest(self) -> SpoolItem | None:
        with self._lock:
            return self._items[0] if self._items else None

    def items(self) -> list[SpoolItem]:
        with self._lock:
            return list(self._items)

    def remove(self, item: SpoolItem) -> None:
        """Forget a payload (after a 200, or as poison)."""
        with self._lock:
            try:
                self._items.remove(item)
            except ValueError:  # already dropped as oldest meanwhile
                return
            item.path.unlink(missing_ok=True)
            self.bytes -= item.size
