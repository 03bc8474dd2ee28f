"""The padding buckets that minimise padded tokens for a length distribution.

Exact dynamic programming over the distinct lengths: choosing k bucket upper
bounds among the observed lengths (the longest must be one) so that the sum of
each request's padded length is least. O(k·n²) with numpy over n ≤ 1024
distinct values (lengths are coarsened beyond that), a few milliseconds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_DISTINCT = 1024


def optimal_buckets(lengths: Sequence[int], counts: Sequence[int], k: int) -> tuple[list[int], int]:
    """Best ``k`` bucket bounds for ``lengths`` (each seen ``counts`` times).

    Returns:
        (bounds ascending, padded tokens they give).
    """
    L = np.asarray(lengths, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    order = np.argsort(L)
    L, c = L[order], c[order]
    if len(L) > MAX_DISTINCT:
        # Coarsen: round lengths up onto a grid so the DP stays small; bounds
        # stay valid (every length still fits its bucket).
        grid = int(np.ceil(L[-1] / MAX_DISTINCT))
        Lg = np.ceil(L / grid) * grid
        uniq, inv = np.unique(Lg, return_inverse=True)
        cg = np.zeros(len(uniq))
        np.add.at(cg, inv, c)
        L, c = uniq, cg
    n = len(L)
    if n == 0:
        return [], 0
    k = max(1, min(k, n))
    C = np.concatenate([[0.0], np.cumsum(c)])
    inf = np.inf
    # dp[j]: least cost covering values 0..j with the current number of buckets, last bucket ending at j
    dp = L * C[1:]
    choice = [np.zeros(n, dtype=np.int64)]
    for _ in range(1, k):
        new = np.full(n, inf)
        arg = np.zeros(n, dtype=np.int64)
        for j in range(n):
            # last bucket covers i..j (i >= 1), previous buckets cover 0..i-1
            if j == 0:
                continue
            i = np.arange(1, j + 1)
            cost = dp[i - 1] + L[j] * (C[j + 1] - C[i])
            m = int(np.argmin(cost))
            new[j], arg[j] = cost[m], i[m]
        better = new < dp
        dp = np.where(better, new, dp)
        choice.append(np.where(better, arg, -1))
    # Walk back from the last value.
    bounds = []
    j = n - 1
    for level in range(len(choice) - 1, -1, -1):
        bounds.append(int(L[j]))
        i = int(choice[level][j]) if level > 0 else 0
        if level == 0 or i <= 0:
            # bucket starts at 0 (possibly fewer than k buckets were better)
            if level > 0 and i == -1:
                continue
            break
        j = i - 1
    bounds = sorted(set(bounds))
    padded = _padded(L, c, bounds)
    return bounds, int(padded)


def _padded(L: np.ndarray, c: np.ndarray, bounds: list[int]) -> float:
    b = np.asarray(bounds, dtype=np.float64)
    idx = np.searchsorted(b, L, side="left")
    idx = np.minimum(idx, len(b) - 1)
    return float((b[idx] * c).sum())


def padded_tokens(lengths: Sequence[int], counts: Sequence[int], bounds: Sequence[int]) -> int:
    return int(_padded(np.asarray(lengths, float), np.asarray(counts, float), sorted(bounds)))
