"""Total variation, ½|t − 1|: f'(t) = ½ sign(t − 1), a pseudo-reward of ±½."""

import torch

from filtered_rl.divergences._registry import DIVERGENCES, Divergence

DIVERGENCES.register(
    "tv",
    Divergence(
        name="tv",
        summary="total variation",
        f=lambda log_t, alpha=None: 0.5 * (log_t.exp() - 1.0).abs(),
        f_prime=lambda log_t, alpha=None: 0.5 * torch.sign(log_t),
    ),
)
