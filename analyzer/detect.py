"""Spike detection: which windows of a service's p99 are abnormal.

Works on per-window aggregates (a few thousand rows a day), never on request
rows. The baseline is robust (median and MAD of recent normal windows' p99,
and the same hour of earlier days when the data has them), so ordinary
heavy-tailed noise moves neither the centre nor the spread much; a spike must
clear both a statistical margin and a relative one, on enough samples, and
hysteresis (open high, close low) keeps one incident from flapping into many.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Why these numbers: a window's p99 over >= 30 requests of lognormal(σ≈1)
# traffic wanders about ±30 % around its median; 6 robust sigmas and 1.5x
# keeps such noise out, while a stall that slows 2 % of requests by several
# times the usual latency clears both easily. Closing at 3 sigmas / 1.2x
# needs the p99 back near normal before the incident ends.
MIN_COUNT = 30
P99_MIN_COUNT = 100  # below this a window's "p99" is its max or near it: too noisy to open on
HISTORY_WINDOWS = 60
MIN_HISTORY = 8
OPEN_SIGMAS = 6.0
CLOSE_SIGMAS = 3.0
OPEN_RATIO = 1.5
CLOSE_RATIO = 1.2
CLOSE_AFTER = 2  # consecutive normal windows before an incident closes (one dip does not split it)
SCALE_FLOOR = 0.05  # of the median: p99s of very regular traffic still get some slack
DAY_S = 86_400
COARSE = 10  # fine windows per window of the share signal's second, coarser look (see _coarse_share_spikes)


@dataclass
class Spike:
    """A run of abnormal windows (indices into the window arrays)."""

    first: int
    last: int
    peak_p99: float
    baseline_p99: float
    threshold: float
    by_slo: bool
    windows: list[int] = field(default_factory=list)
    tentative: bool = False  # opened by the class-slow share alone: needs the next window to confirm it
    share_base: float = 0.0  # the share of class-slow requests it was judged against


@dataclass
class Baseline:
    median: float
    scale: float
    dispersion: float = 1.0  # variance of slow counts over the binomial's (share baselines only)

    def open_threshold(self) -> float:
        return max(self.median + OPEN_SIGMAS * self.scale, OPEN_RATIO * self.median)

    def close_threshold(self) -> float:
        return max(self.median + CLOSE_SIGMAS * self.scale, CLOSE_RATIO * self.median)


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def robust(values: "np.ndarray | list[float]") -> Baseline:
    """Median and MAD-based scale (pure Python: called per window on ~60 values)."""
    vals = sorted(map(float, values))
    med = _median(vals)
    mad = _median(sorted([abs(v - med) for v in vals]))
    return Baseline(med, max(1.4826 * mad, SCALE_FLOOR * med, 1e-3))


DISPERSION_MAX = 16.0


def share_baseline(share: list[float], slow: Sequence[int], count: Sequence[int], idx: list[int], dispersion: bool = True) -> Baseline:
    """Median and MAD of the class-slow shares of windows ``idx``, and how overdispersed their counts are.

    Slow requests come in clusters, not one by one: a long request or a
    stall holds a replica's slots, and the requests queued behind it are slow
    together. So the count of slow requests per window varies more than the
    binomial of independent requests says, the more so the fewer slots a
    replica has (low traffic). The dispersion (observed variance of the
    counts around ``n p`` over the binomial variance, at least 1) widens the
    noise band accordingly; it is measured on the same normal windows. A
    variance is not robust to the spike itself, so windows that may contain
    it (the warm-up's windows on both sides) get ``dispersion=False``.
    """
    base = robust([share[j] for j in idx])
    if not dispersion:
        return base
    # Pearson's estimate: the counts' squared deviations from their mean rate, over the binomial's
    # (integer sums are exact, as the float sums were; each term is the same float expression)
    p = float(sum([slow[j] for j in idx])) / max(1.0, float(sum([count[j] for j in idx])))
    q = 1.0 - p
    num = sum([(slow[j] - count[j] * p) ** 2 for j in idx])
    den = sum([count[j] * p * q for j in idx])
    if den > 0 and len(idx) > 1:
        # Of independent requests, num / den would be about 1 ± sqrt(2 / (k - 1)) (chi-square
        # over its degrees of freedom): only the excess beyond two of those counts as clustering,
        # so a short history's chance scatter does not blunt the signal.
        noise = 2.0 * (2.0 / (len(idx) - 1)) ** 0.5
        base.dispersion = min(DISPERSION_MAX, max(1.0, num / den - noise))
    return base


def detect(
    t: np.ndarray,
    count: np.ndarray,
    p99: np.ndarray,
    *,
    step_s: int,
    slo_ms: float | None = None,
    min_count: int = MIN_COUNT,
    slow: np.ndarray | None = None,
    top: list[list[float]] | None = None,
    coarse: int = COARSE,
) -> list[Spike]:
    """Find spikes in one service's window series.

    Args:
        t: window start, unix seconds, ascending.
        count: requests per window.
        p99: p99 latency (ms) per window.
        step_s: window width in seconds.
        slo_ms: optional p99 objective; above it is abnormal whatever the baseline.
        min_count: windows with fewer requests neither open nor feed the baseline.
        slow: optional count per window of requests over *their class's* normal
            (see ``baseline``). The service p99 is dominated by long requests,
            so a stall that hits short ones may not move it; the share of
            class-slow requests moves. Either signal opens an incident.
        top: optional, per window, its largest latencies (descending; at least
            the top 1 %): the p99 opens an incident only when significantly
            more than the usual 1 % of the window exceed the baseline p99.
        coarse: the share signal is also judged on windows this many times
            wider (``_coarse_share_spikes``); 1 turns that off.

    Returns:
        spikes in time order; the loop runs over windows (aggregates), not requests.
    """
    n = len(t)
    valid = count >= min_count
    if not valid.any():
        return []
    fallback = robust(p99[valid])
    share_arr = slow / np.maximum(count, 1) if slow is not None else None
    share = share_arr.tolist() if share_arr is not None else None
    # The loop reads single elements thousands of times: Python lists, not numpy scalars.
    p99l = p99.tolist()
    tl = t.tolist()
    cl = count.tolist()
    sl = slow.tolist() if slow is not None else []
    validl = valid.tolist()
    valid_idx = [int(j) for j in np.flatnonzero(valid)]
    share_fallback = share_baseline(share, sl, cl, valid_idx, dispersion=False) if share is not None else None
    normal: list[int] = []  # indices of valid windows judged normal, in order
    by_hour: dict[int, list[int]] = {}
    spikes: list[Spike] = []
    unconfirmed: list[int] = []  # windows whose share opened an incident the next window did not confirm
    quiet: list[int] = []
    current: Spike | None = None
    frozen: Baseline | None = None
    sfrozen: Baseline | None = None
    sbase: Baseline | None = None
    hour = ((t % DAY_S) // 3600).astype(int).tolist()
    span_days = (t[-1] - t[0]) / DAY_S if n else 0
    horizon = HISTORY_WINDOWS * step_s
    for i in range(n):
        if not validl[i]:
            continue
        ti = tl[i]
        if current is not None and frozen is not None:
            base, sbase = frozen, sfrozen
        else:
            # Recent normal windows, and only recent ones: after a gap in the data
            # (a replica pool idle overnight, a re-deploy) old windows are stale.
            hist = [j for j in normal[-HISTORY_WINDOWS:] if ti - tl[j] <= horizon]
            if len(hist) >= MIN_HISTORY:
                base = robust([p99l[j] for j in hist])
                if share is not None:
                    sbase = share_baseline(share, sl, cl, hist)
            else:
                # Warm-up: too little history yet; judge against the windows
                # around this one (both sides), a robust median of which a
                # spike of a few windows cannot move.
                near = [j for j in valid_idx if abs(tl[j] - ti) <= horizon]
                base = robust([p99l[j] for j in near]) if len(near) >= 3 else fallback
                if share is not None:
                    sbase = share_baseline(share, sl, cl, near, dispersion=False) if len(near) >= 3 else share_fallback
            if span_days >= 1:
                same = [j for j in by_hour.get(hour[i], [])[-4 * HISTORY_WINDOWS:] if ti - tl[j] >= DAY_S - 3600]
                if len(same) >= MIN_HISTORY:
                    day = robust([p99l[j] for j in same])
                    if day.median > base.median:
                        base = day
        v = p99l[i]
        over_slo = slo_ms is not None and v > slo_ms
        s_open = s_keep = False
        if share is not None and sbase is not None:
            s_open, s_keep = _share_state(share[i], sl[i], cl[i], sbase)
        if current is None:
            # The p99 of a window of a few hundred requests is one of its few
            # largest values: two or three outliers of a heavy tail move it.
            # An incident makes more requests slower than the usual p99 than
            # the usual 1 % (a binomial count, judged like the share signal),
            # so the p99 opens one only with that many of them behind it.
            p99_open = v > base.open_threshold() and cl[i] >= P99_MIN_COUNT and (top is None or _above(top[i], base.median) >= p99_support(cl[i]))
            if p99_open or over_slo or s_open:
                current = Spike(i, i, v, base.median, base.open_threshold(), over_slo, [i],
                                tentative=not (p99_open or over_slo), share_base=sbase.median if sbase else 0.0)
                frozen, sfrozen = base, sbase
            else:
                normal.append(i)
        else:
            if v > base.close_threshold() or over_slo or s_keep:
                current.last = i
                current.windows.append(i)
                current.peak_p99 = max(current.peak_p99, v)
                current.by_slo = current.by_slo or over_slo
                current.tentative = False
                quiet = []
            elif current.tentative:
                # One window's cluster of slow requests that the next window does not
                # continue is queueing noise (one long request holding a replica's
                # slots), not an incident: both windows are normal history, so the
                # dispersion learns such clusters.
                normal.extend(current.windows + [i])
                unconfirmed.append(current.first)
                current, frozen = None, None
                quiet = []
            else:
                quiet.append(i)
                if len(quiet) >= CLOSE_AFTER:
                    spikes.append(current)
                    current, frozen = None, None
                    normal.extend(quiet)
                    quiet = []
        # Every valid window feeds the same-hour history, spiky or not: a pattern
        # that recurs daily is learnt after a day, while a one-off incident is
        # a minority of its hour's windows and leaves the median alone.
        by_hour.setdefault(hour[i], []).append(i)
    if current is not None:
        spikes.append(current)
    if slow is not None and coarse > 1 and unconfirmed:
        wide = _coarse_share_spikes(t, count, slow, step_s, coarse, min_count)
        spikes = _merge_coarse(spikes, wide, unconfirmed, t, count, slow, p99, valid)
    return spikes


def _coarse_share_spikes(t: np.ndarray, count: np.ndarray, slow: np.ndarray, step_s: int, k: int,
                         min_count: int) -> list[tuple[float, float, float]]:
    """The share signal over windows ``k`` times wider: (start, end seconds, baseline share) of its spikes.

    A problem that raises the share of class-slow requests moderately but
    in clusters (a KV squeeze preempting a few requests at a time) may put
    no two consecutive fine windows over the threshold, while every wider
    window is clearly above normal; one long request's cluster, on the
    other hand, is diluted in a wide window. Same rules (history, dispersion,
    confirmation by the next window), the p99 signal left out.
    """
    span = step_s * k
    key = (t // span).astype(np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    c_count = np.bincount(inv, weights=count).astype(np.int64)
    c_slow = np.bincount(inv, weights=slow).astype(np.int64)
    ct = uniq.astype(np.float64) * span
    found = detect(ct, c_count, np.zeros(len(ct)), step_s=span, min_count=min_count * k, slow=c_slow, coarse=1)
    return [(float(ct[sp.first]), float(ct[sp.last]) + span, sp.share_base) for sp in found]


def _merge_coarse(spikes: list[Spike], wide: list[tuple[float, float, float]], unconfirmed: list[int], t: np.ndarray,
                  count: np.ndarray, slow: np.ndarray, p99: np.ndarray, valid: np.ndarray) -> list[Spike]:
    """Add the coarse look's spikes that confirm fine windows nothing else confirmed.

    Each is cut down to its fine windows whose share is elevated (a wide
    window's edges are not the problem's), and kept only if it contains a
    window whose share opened an incident that the next window did not
    confirm: the coarse look rescues intermittent evidence, it does not
    open incidents on a slow drift by itself. Runs that touch merge.
    """
    runs = list(spikes)
    for a, b, p in wide:
        hot = [int(j) for j in np.flatnonzero((t >= a) & (t < b) & valid)
               if slow[j] >= 2 and slow[j] >= SHARE_CLOSE_RATIO * max(p, 1.0 / max(int(count[j]), 1)) * count[j]]
        if not hot or not any(hot[0] <= u <= hot[-1] for u in unconfirmed):
            continue
        idx = [int(j) for j in np.flatnonzero(valid) if hot[0] <= j <= hot[-1]]
        before = [float(p99[j]) for j in np.flatnonzero(valid[: idx[0]])[-HISTORY_WINDOWS:]] or [float(p99[idx[0]])]
        base = robust(before)
        runs.append(Spike(idx[0], idx[-1], max(float(p99[j]) for j in idx), base.median, base.open_threshold(), False, idx))
    runs.sort(key=lambda sp: sp.first)
    out: list[Spike] = []
    for sp in runs:
        if out and sp.first <= out[-1].last + 1:
            last = out[-1]
            last.windows = sorted(set(last.windows) | set(sp.windows))
            last.last = max(last.last, sp.last)
            last.peak_p99 = max(last.peak_p99, sp.peak_p99)
            last.by_slo = last.by_slo or sp.by_slo
        else:
            out.append(sp)
    return out


# A share of class-slow requests is a (overdispersed) binomial proportion: its
# noise is at least sqrt(D p(1-p)/n), whatever the MAD of a quiet history says.
SHARE_OPEN_RATIO = 2.5
SHARE_CLOSE_RATIO = 1.5
SHARE_MIN_SLOW = 5
SHARE_OPEN_SIGMAS = 5.0


def p99_support(n: int) -> float:
    """Requests above the usual p99 a window of ``n`` needs before its p99 can open an incident."""
    usual = 0.01 * n
    return max(SHARE_MIN_SLOW, usual + SHARE_OPEN_SIGMAS * usual ** 0.5)


def _above(top: list[float], threshold: float) -> int:
    """How many of a window's largest latencies (descending) exceed ``threshold``."""
    k = 0
    for x in top:
        if x <= threshold:
            break
        k += 1
    return k


def _share_state(value: float, slow: int, n: int, base: Baseline) -> tuple[bool, bool]:
    p = max(base.median, 1.0 / max(n, 1))
    sd = max(base.scale, (base.dispersion * p * (1 - p) / max(n, 1)) ** 0.5)
    opening = slow >= SHARE_MIN_SLOW and value > p + SHARE_OPEN_SIGMAS * sd and value >= SHARE_OPEN_RATIO * p
    keeping = slow >= 2 and value > p + CLOSE_SIGMAS * sd and value >= SHARE_CLOSE_RATIO * p
    return opening, keeping
