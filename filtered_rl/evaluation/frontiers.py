"""Frontiers of a family of runs in a (pass@1, metric) plane, and comparisons at matched pass@1.

A method family (e.g. GRPO with β swept) traces points (pass@1, pass@256) as its knob moves. Any mixture
of two trained models (pick one per prompt at random) reaches every point on the segment between them,
so what a family *can* reach is the upper concave envelope of its points: `upper_frontier`. Families are
compared where both frontiers exist, by linear interpolation at the same pass@1 (`value_at`,
`compare_at_matched_pass1`). Pure numpy, so that it can be tested exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def upper_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper concave envelope of (x, y) points, sorted by x (Andrew's monotone chain, upper half).

    Only points that are not below a segment between two others remain, so the envelope is what mixing
    the runs can reach. One point is its own frontier.
    """
    pts = sorted({(float(x), float(y)) for x, y in points})
    hull: list[tuple[float, float]] = []
    for p in pts:
        # pop while the last two points and p make a non-right turn (the middle one lies below the chord)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def value_at(frontier: Sequence[tuple[float, float]], x: float) -> float | None:
    """The frontier's y at pass@1 = x by linear interpolation; None outside its x range."""
    xs = [p[0] for p in frontier]
    if not frontier or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    return float(np.interp(x, xs, [p[1] for p in frontier]))


def compare_at_matched_pass1(
    frontier_a: Sequence[tuple[float, float]], frontier_b: Sequence[tuple[float, float]], num: int = 5
) -> list[tuple[float, float, float]]:
    """(x, y_a, y_b) at `num` pass@1 values spread over the range both frontiers cover (empty if disjoint)."""
    low = max(frontier_a[0][0], frontier_b[0][0])
    high = min(frontier_a[-1][0], frontier_b[-1][0])
    if low > high:
        return []
    grid = [low] if high - low < 1e-12 else list(np.linspace(low, high, num))
    return [(float(x), value_at(frontier_a, x), value_at(frontier_b, x)) for x in grid]


def bootstrap_se(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of the grand mean of a (seeds × prompts) matrix, resampling seeds and prompts.

    Both sources of variation count: training seeds (which run) and evaluation prompts (which questions).
    A 1-D input is one seed.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    seeds, prompts = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples)
    for i in range(num_resamples):
        rows = rng.integers(0, seeds, seeds)
        cols = rng.integers(0, prompts, prompts)
        means[i] = values[np.ix_(rows, cols)].mean()
    return float(means.std(ddof=1))
