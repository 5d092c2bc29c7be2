"""Frontier geometry and the bootstrap, on hand-made points."""

import numpy as np
import pytest

from filtered_rl.evaluation.frontiers import bootstrap_se, compare_at_matched_pass1, upper_frontier, value_at


def test_upper_frontier_drops_points_under_a_chord():
    points = [(0.1, 0.5), (0.3, 0.55), (0.2, 0.8), (0.5, 0.9), (0.4, 0.6)]
    assert upper_frontier(points) == [(0.1, 0.5), (0.2, 0.8), (0.5, 0.9)]
    assert upper_frontier([(0.3, 0.4)]) == [(0.3, 0.4)]
    collinear = upper_frontier([(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
    assert collinear == [(0.0, 0.0), (1.0, 1.0)]  # the middle point adds nothing a mixture cannot reach


def test_value_at_interpolates_inside_and_refuses_outside():
    frontier = [(0.1, 0.5), (0.2, 0.8), (0.5, 0.9)]
    assert value_at(frontier, 0.15) == pytest.approx(0.65)
    assert value_at(frontier, 0.5) == pytest.approx(0.9)
    assert value_at(frontier, 0.05) is None and value_at(frontier, 0.6) is None


def test_matched_comparison_covers_the_overlap_only():
    a = [(0.1, 0.5), (0.5, 0.9)]
    b = [(0.3, 0.6), (0.7, 0.8)]
    rows = compare_at_matched_pass1(a, b, num=3)
    assert [x for x, _, _ in rows] == pytest.approx([0.3, 0.4, 0.5])
    assert rows[0][1] == pytest.approx(0.7) and rows[0][2] == pytest.approx(0.6)
    assert compare_at_matched_pass1([(0.1, 0.1), (0.2, 0.2)], [(0.5, 0.5), (0.6, 0.6)]) == []


def test_bootstrap_se_matches_the_analytic_one_for_iid_prompts():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, size=(1, 400))
    se = bootstrap_se(values, num_resamples=2000, seed=2)
    assert se == pytest.approx(values.std(ddof=1) / np.sqrt(400), rel=0.1)
    spread_seeds = np.array([[0.0] * 50, [1.0] * 50, [2.0] * 50])  # all the variation is across seeds
    assert bootstrap_se(spread_seeds, num_resamples=2000) > 0.3
    assert bootstrap_se(np.full((3, 10), 0.5)) == 0.0
