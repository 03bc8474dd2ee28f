"""A real co-located background job: a process that burns CPU.

The lab runs on CPU, so "another job on the same accelerator" is emulated in
two halves: this real process competes with the lab's forward passes for the
same cores while the contention window is open (the executor's own timings
show it), and ``lab.gpu`` reports the foreign process's GPU memory and compute
that such a job would show in NVML.
"""

from __future__ import annotations

import os
import subprocess
import sys

# Burns CPU; exits by itself when its parent is gone or after 15 minutes, so a
# lab killed without cleanup never leaves it spinning on a shared machine.
_LOOP = """
import os, sys, time
parent = int(sys.argv[1])
deadline = time.monotonic() + 900
x = 0
while True:
    for _ in range(200000):
        x = (x * 1103515245 + 12345) % 2147483648
    if os.getppid() != parent or time.monotonic() > deadline:
        break
"""


class Burner:
    """Start/stop one CPU-burning child process (never more than one)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def toggle(self, what: str, on: bool) -> None:
        """``simulate(on_window=...)`` callback."""
        if what == "contention":
            self.start() if on else self.stop()

    def __enter__(self) -> "Burner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
