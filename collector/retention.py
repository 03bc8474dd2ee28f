"""Time-based retention: a background thread that drops telemetry past its age."""

from __future__ import annotations

import logging
import threading

from collector.store import Store

log = logging.getLogger("tailscope.retention")


class Retention:
    """Deletes rows older than ``hours`` every ``interval_s`` (and once at start).

    Deleting in the writer's process under the store's write lock keeps it
    from racing ingest; DuckDB reclaims the space at its next checkpoint.
    """

    def __init__(self, store: Store, hours: int, *, interval_s: float = 300.0) -> None:
        if hours <= 0:
            raise ValueError(f"retention hours must be > 0, got {hours}")
        self.store = store
        self.hours = hours
        self.interval_s = interval_s
        self.deleted_total: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, int]:
        deleted = self.store.delete_older_than(self.hours)
        for table, n in deleted.items():
            self.deleted_total[table] = self.deleted_total.get(table, 0) + n
        if any(deleted.values()):
            log.info("retention: deleted %s (older than %d h)", deleted, self.hours)
        return deleted

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the thread alive; the next round retries
                log.exception("retention pass failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tailscope-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
