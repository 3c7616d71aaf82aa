"""Summaries of repeated runs: mean, sample standard deviation, extremes and the 95% confidence
interval of the mean from Student's t distribution (n - 1 degrees of freedom); fold/seed plans."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """n, mean, std (ddof=1), min, max and the t-interval of the mean. With one value the spread and
    the interval are None (not zero: one run says nothing about the spread)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci95": None, "ci95_halfwidth": None}
    mean = float(x.mean())
    out = {"n": n, "mean": mean, "std": None, "min": float(x.min()), "max": float(x.max()), "ci95": None,
           "ci95_halfwidth": None}
    if n >= 2:
        std = float(x.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
        out.update(std=std, ci95=[mean - half, mean + half], ci95_halfwidth=half)
    return out


def kfold_indices(n: int, k: int, fold: int, seed: int, stratify: Optional[Sequence] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of fold `fold` (0-based) of `k`.

    Each class's indices are shuffled (seeded) and dealt round-robin into the k folds, continuing
    where the previous class stopped, so every example is held out exactly once, fold sizes differ
    by at most one, and each class's count per fold differs by at most one."""
    if not 2 <= k <= n:
        raise ValueError(f"k must be between 2 and {n}, got {k}")
    rng = np.random.default_rng([seed, 7919])
    if stratify is None:
        order = rng.permutation(n)
    else:
        labels = np.asarray(stratify)
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = np.arange(n) % k
    held = np.flatnonzero(assignment == fold)
    return np.flatnonzero(assignment != fold), held
