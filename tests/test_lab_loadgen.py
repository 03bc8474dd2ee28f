"""Load generators and the provider stub, on the real public traces."""

from __future__ import annotations

import random
import statistics
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lab.loadgen import LengthSampler, azure_replay, azure_rows, diurnal, mooncake_rows, poisson, scale_lengths
from lab.provider import Provider
from lab.scenarios import CATALOG, build


def test_azure_trace_is_read_in_order_with_its_lengths(shared_data: Path) -> None:
    rows = azure_rows(shared_data)
    assert len(rows) == 19366
    assert rows[0][0] == 0.0 and all(a[0] <= b[0] for a, b in zip(rows, rows[1:]))
    assert 58 * 60 < rows[-1][0] < 59 * 60
    shapes = LengthSampler(rows).shapes
    assert all(8 <= s.prompt <= 480 and 2 <= s.output <= 96 for s in shapes)
    replay = list(azure_replay(rows, 100.0, 60.0, speed=10.0))
    assert replay and all(100.0 <= t < 160.0 for t, _ in replay)


def test_mooncake_trace_has_prefix_hashes(shared_data: Path) -> None:
    rows = mooncake_rows(shared_data)
    assert len(rows) == 3993
    assert all(len(h) == -(-inp // 512) for _, inp, _, h in rows[:200])


def test_missing_trace_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="azure-llm-2023"):
        azure_rows(tmp_path)


def test_poisson_rate_and_bounds() -> None:
    ts = poisson(5.0, 10.0, 1010.0, random.Random(1))
    assert 4500 < len(ts) < 5500
    assert all(10.0 <= t < 1010.0 for t in ts)
    with pytest.raises(ValueError, match="rate"):
        poisson(0, 0, 1, random.Random(1))


def test_diurnal_arrivals_peak_where_the_sine_peaks() -> None:
    day = 86400.0
    ts = diurnal(0.05, 0.8, day, 0.0, day, random.Random(2))
    first_quarter = sum(1 for t in ts if t < day / 2)
    assert first_quarter > 2 * (len(ts) - first_quarter)


def test_length_scaling_clips() -> None:
    assert scale_lengths(14050, 1000).prompt == 480
    assert scale_lengths(1, 1).output == 2


def test_provider_latency_follows_its_local_hour_across_dst() -> None:
    p = Provider()
    for month in (1, 7):  # EST and EDT: the peak stays at 13:00 New York time
        peak = datetime(2026, month, 15, 13, 0, tzinfo=ZoneInfo(p.region)).timestamp()
        night = datetime(2026, month, 15, 3, 0, tzinfo=ZoneInfo(p.region)).timestamp()
        assert p.load(peak) == pytest.approx(p.peak)
        assert p.load(night) == pytest.approx(1.0, abs=1e-3)
    a, b = p.busy_hours_utc(datetime(2026, 1, 15, 12, tzinfo=ZoneInfo(p.region)).timestamp())
    local = datetime.fromtimestamp(a, ZoneInfo(p.region))
    # load > 1.5 within 2.5 h x sqrt(2 ln 4) = 4.16 h of the 13:00 peak
    assert local.hour == 8 and (b - a) / 3600 == pytest.approx(8.33, abs=0.1)
    rng = random.Random(0)
    lat = [p.latency(peak, 50, rng) for _ in range(500)]
    assert statistics.median(lat) == pytest.approx((p.base_s + 50 * p.per_token_s) * p.peak, rel=0.05)


def test_every_catalog_scenario_builds_with_its_injections(shared_data: Path) -> None:
    for name in CATALOG:
        scn = build(name, data_dir=shared_data)
        assert len(scn.requests) >= 3000, name
        assert len({r.rid for r in scn.requests}) == len(scn.requests)
        assert (scn.injections == []) == name.startswith("control")
    with pytest.raises(ValueError, match="unknown scenario"):
        build("nope")
