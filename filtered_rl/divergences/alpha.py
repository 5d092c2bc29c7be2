"""Amari α-divergence: f(t) = (t^α − αt − (1−α)) / (α(α−1)), f'(t) = (1 − t^{α−1}) / (1−α).

α → 0 tends to t − 1 − log t (forward KL plus a term with zero mean under p), α → 1 to
t log t − t + 1 (reverse KL, likewise); both limits are used exactly at α = 0 and α = 1.
f'(∞) = 1/(1−α) is finite only for α < 1, hence toward p* only α < 1.
"""

import torch

from filtered_rl.divergences._registry import DIVERGENCES, Divergence


def _f(log_t, alpha):
    t = log_t.exp()
    if alpha == 0:
        return t - 1.0 - log_t
    if alpha == 1:
        return t * log_t - t + 1.0
    return ((alpha * log_t).exp() - alpha * t - (1.0 - alpha)) / (alpha * (alpha - 1.0))


def _f_prime(log_t, alpha):
    if alpha == 1:
        return log_t.clone()
    return (1.0 - torch.exp((alpha - 1.0) * log_t)) / (1.0 - alpha)


DIVERGENCES.register(
    "alpha",
    Divergence(
        name="alpha",
        summary="Amari α (set alpha): 0 → forward KL, 1 → reverse KL",
        f=_f,
        f_prime=_f_prime,
        finite_toward_filtered=lambda alpha: alpha < 1,
        needs_alpha=True,
    ),
)
