"""Synthetic NHS number stems: a population of valid stems and random cohorts."""

from __future__ import annotations

import numpy as np

from contracts.cohort import check_digits, sorted_unique

BASE = 400_000_000


def valid(stems: np.ndarray) -> np.ndarray:
    return stems[check_digits(stems) >= 0]


def random_stems(rng: np.random.Generator, count: int, span: int = 72_000_000) -> np.ndarray:
    """About ``count`` distinct valid stems from a ~65M-patient range, sorted."""
    out = np.empty(0, dtype=np.int64)
    while len(out) < count:
        draw = valid(rng.integers(BASE, BASE + span, int((count - len(out)) * 1.15) + 100))
        out = sorted_unique(np.concatenate([out, draw]))
    if len(out) > count:
        out = np.sort(out[rng.permutation(len(out))[:count]])
    return out
