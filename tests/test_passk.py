"""pass@k estimator, bootstrap intervals and the diversity / coverage / KL metrics (pure math, fast)."""

import itertools
import math

import numpy as np
import pytest

from filtered_rl.evaluation.metrics import (
    answer_entropy,
    coverage,
    distinct_answers,
    filtered_kl,
    sampled_pstar_mass,
)
from filtered_rl.evaluation.passk import (
    bootstrap_ci,
    default_ks,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_matrix,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c valid) that contain a valid sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_stability():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    # the binomials overflow float here; the product form stays exact: C(n-1,k)/C(n,k) = 1 - k/n
    assert pass_at_k(100_000, 1, 1) == pytest.approx(1e-5, rel=1e-9)
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, rel=1e-12)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(
        1 - math.comb(1997, 1000) / math.comb(2000, 1000), rel=1e-9
    )


def test_k_larger_than_n_is_a_clear_error():
    with pytest.raises(ValueError, match=r"k=5 > n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"k=16 > n=8"):
        mean_pass_at_k([8, 8], [1, 2], [1, 16])
    with pytest.raises(ValueError, match="c=9"):
        pass_at_k(8, 9, 1)


def test_mean_pass_at_k_averages_over_prompts():
    means = mean_pass_at_k([4, 4], [0, 2], [1, 2, 4])
    assert means == pytest.approx({1: 0.25, 2: (0 + 5 / 6) / 2, 4: 0.5})
    assert pass_at_k_matrix([4, 4], [0, 2], [1, 4]).shape == (2, 2)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(16) == [1, 2, 4, 8, 16]
    assert default_ks(10) == [1, 2, 4, 8, 10]


def test_bootstrap_ci_contains_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.binomial(1, 0.3, size=(200, 3)).astype(float)
    low, high = bootstrap_ci(values, num_resamples=500, seed=7)
    mean = values.mean(axis=0)
    assert low.shape == high.shape == (3,)
    assert np.all(low < mean) and np.all(mean < high)
    assert np.all(high - low < 0.2)
    low2, high2 = bootstrap_ci(values, num_resamples=500, seed=7)
    np.testing.assert_array_equal(low, low2)
    np.testing.assert_array_equal(high, high2)
    low3, _ = bootstrap_ci(values, num_resamples=500, seed=8)
    assert not np.array_equal(low, low3)
    # a constant column has a degenerate interval
    lo, hi = bootstrap_ci(np.ones(10), num_resamples=50)
    assert lo == hi == 1.0


def test_diversity_on_hand_made_answers():
    assert distinct_answers(["4", "4", None, "2+2"]) == 2
    assert answer_entropy(["a", "a", "a"]) == 0.0
    assert answer_entropy(["a", "b", "c", "d"]) == pytest.approx(math.log(4))
    assert answer_entropy(["a", "a", "b", "b", None]) == pytest.approx(math.log(2))
    assert math.isnan(answer_entropy([None, None]))


def test_coverage_fraction_and_pstar_mass():
    valid = {"a", "b", "c", "d"}
    logp = {"a": math.log(0.4), "b": math.log(0.1), "c": math.log(0.05), "d": math.log(0.05)}
    fraction, mass = coverage({"a", "c", "not-valid"}, valid, logp)
    assert fraction == 0.5
    assert mass == pytest.approx(0.45 / 0.6)
    assert coverage({"a"}, valid) == (0.25, None)
    with pytest.raises(ValueError, match="lacks 1 valid"):
        coverage({"a"}, valid, {k: v for k, v in logp.items() if k != "d"})


def _toy(seed=0, size=12):
    """An enumerable toy: base a, verifier v, and a policy π that differs from p*."""
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.ones(size))
    v = (np.arange(size) % 3 != 0).astype(float)
    pi = rng.dirichlet(np.ones(size) * 2)
    A = float((a * v).sum())
    p_star = a * v / A
    exact = float(np.sum(p_star[v > 0] * np.log(p_star[v > 0] / pi[v > 0])))
    return a, v, pi, A, exact


def test_filtered_kl_matches_exact_value_on_enumerable_toy():
    a, v, pi, A, exact = _toy()
    rng = np.random.default_rng(3)
    ys = rng.choice(len(pi), size=200_000, p=pi)
    est = filtered_kl(np.log(a[ys]), np.log(pi[ys]), v[ys])
    assert est["log_A_hat"] == pytest.approx(math.log(A), abs=0.02)
    assert est["kl"] == pytest.approx(exact, abs=0.02)
    est_known_a = filtered_kl(np.log(a[ys]), np.log(pi[ys]), v[ys], log_A=math.log(A))
    assert est_known_a["kl"] == pytest.approx(exact, abs=0.03)
    assert est_known_a["mass_seen"] == pytest.approx(1.0, abs=0.02)
    assert exact > 0.1  # the toy policy really differs from p*


def test_filtered_kl_is_zero_when_policy_is_the_filtered_model():
    a, v, _, A, _ = _toy(seed=5)
    p_star = a * v / A
    ys = np.random.default_rng(0).choice(len(a), size=500, p=p_star)
    est = filtered_kl(np.log(a[ys]), np.log(p_star[ys]), v[ys])
    assert est["kl"] == pytest.approx(0.0, abs=1e-9)
    assert est["log_A_hat"] == pytest.approx(math.log(A), abs=1e-9)
    assert est["ess"] == pytest.approx(500)
    none_valid = filtered_kl([0.0, -1.0], [-1.0, -1.0], [0, 0])
    assert math.isnan(none_valid["kl"]) and none_valid["ess"] == 0.0


def test_sampled_pstar_mass_counts_distinct_valid_sequences_once():
    log_a = np.log([0.2, 0.2, 0.1, 0.3])
    mass = sampled_pstar_mass(["x", "x", "y", "z"], log_a, [1, 1, 1, 0], log_A=math.log(0.6))
    assert mass == pytest.approx(0.3 / 0.6)
