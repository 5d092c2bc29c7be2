"""Jensen–Shannon, KL(π‖m) + KL(p‖m) with m = (π+p)/2 (twice the ½-weighted JS).

f(t) = t log(2t/(1+t)) + log(2/(1+t)), f'(t) = log(2t/(1+t)) = log 2 + log σ(log t); f'(∞) = log 2.
"""

import math

import torch.nn.functional as F

from filtered_rl.divergences._registry import DIVERGENCES, Divergence

LOG2 = math.log(2.0)


def _f(log_t, alpha=None):
    softplus = F.softplus(log_t)  # log(1 + t)
    return log_t.exp() * (LOG2 + log_t - softplus) + LOG2 - softplus


DIVERGENCES.register(
    "js",
    Divergence(
        name="js",
        summary="Jensen–Shannon, bounded",
        f=_f,
        f_prime=lambda log_t, alpha=None: LOG2 + F.logsigmoid(log_t),
    ),
)
