"""The unbiased pass@k estimator and bootstrap confidence intervals (pure math: numpy only).

With n samples of which c are valid, the probability that at least one of k samples drawn without
replacement is valid is pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al., 2021, eq. 1). The binomial
ratio overflows for n in the hundreds, so it is evaluated as a product,
    C(n−c, k) / C(n, k) = ∏_{i=n−c+1}^{n} (1 − k/i),
summed in log space with log1p and returned with expm1, which keeps tiny pass@k values (c = 1, large n)
exact to float precision instead of cancelling in 1 − (1 − ε).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def _check(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per prompt, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n, got c={c} valid out of n={n} samples")
    if k < 1:
        raise ValueError(f"pass@k needs k ≥ 1, got k={k}")
    if k > n:
        raise ValueError(
            f"pass@k is undefined for k={k} > n={n} samples per prompt: lower k or draw more samples (--num-samples)"
        )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples with c valid (k ≤ n)."""
    _check(n, c, k)
    if n - c < k:  # every k-subset contains a valid sample
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(-np.expm1(np.log1p(-k / i).sum()))


def pass_at_k_matrix(ns: Sequence[int], cs: Sequence[int], ks: Iterable[int]) -> np.ndarray:
    """pass@k per prompt (rows) and per k (columns)."""
    ks = list(ks)
    if len(ns) != len(cs):
        raise ValueError(f"ns and cs must have one entry per prompt, got {len(ns)} and {len(cs)}")
    return np.array([[pass_at_k(n, c, k) for k in ks] for n, c in zip(ns, cs)], dtype=np.float64).reshape(
        len(ns), len(ks)
    )


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """pass@k averaged over prompts, for every requested k."""
    ks = list(ks)
    if not ns:
        raise ValueError("pass@k needs at least one prompt")
    means = pass_at_k_matrix(ns, cs, ks).mean(axis=0)
    return {k: float(m) for k, m in zip(ks, means)}


def default_ks(n: int) -> list[int]:
    """1, 2, 4, … up to n, plus n itself: the points of a log-x pass@k curve."""
    ks = [1 << j for j in range(n.bit_length()) if (1 << j) <= n]
    return ks if ks[-1] == n else [*ks, n]


def bootstrap_ci(
    per_prompt: np.ndarray | Sequence[float],
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over prompts.

    `per_prompt` is (P,) or (P, K) (e.g. the pass@k matrix); prompts are resampled with replacement,
    the same resamples for every column, so the intervals of different k are consistent with each other.
    Returns (low, high) with the trailing shape of `per_prompt` minus the prompt axis.
    """
    values = np.asarray(per_prompt, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("bootstrap_ci needs at least one prompt")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be ≥ 1, got {num_resamples}")
    rng = np.random.default_rng(seed)
    num_prompts = values.shape[0]
    means = np.empty((num_resamples, *values.shape[1:]))
    chunk = max(1, 2_000_000 // max(1, values.size))  # bound the (resamples × prompts) index matrix
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        idx = rng.integers(0, num_prompts, size=(stop - start, num_prompts))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return low, high
