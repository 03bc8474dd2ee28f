"""Watch directories for PyTorch profiler traces and upload each complete one once.

A trace is written over seconds (``export_chrome_trace`` streams JSON, gzip
writers flush in blocks), so a file is uploaded only when it is *complete*:
its size and mtime were the same over two polls **and** it parses (the JSON
closes, the gzip stream has its trailer). The summary
(:func:`agents.profiler_summary.summarize`) is computed here and sent with
the file. What was uploaded is remembered in a small JSON state file keyed by
path, size and mtime, so a restarted agent does not upload it again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import httpx

from agents.profiler_summary import TraceError, load_trace, summarize
from agents.sender import upload_profiler_trace

log = logging.getLogger("tailscope.agent.profiler")

__all__ = ["ProfilerWatcher", "is_trace_name"]

SUFFIXES = (".json", ".json.gz")


def is_trace_name(name: str) -> bool:
    """``*.json`` / ``*.json.gz`` (PyTorch's ``*.pt.trace.json[.gz]`` included), not hidden/temp files."""
    return name.endswith(SUFFIXES) and not name.startswith(".")


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_polls: int = 0
    next_try: float = 0.0
    attempts: int = 0


class ProfilerWatcher:
    """Polls ``dirs`` every ``interval`` seconds; uploads complete traces to ``server``.

    Args:
        dirs: directories to watch (recursively); a missing one is reported and re-checked.
        server / token: where ``POST /api/v1/profiler-traces`` goes.
        resource: ``host.name``, ``service.name``, ``service.instance.id`` form fields.
        state_file: JSON file remembering uploads across restarts.
        invalid_after: polls a stable file may stay unparseable before it is given up on (logged once).
    """

    def __init__(self, dirs: list[str | os.PathLike[str]], server: str, token: str | None,
                 resource: Mapping[str, Any], state_file: str | os.PathLike[str], interval: float = 2.0,
                 invalid_after: int = 30, client: httpx.Client | None = None, timeout: float = 60.0) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.server = server
        self.token = token
        self.resource = dict(resource)
        self.state_file = Path(state_file)
        self.interval = interval
        self.invalid_after = invalid_after
        self.client = client or httpx.Client(timeout=timeout)
        self._seen: dict[str, _Seen] = {}
        self._missing_logged: set[Path] = set()
        self.state: dict[str, dict[str, Any]] = self._load_state()
        self.uploaded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- state ------------------------------------------------------------------
    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("profiler state file %s is unreadable (%s); starting afresh", self.state_file, exc)
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}

    def _save_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": 1, "files": self.state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    def _done(self, key: str, st: os.stat_result) -> bool:
        rec = self.state.get(key)
        return bool(rec) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns

    # --- scanning -----------------------------------------------------------------
    def _candidates(self) -> list[Path]:
        out = []
        for d in self.dirs:
            if not d.is_dir():
                if d not in self._missing_logged:
                    self._missing_logged.add(d)
                    log.warning("profiler directory %s does not exist (yet); will keep checking", d)
                continue
            for root, dirnames, names in os.walk(d):
                dirnames[:] = [n for n in dirnames if not n.startswith(".")]
                out.extend(Path(root) / n for n in names if is_trace_name(n))
        return sorted(out)

    def poll_once(self) -> int:
        """One scan; returns how many traces were uploaded in it."""
        uploaded = 0
        now = time.monotonic()
        present = set()
        for path in self._candidates():
            key = str(path.resolve())
            present.add(key)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if self._done(key, st):
                continue
            seen = self._seen.get(key)
            if seen is None or seen.size != st.st_size or seen.mtime_ns != st.st_mtime_ns:
                self._seen[key] = _Seen(st.st_size, st.st_mtime_ns)
                continue  # changed since the last poll: still being written
            seen.stable_polls += 1
            if now < seen.next_try:
                continue
            uploaded += self._try_upload(path, key, st, seen)
        for key in list(self._seen):
            if key not in present:
                del self._seen[key]
        # forget uploads whose file is gone, so the state file does not grow forever
        # (re-uploading a file that reappears is harmless: the server keys traces by content hash)
        gone = [k for k in self.state if k not in present and not os.path.exists(k)]
        if gone:
            for k in gone:
                del self.state[k]
            self._save_state()
        return uploaded

    def _try_upload(self, path: Path, key: str, st: os.stat_result, seen: _Seen) -> int:
        try:
            trace = load_trace(path)
        except TraceError as exc:
            if seen.stable_polls >= self.invalid_after:
                log.error("giving up on %s: unchanged for %d polls and still %s", path, seen.stable_polls, exc)
                self.state[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "status": "invalid", "error": str(exc)[:300]}
                self._save_state()
            return 0  # not complete yet (or never will be)
        try:
            summary = summarize(trace)
        except Exception as exc:  # noqa: BLE001 - a summary bug must not block the upload of the raw file
            log.exception("summary of %s failed; uploading without one", path)
            summary = {"error": f"{type(exc).__name__}: {exc}"}
        del trace
        fields = {k: str(self.resource[k]) for k in ("host.name", "service.instance.id", "service.name") if self.resource.get(k)}
        fields["summary"] = json.dumps(summary)
        result = upload_profiler_trace(self.client, self.server, self.token, path, fields)
        if result.verdict == "ok":
            rec: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "status": "uploaded", "at": time.time()}
            try:
                body = json.loads(result.detail) if result.detail else {}
                if isinstance(body, dict) and body.get("id"):
                    rec["id"] = body["id"]
            except ValueError:
                pass
            self.state[key] = rec
            self._save_state()
            self.uploaded += 1
            log.info("uploaded profiler trace %s (%d bytes)", path, st.st_size)
            return 1
        if result.verdict == "poison":
            log.error("server refused profiler trace %s with HTTP %s: %s; not retrying", path, result.status, result.detail)
            self.state[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "status": "refused", "http": result.status}
            self._save_state()
            return 0
        seen.attempts += 1
        if result.verdict == "auth" and seen.attempts == 1:
            log.error("server refused the agent's token uploading %s (HTTP %s): check --token", path, result.status)
        delay = result.retry_after if result.retry_after is not None else min(60.0, self.interval * 2 ** min(seen.attempts, 6))
        seen.next_try = time.monotonic() + delay
        if seen.attempts == 1:
            log.warning("upload of %s failed (%s %s); retrying", path, result.status or "", result.detail[:120])
        return 0

    # --- thread -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailscope-profiler-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("profiler directory scan failed")
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()
