"""Diversity, coverage and KL(p*‖π) metrics of a set of samples (pure math: numpy only).

Notation: a(y|x) is the base (reference) model, v(y) ∈ {0, 1} the verifier, A(x) = Σ_y a(y|x) v(y) the base
validity rate, p*(y|x) = a(y|x) v(y) / A(x) the filtered model, and π the evaluated (sampling) model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np


def _logsumexp(x: np.ndarray) -> float:
    if x.size == 0:
        return -math.inf
    m = float(np.max(x))
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(x - m).sum()))


def distinct_answers(keys: Iterable[str | None]) -> int:
    """Number of distinct answers (None, i.e. no answer found, is not an answer)."""
    return len({k for k in keys if k is not None})


def answer_entropy(keys: Iterable[str | None]) -> float:
    """Entropy (nats) of the empirical distribution of answers: 0 when every sample gives one answer,
    log m for m equally frequent answers. NaN when there is no answer at all."""
    counts = np.array(list(Counter(k for k in keys if k is not None).values()), dtype=np.float64)
    if counts.size == 0:
        return math.nan
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def coverage(
    hit: Collection[str],
    valid: Collection[str],
    valid_logprobs: Mapping[str, float] | None = None,
) -> tuple[float, float | None]:
    """How much of p*'s support the samples reached, when the valid answers can be enumerated.

    Returns (fraction of the valid answers hit, p*-mass of the hit answers). The mass needs the base
    log-probability log a(y|x) of every valid answer: p*(y) = a(y) / Σ_{valid} a, so it is None without them.
    """
    valid = set(valid)
    if not valid:
        raise ValueError("coverage needs a non-empty set of valid answers (the prompt has no solution)")
    reached = valid & set(hit)
    fraction = len(reached) / len(valid)
    if valid_logprobs is None:
        return fraction, None
    missing = valid - set(valid_logprobs)
    if missing:
        raise ValueError(f"valid_logprobs lacks {len(missing)} valid answers, e.g. {sorted(missing)[:3]}")
    all_lp = np.array([valid_logprobs[y] for y in valid], dtype=np.float64)
    hit_lp = np.array([valid_logprobs[y] for y in reached], dtype=np.float64)
    return fraction, float(math.exp(_logsumexp(hit_lp) - _logsumexp(all_lp)))


def filtered_kl(
    log_a: Sequence[float],
    log_pi: Sequence[float],
    valid: Sequence[bool | float],
    *,
    log_A: float | None = None,
) -> dict[str, float]:
    """Importance-sampled KL(p*‖π) from samples y_i ~ π (one prompt).

    With weights w_i = a(y_i) v(y_i) / π(y_i), E_π[w] = Σ_y a(y) v(y) = A, and p*(y)/π(y) = w(y)/A, so
        KL(p*‖π) = E_{p*}[log p*/π] = E_π[(w/A) log(w/A)].
    A is unknown in general and estimated from the same samples, Â = (1/N) Σ_i w_i, which gives the
    self-normalised estimator KL̂ = Σ_i w̃_i log(w_i / Â) with w̃_i = w_i / Σ_j w_j (consistent, biased
    for finite N). Everything is done in log space: ℓ_i = log a_i − log π_i on valid samples, log Â =
    logsumexp(ℓ) − log N, w̃ = softmax(ℓ). Passing `log_A` (e.g. the base model's measured validity)
    uses the unbiased form (1/N) Σ_i (w_i/A) log(w_i/A) instead.

    Caveat: samples only see where π puts mass. A π that has collapsed onto a few valid answers makes
    Â underestimate A and the self-normalised KL̂ look small; `ess` (the effective sample size of the
    weights) and `mass_seen` = Â/A (with `log_A`) flag this. Invalid samples carry weight 0.
    Returns kl, log_A_hat, ess (NaN for kl/log_A_hat when no sample is valid).
    """
    log_a = np.asarray(log_a, dtype=np.float64)
    log_pi = np.asarray(log_pi, dtype=np.float64)
    is_valid = np.asarray(valid, dtype=np.float64) > 0.5
    if not (log_a.shape == log_pi.shape == is_valid.shape) or log_a.ndim != 1:
        raise ValueError(
            f"log_a, log_pi and valid must be 1-D of one length, got {log_a.shape}, {log_pi.shape}, {is_valid.shape}"
        )
    n = log_a.size
    if n == 0:
        raise ValueError("filtered_kl needs at least one sample")
    ell = (log_a - log_pi)[is_valid]
    if ell.size == 0:
        return {"kl": math.nan, "log_A_hat": -math.inf, "ess": 0.0, "mass_seen": math.nan}
    log_total = _logsumexp(ell)
    log_A_hat = log_total - math.log(n)
    w_tilde = np.exp(ell - log_total)
    ess = float(1.0 / np.square(w_tilde).sum())
    if log_A is None:
        kl = float((w_tilde * (ell - log_A_hat)).sum())
        mass_seen = math.nan
    else:
        kl = float((np.exp(ell - log_A) * (ell - log_A)).sum() / n)
        mass_seen = math.exp(log_A_hat - log_A)
    return {"kl": kl, "log_A_hat": log_A_hat, "ess": ess, "mass_seen": mass_seen}


def sampled_pstar_mass(
    sequence_keys: Sequence[str],
    log_a: Sequence[float],
    valid: Sequence[bool | float],
    log_A: float,
) -> float:
    """p*-mass of the distinct valid sequences that were sampled: Σ_{distinct valid y} a(y) / A.

    Used when the valid set cannot be enumerated but base log-probs are known; with A estimated (Â from
    `filtered_kl`) the value is an estimate and can exceed 1 by sampling noise.
    """
    seen: dict[str, float] = {}
    for key, lp, v in zip(sequence_keys, log_a, valid):
        if v and v > 0.5:
            seen[key] = float(lp)
    if not seen or log_A == -math.inf:
        return 0.0
    return float(math.exp(_logsumexp(np.array(list(seen.values()))) - log_A))
