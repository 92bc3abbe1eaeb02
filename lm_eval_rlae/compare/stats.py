"""Intervals for accuracies over documents: one method (Wilson), and two methods on the same
documents (a paired bootstrap, stratified by task)."""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP = 2000


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion p over n documents."""
    if n <= 0:
        return (float("nan"), float("nan"))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_interval(a: dict, b: dict, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean over tasks of a - b ({task: {document: score}} each), with a 95% paired bootstrap
    interval (documents resampled within tasks)."""
    diffs = [np.array([a[t][k] - b[t][k] for k in a[t]]) for t in a]
    point = float(np.mean([d.mean() for d in diffs]))
    draws = np.mean([d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(1) for d in diffs], axis=0)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)
