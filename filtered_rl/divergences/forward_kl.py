"""Forward KL, KL(p‖π): f(t) = −log t, f'(t) = −1/t. Mass-covering; its pseudo-reward is p/π."""

import torch

from filtered_rl.divergences._registry import DIVERGENCES, Divergence

DIVERGENCES.register(
    "forward_kl",
    Divergence(
        name="forward_kl",
        summary="KL(p‖π), mass-covering",
        f=lambda log_t, alpha=None: -log_t,
        f_prime=lambda log_t, alpha=None: -torch.exp(-log_t),
    ),
)
