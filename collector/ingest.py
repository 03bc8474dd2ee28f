"""The ingest pipeline: a bounded queue in front of one group-commit writer.

Why this shape (docs/durability.md has the full argument):

* **Ack after commit.** A request is answered 200 only once its rows are in a
  DuckDB transaction that has committed; DuckDB writes and syncs its WAL on
  commit, so an acknowledged batch survives ``kill -9`` right after the answer.
* **Group commit.** One writer thread takes everything queued and writes it in
  ONE transaction together with an ``ingest_batches`` row per request, then
  resolves every waiting request. The sync cost is paid once per group, not
  once per request; the price is that a request waits for the next commit
  (at most ``flush_interval_ms`` of gathering plus the commit itself).
* **Bounded, never buffered beyond the bound.** The queue counts items (spans,
  data points, log records) until they are committed; a request that does not
  fit is refused at once with 429 + Retry-After (``Overloaded``), and 503
  (``Unavailable``) while shutting down or while the store refuses writes.
  Nothing is silently dropped: every submitted request either commits or gets
  an error its sender can retry.

The writer follows sentry_sdk's worker (STYLE.md rule 7): a named thread, a
condition variable instead of polling, ``stop()`` drains what was accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from collector.decode_pool import DecodePool
from collector.self_metrics import SelfMetrics
from tailscope.errors import Overloaded, Unavailable

if TYPE_CHECKING:
    from collector.decoded import Decoded
    from collector.store import Store
    from tailscope.config import Config

log = logging.getLogger("tailscope.ingest")

_BATCH_SCHEMA = pa.schema(
    [
        ("batch_seq", pa.int64()),
        ("received_at", pa.timestamp("us")),
        ("signal", pa.string()),
        ("items", pa.int64()),
    ]
)


@dataclass
class _Pending:
    """One accepted request waiting for its commit."""

    decoded: "Decoded"
    items: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc).replace(tzinfo=None))
    released: bool = False  # its items no longer count in the queue depth


class Ingest:
    """Queue + writer. ``submit`` from any thread, ``await wait(...)`` from the event loop.

    Args:
        store: the telemetry store this writer owns the writes of.
        config: reads ``queue_max_spans``, ``flush_interval_ms``, ``retry_after_s``.
        metrics: where the counters go (a fresh :class:`SelfMetrics` if omitted).
    """

    def __init__(self, store: "Store", config: "Config", metrics: SelfMetrics | None = None) -> None:
        self.store = store
        self.config = config
        self.capacity: int = int(config.queue_max_spans)
        self.flush_interval: float = int(config.flush_interval_ms) / 1000.0
        self.retry_after: str = str(int(config.retry_after_s))
        # Commit at once when half the queue is gathered, without waiting out the
        # flush interval: senders keep filling the other half during the commit.
        self.group_target: int = max(1, self.capacity // 2)
        self.metrics = metrics if metrics is not None else SelfMetrics()
        self.decoder = DecodePool(config)
        self.metrics.decoder = self.decoder.active
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._queued_items = 0  # items in _queue
        self._depth = 0  # items queued or in the commit being written
        self._state = "new"  # new → running → stopping → stopped
        self._thread: threading.Thread | None = None
        # Circuit breaker: after the store refused a whole group, new data gets 503
        # at once for retry_after_s instead of queueing behind writes that fail.
        self._failing: str | None = None
        self._failing_until = 0.0
        self._seq = self._next_seq()
        self._json_columns = self._find_json_columns()
        # DuckDB checkpoints (folds the WAL into the file) when the WAL passes this
        # size. Its default, 16 MB, is a checkpoint every ~40 k request spans; each
        # one rewrites partly filled row groups, so at 64 MB the store spends about
        # 20 % less CPU per span (benchmarks/ingest.py, stage costs). The price is a
        # WAL of up to that size to replay after a crash (~0.5 s per 64 MB measured).
        # Durability is unchanged: every commit still syncs the WAL before the ack.
        threshold_mb = int(config.checkpoint_threshold_mb)
        self.store.execute_write(f"SET checkpoint_threshold = '{threshold_mb}MiB'")
        self.metrics.gauge("tailscope_ingest_queue_items", "Items accepted and not yet committed.", lambda: self._depth)
        self.metrics.gauge("tailscope_ingest_queue_capacity_items", "Queue bound (queue_max_spans); beyond it ingest answers 429.", lambda: self.capacity)
        self.metrics.gauge("tailscope_ingest_store_failing", "1 while the store refuses writes (ingest answers 503).", lambda: 1 if self._failing else 0)

    def _refusing(self) -> bool:
        return self._failing is not None and time.monotonic() < self._failing_until

    def _next_seq(self) -> int:
        cur = self.store.cursor()
        try:
            row = cur.execute("SELECT coalesce(max(batch_seq), 0) FROM ingest_batches").fetchone()
        finally:
            cur.close()
        return int(row[0]) + 1

    def _find_json_columns(self) -> dict[str, frozenset[str]]:
        cur = self.store.cursor()
        try:
            rows = cur.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE data_type = 'JSON'"
            ).fetchall()
        finally:
            cur.close()
        out: dict[str, set[str]] = defaultdict(set)
        for table, column in rows:
            out[table].add(column)
        return {t: frozenset(c) for t, c in out.items()}

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._state != "new":
                return
            self._state = "running"
        self._thread = threading.Thread(target=self._run, name="tailscope-ingest-writer", daemon=True)
        self._thread.start()
        self.decoder.start()

    def stop(self, timeout: float | None = 120.0) -> None:
        """Refuse new data (503), write everything already accepted, then return."""
        with self._cond:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            self._state = "stopping"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("ingest writer did not drain within %.0f s; %d items unwritten", timeout or 0, self._depth)
        with self._cond:
            self._state = "stopped"
        self.decoder.stop()

    @property
    def depth(self) -> int:
        """Items accepted and not yet committed."""
        return self._depth

    @property
    def running(self) -> bool:
        return self._state == "running"

    # --- admission -------------------------------------------------------------
    def _unavailable(self, why: str) -> Unavailable:
        return Unavailable(why, headers={"Retry-After": self.retry_after})

    def check_room(self) -> None:
        """Cheap early refusal before a body is decoded (429 when already full, 503 when closed)."""
        if self._state != "running":
            raise self._unavailable("the server is not accepting data (starting or shutting down); retry later")
        if self._refusing():
            raise self._unavailable(f"the store is refusing writes ({self._failing}); retry later")
        if self._depth >= self.capacity:
            raise Overloaded(
                f"ingest queue is full ({self._depth} of {self.capacity} items waiting); retry after {self.retry_after} s",
                headers={"Retry-After": self.retry_after},
            )

    def submit(self, decoded: "Decoded") -> concurrent.futures.Future:
        """Queue a decoded request; the future resolves (None) once it is committed.

        Raises:
            Overloaded: the request's items do not fit in the queue (429).
            Unavailable: shutting down, not started, or the store is failing (503).
        """
        # Rows without an accepted item (should not happen) still take room in the queue.
        items = max(int(decoded.accepted), 1 if decoded.rows else 0)
        pending = _Pending(decoded, items)
        if decoded.rows == 0:
            # Nothing to store (empty request, or everything rejected): no commit to wait for.
            pending.future.set_result(None)
            return pending.future
        with self._cond:
            if self._state != "running":
                self.metrics.shed_items("unavailable", items)
                raise self._unavailable("the server is not accepting data (starting or shutting down); retry later")
            if self._refusing():
                self.metrics.shed_items("unavailable", items)
                raise self._unavailable(f"the store is refusing writes ({self._failing}); retry later")
            # A request bigger than the whole queue is still taken when the queue is
            # empty; otherwise it could never be accepted (its size is already
            # bounded by max_body_bytes).
            if self._depth + items > self.capacity and self._depth > 0:
                self.metrics.shed_items("queue_full", items)
                raise Overloaded(
                    f"ingest queue is full ({self._depth} of {self.capacity} items waiting, "
                    f"this request has {items}); retry after {self.retry_after} s",
                    headers={"Retry-After": self.retry_after},
                )
            self._queue.append(pending)
            self._queued_items += items
            self._depth += items
            self._cond.notify_all()
        return pending.future

    async def put(self, decoded: "Decoded") -> None:
        """Submit and wait (on the event loop) until the request is committed.

        The wait is shielded: if the handler is cancelled (server shutdown
        timeout), the queued request is still written; only the answer is lost,
        as with a dropped connection, and the sender retries.
        """
        await asyncio.shield(asyncio.wrap_future(self.submit(decoded)))

    def put_blocking(self, decoded: "Decoded", timeout: float | None = None) -> None:
        """Submit and wait on this thread (gRPC handlers)."""
        self.submit(decoded).result(timeout)

    # --- the writer ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self._state == "running":
                    self._cond.wait()
                if not self._queue:
                    return  # stopping and drained
                # Gather a group: until the oldest request has waited flush_interval,
                # the group is big enough, or we are draining for shutdown.
                deadline = self._queue[0].enqueued + self.flush_interval
                while self._state == "running" and self._queued_items < self.group_target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch, self._queue = self._queue, []
                self._queued_items = 0
            try:
                self._commit_group(batch)
            except BaseException as exc:  # never leave a sender waiting forever
                log.exception("ingest writer failed")
                for p in batch:
                    self._resolve(p, self._unavailable("the ingest writer failed; retry later"))
                self._release(batch)

    @staticmethod
    def _resolve(p: _Pending, exc: BaseException | None = None) -> None:
        """Answer one waiting request; a future someone cancelled is simply skipped."""
        try:
            if p.future.done():
                return
            if exc is None:
                p.future.set_result(None)
            else:
                p.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass

    def _release(self, batch: list[_Pending]) -> None:
        """Give the batch's queue room back (once per request, whatever path it took)."""
        with self._cond:
            for p in batch:
                if not p.released:
                    p.released = True
                    self._depth -= p.items

    def _bookkeeping(self, batch: list[_Pending]) -> pa.Table:
        seqs = list(range(self._seq, self._seq + len(batch)))
        self._seq += len(batch)
        return pa.Table.from_pydict(
            {
                "batch_seq": seqs,
                "received_at": [p.received_at for p in batch],
                "signal": [p.decoded.signal for p in batch],
                "items": [p.items for p in batch],
            },
            schema=_BATCH_SCHEMA,
        )

    def _as_json(self, name: str, table: pa.Table) -> pa.Table:
        """Tag JSON text columns as Arrow's ``arrow.json`` type (zero-copy).

        DuckDB then takes them as JSON directly instead of casting VARCHAR to
        JSON, which parses every value: about 30 % of the insert's cost for
        spans with a dozen attributes. The decoders build this text themselves
        (collector.attributes), so its validity is theirs to guarantee; the
        ingest tests check ``json_valid`` on what was stored.
        """
        columns = self._json_columns.get(name)
        if not columns:
            return table
        for i, f in enumerate(table.schema):
            if f.name in columns and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type)):
                storage = table.column(i).combine_chunks()
                json_type = pa.json_(f.type)
                table = table.set_column(i, pa.field(f.name, json_type, f.nullable), pa.ExtensionArray.from_storage(json_type, storage))
        return table

    def _merge(self, batch: list[_Pending]) -> list[tuple[str, pa.Table]]:
        """One Arrow table per store table: one INSERT each instead of one per request."""
        by_table: dict[str, list[pa.Table]] = defaultdict(list)
        for p in batch:
            for name, table in p.decoded.tables.items():
                if table.num_rows:
                    by_table[name].append(table)
        out: list[tuple[str, pa.Table]] = []
        for name, tables in by_table.items():
            if len(tables) == 1:
                out.append((name, self._as_json(name, tables[0])))
                continue
            try:
                out.append((name, self._as_json(name, pa.concat_tables(tables, promote_options="default"))))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                out.extend((name, self._as_json(name, t)) for t in tables)  # differing column types: one by one
        return out

    def _write(self, batch: list[_Pending]) -> int:
        tables = self._merge(batch)
        tables.append(("ingest_batches", self._bookkeeping(batch)))
        self.store.write(tables)
        return sum(t.num_rows for _, t in tables)

    def _commit_group(self, batch: list[_Pending]) -> None:
        t0 = time.monotonic()
        try:
            rows = self._write(batch)
        except Exception as exc:
            self.metrics.commit_failed()
            log.warning("group commit of %d requests failed (%s); retrying them one by one", len(batch), exc)
            self._commit_one_by_one(batch)
            return
        self._succeeded(batch, rows, time.monotonic() - t0)

    def _commit_one_by_one(self, batch: list[_Pending]) -> None:
        """Isolate a request whose rows the store refuses, so it cannot sink the others."""
        failures = 0
        last: Exception | None = None
        for p in batch:
            t0 = time.monotonic()
            try:
                rows = self._write([p])
            except Exception as exc:
                log.exception("store refused a %s batch of %d items", p.decoded.signal, p.items)
                self.metrics.commit_failed()
                failures += 1
                last = exc
                self._release([p])
                self._resolve(p, self._unavailable(f"the store could not write this batch ({type(exc).__name__}); retry later"))
                continue
            self._succeeded([p], rows, time.monotonic() - t0)
        if failures == len(batch) and last is not None:
            # Every request failed on its own: the store itself is failing.
            with self._cond:
                self._failing = type(last).__name__
                self._failing_until = time.monotonic() + float(self.retry_after)

    def _succeeded(self, batch: list[_Pending], rows: int, seconds: float) -> None:
        per_signal: dict[str, int] = defaultdict(int)
        for p in batch:
            per_signal[p.decoded.signal] += p.items
        self.metrics.committed(per_signal, rows, seconds)
        now = time.monotonic()
        self._release(batch)
        with self._cond:
            self._failing = None
        for p in batch:
            self.metrics.acked(now - p.enqueued)
            self._resolve(p)
