"""The span active on each thread, for parenting compile spans.

torch.compile's hooks fire on the compiling thread and know nothing about
requests. ``with h.request(...)`` and ``with h.active(span)`` push the span on
a per-thread stack; the compile watcher reads the top of that stack on the
compiling thread. This is tailscope's own stack, not the OpenTelemetry
context: attaching an OTel context per request costs several microseconds
and would make unrelated libraries' spans nest under ours.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents.torch.spans import Span

_local = threading.local()


def _stack() -> list[Span]:
    try:
        return _local.stack
    except AttributeError:
        _local.stack = []
        return _local.stack


def push(span: Span) -> None:
    _stack().append(span)
    _local.last_handle = span._handle


def pop(span: Span) -> None:
    stack = _stack()
    # Normally the top; tolerate out-of-order exits rather than corrupt the stack.
    if stack and stack[-1] is span:
        stack.pop()
    else:
        try:
            stack.remove(span)
        except ValueError:
            pass


def current() -> Span | None:
    """The innermost span made active on this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def last_handle() -> object | None:
    """The handle whose span was last made active on this thread, if any."""
    return getattr(_local, "last_handle", None)
