"""The co-located job of the contention scenario is a real CPU-burning process."""

from __future__ import annotations

import time

import psutil

from lab.burner import Burner


def test_burner_really_burns_cpu_and_stops() -> None:
    with Burner() as b:
        b.toggle("contention", True)
        assert b.running
        pid = b._proc.pid  # type: ignore[union-attr]
        proc = psutil.Process(pid)
        deadline = time.monotonic() + 10
        while proc.cpu_times().user < 0.2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.cpu_times().user >= 0.2
        b.toggle("other", False)  # other windows do not touch it
        assert b.running
        b.toggle("contention", False)
        assert not b.running
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
