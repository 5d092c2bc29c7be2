"""Reverse KL, KL(π‖p): f(t) = t log t, f'(t) = 1 + log t. Infinite toward p*; toward p_β it is
KL-regularised RL (R = v/β − log(π/a) + const)."""

from filtered_rl.divergences._registry import DIVERGENCES, Divergence

DIVERGENCES.register(
    "reverse_kl",
    Divergence(
        name="reverse_kl",
        summary="KL(π‖p), mode-seeking; only toward target='tilted'",
        f=lambda log_t, alpha=None: log_t.exp() * log_t,
        f_prime=lambda log_t, alpha=None: 1.0 + log_t,
        finite_toward_filtered=lambda alpha: False,
    ),
)
