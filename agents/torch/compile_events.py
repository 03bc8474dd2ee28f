"""torch.compile compile / recompile spans from torch's own hooks.

Sources (``shared/notes/SIGNALS.md``), best first, each feature-detected:

1. ``CompilationMetrics`` records, delivered live by
   ``torch._utils_internal.log_compilation_event`` as an INFO record on logger
   ``torch._utils_internal`` (``record.args[0]``), on the compiling thread,
   just after the compile ends. They carry exact start/end (epoch us),
   ``recompile_reason``, ``co_name``, ``graph_node_shapes`` and cache hit/miss
   counters. We attach a ``logging.Filter`` to that logger and lower its level
   to INFO; the filter returns False for records the logger would not have
   passed before, so torch's own stderr output is unchanged.
2. ``torch._dynamo.utils.get_compilation_metrics()``: polled at compile start
   / end and on ``flush()`` for records the log path did not deliver (e.g.
   ``torch._dynamo.config.log_compilation_metrics = False``).
3. ``torch._dynamo.callback.callback_handler`` start callbacks (the
   ``on_compile_start`` hook): fire on the compiling thread before the compile;
   we snapshot there which span is active, the backend (``compiler_fn`` of
   ``convert_frame._compile``) and the frame's input tensor shapes.
   ``torch._dynamo.reset()`` clears these callbacks, so they are re-installed
   whenever the log filter sees any record (it does before every compile).
4. The recompiles artifact log (``torch._dynamo.guards.__recompiles``): reason
   text for versions whose ``CompilationMetrics`` has no ``recompile_reason``.
5. The recompile-limit WARNING on ``torch._dynamo.convert_frame`` ("hit
   config.recompile_limit (8)", older "config.cache_size_limit") becomes the
   log event ``tailscope.compile.limit_hit``: the frame then runs eager.

Versions: verified on torch 2.13.0 (CPU build) and 2.14.1 (CUDA build, run on
the CPU): the compile, instrumentation and lab tests pass on both. Read from torch's source for older
versions: ``log_compilation_event`` exists since 2.1; ``start_time_us`` /
``duration_us`` / ``recompile_reason`` are newer than 2.4, where the record
has ``start_time`` (s) and ``entire_frame_compile_time_s`` instead (both
handled); callbacks took no arguments before ``CallbackArgs`` (both handled:
without a compile id the snapshot is matched by thread); the limit was named
``cache_size_limit`` before ``recompile_limit`` (both parsed).

Parenting: the compile span becomes a child of the span active on the
compiling thread (``with h.request(...)`` / ``with h.active(span)``), exported
by that span's handle; with no active span, a root span on the thread's last
used handle, else the first registered handle.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, Status, StatusCode

from agents.torch import context

if TYPE_CHECKING:
    from agents.torch.handle import Handle
    from agents.torch.spans import Span

log = logging.getLogger(__name__)

METRICS_LOGGER = "torch._utils_internal"
CONVERT_FRAME_LOGGER = "torch._dynamo.convert_frame"
RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"

COMPILE_SPAN_NAME = "torch.compile"

_REASON_PREFIX = re.compile(r"^\s*(?:-\s*)?\d+/\d+(?:_\d+)?:\s*", re.M)
_TENSOR_NAME = re.compile(r"tensor '([^']+)'")
_LIMIT = re.compile(r"hit config\.(\w+) \((\d+)\)")
_FUNCTION = re.compile(r"function: '([^']*)' \(([^)]*)\)")
_LAST_REASON = re.compile(r"last reason: (.*)")
_LIMIT_FAIL = ("recompile limit", "cache_size_limit", "recompile_limit", "cache size limit")


@dataclass
class StartSnapshot:
    """What the start hook saw on the compiling thread."""

    thread: int
    span: Span | None
    handle: Handle | None
    start_ns: int
    backend: str | None = None
    inputs: dict[str, list[int]] = field(default_factory=dict)
    input_order: list[str] = field(default_factory=list)


@dataclass
class CompileRecord:
    """One compile, parsed from a ``CompilationMetrics`` record."""

    compile_id: str | None
    frame: str | None
    start_ns: int
    end_ns: int
    kind: str
    reason: str | None
    graph_shapes: dict[str, list[int]] | None
    cache: str
    failure: str | None
    limit_hit: bool
    filename: str | None
    lineno: int | None
    cache_saved_s: float | None = None


def _get(m: Any, name: str) -> Any:
    return getattr(m, name, None)


def clean_reason(text: str | None) -> str | None:
    """``"0/0: tensor 'x' size mismatch ..."`` -> ``"tensor 'x' size mismatch ..."``."""
    if not text:
        return None
    lines = [_REASON_PREFIX.sub("", line).strip() for line in str(text).strip().splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines) or None


def _kind(compile_id: str | None, reason: str | None) -> str:
    if reason:
        return "recompile"
    if compile_id and "/" in compile_id:
        attempt = compile_id.split("/", 1)[1].split("_", 1)[0]
        if attempt.isdigit() and int(attempt) > 0:
            return "recompile"
    return "first"


def _cache(m: Any) -> str:
    """``hit`` when a persistent cache layer served the compiled artifact.

    Layers: the AOTAutograd cache and inductor's FX graph cache, local or
    remote. A layer hits when it counted hits and no misses; measured on 2.13
    with a warm inductor cache after ``torch._dynamo.reset()``: FX graph cache
    1 hit / 0 misses while AOTAutograd counted a miss (inference graphs), and
    the compile took 0.46 s instead of 43 s. Backends without caches (eager)
    count nothing: ``miss``, they really traced.
    """
    for prefix in ("aotautograd", "inductor_fx"):
        hits = misses = 0
        for where in ("local", "remote"):
            hits += _get(m, f"{prefix}_{where}_cache_hit_count") or 0
            misses += _get(m, f"{prefix}_{where}_cache_miss_count") or 0
        if hits > 0 and misses == 0:
            return "hit"
    return "miss"


def _graph_shapes(value: Any) -> dict[str, list[int]] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return value
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return None
    return parsed if isinstance(parsed, dict) else None


def parse_metrics(m: Any) -> CompileRecord | None:
    """A ``CompilationMetrics`` record -> ``CompileRecord`` (None if not a frame compile)."""
    if _get(m, "is_runtime"):  # runtime autotune / cudagraph records: no frame compile
        return None
    start_us = _get(m, "start_time_us")
    end_us = _get(m, "end_time_us")
    duration_us = _get(m, "duration_us")
    if start_us is not None:
        start_ns = int(start_us) * 1000
        if end_us is not None:
            end_ns = int(end_us) * 1000
        elif duration_us is not None:
            end_ns = start_ns + int(duration_us) * 1000
        else:
            return None
    else:  # torch <= 2.5: float seconds
        start_s = _get(m, "start_time")
        total_s = _get(m, "entire_frame_compile_time_s")
        if start_s is None or total_s is None:
            return None
        start_ns = round(start_s * 1e6) * 1000  # microseconds: floats near 1.7e9 s hold no more
        end_ns = start_ns + round(total_s * 1e6) * 1000
    compile_id = _get(m, "compile_id")
    compile_id = str(compile_id) if compile_id is not None else None
    reason = clean_reason(_get(m, "recompile_reason"))
    fail_type = _get(m, "fail_type")
    fail_reason = _get(m, "fail_reason") or ""
    failure = None
    if fail_type:
        failure = f"{fail_type}: {str(fail_reason).strip().splitlines()[0] if fail_reason else ''}".strip()
    limit_hit = bool(fail_type) and any(s in str(fail_reason).lower() for s in _LIMIT_FAIL)
    return CompileRecord(
        compile_id=compile_id,
        frame=_get(m, "co_name"),
        start_ns=start_ns,
        end_ns=max(end_ns, start_ns),
        kind=_kind(compile_id, reason),
        reason=reason,
        graph_shapes=_graph_shapes(_get(m, "graph_node_shapes")),
        cache=_cache(m),
        failure=failure,
        limit_hit=limit_hit,
        filename=_get(m, "co_filename"),
        lineno=_get(m, "co_firstlineno"),
        cache_saved_s=_get(m, "remote_cache_time_saved_s"),
    )


def _graph_key(name: str) -> str:
    """Dynamo's placeholder name for a source name: ``x`` -> ``l_x_``, ``args[0]`` -> ``l_args_0_``."""
    return "l_" + re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_") + "_"


def pick_shape(record: CompileRecord, snap: StartSnapshot | None) -> list[int] | None:
    """The input shape that triggered the compile.

    The tensor named in the guard failure if any, else the first tensor
    argument of the frame (snapshot), else the graph's first input placeholder.
    """
    named = _TENSOR_NAME.search(record.reason or "")
    name = named.group(1) if named else None
    if snap is not None and name is not None and name in snap.inputs:
        return snap.inputs[name]
    shapes = record.graph_shapes or {}
    if name is not None and _graph_key(name) in shapes:
        return list(shapes[_graph_key(name)])
    if snap is not None and snap.input_order:
        return snap.inputs[snap.input_order[0]]
    for key, value in shapes.items():
        if key.startswith("l_") and "_parameters_" not in key and "_buffers_" not in key:
            if isinstance(value, (list, tuple)):
                return list(value)
    return None


def _backend_name(compiler_fn: Any) -> str | None:
    fn = compiler_fn
    for _ in range(16):
        name = getattr(fn, "compiler_name", None)
        if isinstance(name, str):
            return name
        inner = getattr(fn, "_torchdynamo_orig_backend", None)
        if inner is None:
            break
        fn = inner
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else None


def _tensor_inputs(frame_locals: dict[str, Any], code: Any) -> tuple[dict[str, list[int]], list[str]]:
    """Shapes of the compiled frame's tensor arguments, in argument order."""
    import torch

    names = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]) if code else []
    if code is not None and code.co_flags & 0x04:  # *args
        names.append(code.co_varnames[code.co_argcount + code.co_kwonlyargcount])
    inputs: dict[str, list[int]] = {}
    order: list[str] = []
    for name in names or list(frame_locals):
        value = frame_locals.get(name)
        if isinstance(value, torch.Tensor):
            inputs[name] = list(value.shape)
            order.append(name)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value[:8]):
                if isinstance(item, torch.Tensor):
                    key = f"{name}[{i}]"
                    inputs[key] = list(item.shape)
                    order.append(key)
    return inputs, order


def _inspect_compile_frame() -> tuple[str | None, dict[str, list[int]], list[str]]:
    """Walk up to ``convert_frame._compile`` and read the backend and inputs."""
    f = sys._getframe(2)
    depth = 0
    while f is not None and depth < 64:
        code = f.f_code
        if code.co_name == "_compile" and code.co_filename.endswith("convert_frame.py"):
            loc = f.f_locals
            backend = _backend_name(loc.get("compiler_fn"))
            frame_locals = loc.get("locals")
            frame = loc.get("frame")
            if frame_locals is None and frame is not None:
                frame_locals = getattr(frame, "f_locals", None)
            if isinstance(frame_locals, dict):
                inputs, order = _tensor_inputs(frame_locals, loc.get("code"))
            else:
                inputs, order = {}, []
            return backend, inputs, order
        f = f.f_back
        depth += 1
    return None, {}, []


def parse_limit_warning(message: str) -> dict[str, Any] | None:
    """The recompile-limit WARNING text -> frame, location, limit, reason."""
    m = _LIMIT.search(message)
    if not m:
        return None
    out: dict[str, Any] = {"limit_type": m.group(1), "limit": int(m.group(2))}
    fm = _FUNCTION.search(message)
    if fm:
        out["frame"] = fm.group(1)
        out["location"] = fm.group(2)
    rm = _LAST_REASON.search(message)
    if rm:
        out["reason"] = clean_reason(rm.group(1))
    return out


class _Filter(logging.Filter):
    """Sees every record of one torch logger; passes only what passed before."""

    def __init__(self, watcher: CompileWatcher, logger: logging.Logger, prior_level: int) -> None:
        super().__init__()
        self.watcher = watcher
        self.logger = logger
        self.prior_level = prior_level

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self.watcher._on_log(self.logger.name, record)
        except Exception:  # never break torch because telemetry failed
            log.debug("tailscope compile hook failed", exc_info=True)
        threshold = self.prior_level or (self.logger.parent.getEffectiveLevel() if self.logger.parent else 0)
        return record.levelno >= threshold


class CompileWatcher:
    """Process-wide: torch's hooks are global, handles are many."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._handles: list[Handle] = []
        self._installed = False
        self._filters: list[tuple[logging.Logger, _Filter, int]] = []
        self._snapshots: OrderedDict[str, StartSnapshot] = OrderedDict()
        self._thread_snapshot: dict[int, StartSnapshot] = {}
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._last_recompile_reason: dict[int, str] = {}
        self._needs_recompiles_log = False
        self.emitted = 0
        self.limit_events = 0

    # -- registration ------------------------------------------------------
    def register(self, handle: Handle) -> None:
        with self._lock:
            if handle not in self._handles:
                self._handles.append(handle)
            if not self._installed:
                self._install()
            self._ensure_callbacks()

    def unregister(self, handle: Handle) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)
            if not self._handles and self._installed:
                self._uninstall()

    def _install(self) -> None:
        import torch._dynamo  # noqa: F401  (registers the loggers below)

        self._mark_existing_seen()
        try:
            from torch._dynamo.utils import CompilationMetrics
            import dataclasses

            fields = {f.name for f in dataclasses.fields(CompilationMetrics)}
            self._needs_recompiles_log = "recompile_reason" not in fields
        except Exception:
            self._needs_recompiles_log = True
        targets = [(METRICS_LOGGER, logging.INFO), (CONVERT_FRAME_LOGGER, logging.WARNING)]
        if self._needs_recompiles_log:
            targets.append((RECOMPILES_LOGGER, logging.DEBUG))
        for name, level in targets:
            logger = logging.getLogger(name)
            prior = logger.level
            filt = _Filter(self, logger, prior)
            logger.addFilter(filt)
            if logger.getEffectiveLevel() > level:
                logger.setLevel(level)
            self._filters.append((logger, filt, prior))
        self._installed = True

    def _uninstall(self) -> None:
        for logger, filt, prior in self._filters:
            logger.removeFilter(filt)
            logger.setLevel(prior)
        self._filters.clear()
        self._remove_callbacks()
        self._installed = False

    def _callback_handler(self) -> Any:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # torch without compile callbacks: log path only
            return None
        return callback_handler

    def _ensure_callbacks(self) -> None:
        handler = self._callback_handler()
        if handler is None:
            return
        starts = getattr(handler, "start_callbacks", None)
        if starts is not None and self._on_start not in starts:
            handler.register_start_callback(self._on_start)
        ends = getattr(handler, "end_callbacks", None)
        if ends is not None and self._on_end not in ends:
            handler.register_end_callback(self._on_end)

    def _remove_callbacks(self) -> None:
        handler = self._callback_handler()
        if handler is None:
            return
        for remove, cb in (
            (getattr(handler, "remove_start_callback", None), self._on_start),
            (getattr(handler, "remove_end_callback", None), self._on_end),
        ):
            try:
                if remove is not None:
                    remove(cb)
            except ValueError:
                pass

    def _mark_existing_seen(self) -> None:
        for m in self._existing_metrics():
            self._seen_add(_record_key(m))

    @staticmethod
    def _existing_metrics() -> list[Any]:
        try:
            from torch._dynamo.utils import get_compilation_metrics
        except ImportError:
            return []
        try:
            return list(get_compilation_metrics())
        except Exception:
            return []

    def _seen_add(self, key: tuple) -> bool:
        """True when ``key`` is new."""
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)
        return True

    # -- hooks -------------------------------------------------------------
    def _target(self, span: Span | None) -> Handle | None:
        if span is not None and span._handle in self._handles:
            return span._handle
        last = context.last_handle()
        if last is not None and last in self._handles:
            return last  # type: ignore[return-value]
        return self._handles[0] if self._handles else None

    def _on_start(self, *args: Any) -> None:
        try:
            compile_id = str(args[0].compile_id) if args and hasattr(args[0], "compile_id") else None
            span = context.current()
            backend, inputs, order = _inspect_compile_frame()
            snap = StartSnapshot(
                thread=threading.get_ident(),
                span=span,
                handle=self._target(span),
                start_ns=time.time_ns(),
                backend=backend,
                inputs=inputs,
                input_order=order,
            )
            with self._lock:
                if compile_id is not None:
                    self._snapshots[compile_id] = snap
                    while len(self._snapshots) > 256:
                        self._snapshots.popitem(last=False)
                self._thread_snapshot[snap.thread] = snap
            self.poll()
        except Exception:
            log.debug("tailscope compile start hook failed", exc_info=True)

    def _on_end(self, *args: Any) -> None:
        try:
            self.poll()
        except Exception:
            log.debug("tailscope compile end hook failed", exc_info=True)

    def _on_log(self, logger_name: str, record: logging.LogRecord) -> None:
        if logger_name == METRICS_LOGGER:
            self._ensure_callbacks()  # survive torch._dynamo.reset()
            if record.args and isinstance(record.args, tuple):
                m = record.args[0]
                if hasattr(m, "compile_id") and hasattr(m, "co_name"):
                    self._handle_metrics(m, live=True)
        elif logger_name == CONVERT_FRAME_LOGGER:
            if record.levelno >= logging.WARNING:
                info = parse_limit_warning(record.getMessage())
                if info is not None:
                    self._emit_limit(info, record.created)
        elif logger_name == RECOMPILES_LOGGER:
            text = record.getMessage()
            if "guard failure" in text:
                reason = text.split("guard failure(s):", 1)[-1]
                cleaned = clean_reason(reason)
                if cleaned:
                    self._last_recompile_reason[threading.get_ident()] = cleaned

    def poll(self) -> None:
        """Emit records the log path did not deliver (it may be switched off)."""
        with self._lock:
            if not self._handles:
                return
            pending = [m for m in self._existing_metrics() if _record_key(m) not in self._seen]
        for m in pending:
            self._handle_metrics(m, live=False)

    def _handle_metrics(self, m: Any, live: bool) -> None:
        with self._lock:
            if not self._handles or not self._seen_add(_record_key(m)):
                return
            record = parse_metrics(m)
            if record is None or record.limit_hit:
                return  # the limit is reported by its WARNING as its own event
            thread = threading.get_ident()
            snap = None
            if record.compile_id is not None:
                snap = self._snapshots.pop(record.compile_id, None)
            if snap is None and live:
                candidate = self._thread_snapshot.get(thread)
                if candidate is not None and candidate.start_ns <= record.end_ns:
                    snap = candidate
            if snap is not None and self._thread_snapshot.get(snap.thread) is snap:
                del self._thread_snapshot[snap.thread]
            if record.reason is None and self._needs_recompiles_log:
                text = self._last_recompile_reason.pop(snap.thread if snap else thread, None)
                if text:
                    record.reason = text
                    record.kind = "recompile"
            if snap is not None:
                span, handle = snap.span, snap.handle
            elif live:
                span = context.current()
                handle = self._target(span)
            else:
                span, handle = None, self._target(None)
            if span is not None and handle is not span._handle:
                span = None
        if handle is None:
            return
        self._emit_compile(handle, span, record, snap)

    def _emit_compile(self, handle: Handle, parent: Span | None, record: CompileRecord, snap: StartSnapshot | None) -> None:
        from agents.torch.spans import Span

        shape = pick_shape(record, snap)
        attrs: dict[str, Any] = {
            "tailscope.role": "compile",
            "tailscope.compile.backend": (snap.backend if snap and snap.backend else "unknown"),
            "tailscope.compile.kind": record.kind,
            "tailscope.compile.cache": record.cache,
        }
        if record.reason:
            attrs["tailscope.compile.reason"] = record.reason
        if record.frame:
            attrs["tailscope.compile.frame"] = record.frame
        if shape is not None:
            attrs["tailscope.compile.shape"] = json.dumps(shape)
        if record.compile_id:
            attrs["tailscope.compile.id"] = record.compile_id
        if record.filename:
            attrs["code.filepath"] = record.filename
        if record.lineno is not None:
            attrs["code.lineno"] = int(record.lineno)
        if record.failure:
            attrs["tailscope.compile.failure"] = record.failure
        if isinstance(record.cache_saved_s, (int, float)) and record.cache == "hit":
            attrs["tailscope.compile.cache_saved_s"] = float(record.cache_saved_s)
        span = Span(handle, COMPILE_SPAN_NAME, SpanKind.INTERNAL, parent, attrs, record.start_ns)
        if record.failure:
            span.status = Status(StatusCode.ERROR, record.failure[:512])
        span.end_ns = record.end_ns
        handle._export_span(span)
        self.emitted += 1

    def _emit_limit(self, info: dict[str, Any], created: float) -> None:
        from agents.torch.handle import EVENT_COMPILE_LIMIT
        from opentelemetry._logs import SeverityNumber

        with self._lock:
            span = context.current()
            handle = self._target(span)
        if handle is None:
            return
        attrs: dict[str, Any] = {
            "tailscope.compile.limit": info["limit"],
            "tailscope.compile.limit_type": info["limit_type"],
        }
        if info.get("frame"):
            attrs["tailscope.compile.frame"] = info["frame"]
        if info.get("location"):
            attrs["code.location"] = info["location"]
        if info.get("reason"):
            attrs["tailscope.compile.reason"] = info["reason"]
        body = (
            f"torch.compile hit {info['limit_type']} ({info['limit']}) for "
            f"{info.get('frame') or 'a frame'}; it now runs eager"
        )
        handle._emit_event(
            EVENT_COMPILE_LIMIT,
            attrs,
            int(created * 1e9),
            span=span if span is not None and span._handle is handle else None,
            severity=SeverityNumber.WARN,
            body=body,
        )
        self.limit_events += 1


def _record_key(m: Any) -> tuple:
    return (
        str(_get(m, "compile_id")),
        _get(m, "start_time_us") or _get(m, "start_time"),
        _get(m, "co_name"),
        id(m),
    )


_watcher: CompileWatcher | None = None
_watcher_lock = threading.Lock()


def watcher() -> CompileWatcher:
    """The process's one compile watcher (created on first use)."""
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = CompileWatcher()
        return _watcher
