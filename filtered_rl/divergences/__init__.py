"""f-divergences toward the filtered model, and the f-DPG pseudo-rewards that minimise them.

Pure tensor math, no trainer imports, so that every formula here can be tested exactly. Each divergence
is one file of this package registering a `Divergence` (f and f' from log t, and whether it is finite
toward p*) in `DIVERGENCES`; a new one is a new file.

Convention: D_f(π‖p) = E_p[f(π/p)] with f convex, f(1) = 0, and t = π(y)/p(y). The gradient of
D_f(π_θ‖p) is E_{y~π}[f'(t(y)) ∇θ log π_θ(y)] (f-DPG, Go et al. 2023), so a policy-gradient
learner maximising E_π[R] with the *pseudo-reward* R(y) = −f'(t(y)) descends D_f.

| name         | divergence   | f(t)                                   | f'(t)                  | −f'(∞) |
|--------------|--------------|----------------------------------------|------------------------|--------|
| forward_kl   | KL(p‖π)      | −log t                                 | −1/t                   | 0      |
| reverse_kl   | KL(π‖p)      | t log t                                | 1 + log t              | −∞     |
| js           | JS(π, p)     | t log(2t/(1+t)) + log(2/(1+t))         | log(2t/(1+t))          | −log 2 |
| tv           | TV(π, p)     | ½|t − 1|                               | ½ sign(t − 1)          | −½     |
| alpha        | Amari α      | (t^α − αt − (1−α)) / (α(α−1))          | (1 − t^{α−1}) / (1−α)  | −1/(1−α) for α<1 |

(JS here is KL(π‖m) + KL(p‖m), m = (π+p)/2, i.e. twice the "½-weighted" JS.) Amari α tends to
t − 1 − log t (forward KL plus a term with zero mean under p) as α → 0 and to t log t − t + 1
(reverse KL, likewise) as α → 1; both limits are used exactly at α = 0 and α = 1.

Under the filtered target p* = a·v/A an invalid sample has p(y) = 0, t = ∞, log t = +inf; all
functions below accept log t = +inf. Reverse KL (and α ≥ 1) are infinite there and are refused
toward p*; toward the tilted target p_β ∝ a·e^{v/β} they are finite, and reverse KL then gives
exactly KL-regularised RL (R = v/β − log(π/a) + const).
"""

from __future__ import annotations

import math

import torch

from filtered_rl.divergences._registry import DIVERGENCES, Divergence

TARGETS = ("filtered", "tilted")


def get_divergence(divergence: str) -> Divergence:
    """The registered divergence of that name (an unknown name fails listing the known ones)."""
    return DIVERGENCES[divergence]


def check_divergence(divergence: str, alpha: float | None = None, target: str = "filtered") -> None:
    """Raise a ValueError naming the field when (divergence, alpha, target) is not a finite objective."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not supported; choose one of {DIVERGENCES.names()}")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; choose one of {TARGETS}")
    entry = DIVERGENCES[divergence]
    if entry.needs_alpha and (alpha is None or not math.isfinite(alpha)):
        raise ValueError(
            f"divergence={divergence!r} needs a finite `alpha` (e.g. alpha=0.5; 0 → forward KL, 1 → reverse KL)"
        )
    if target == "filtered" and not entry.finite_toward_filtered(alpha):
        finite = [name for name, d in DIVERGENCES.items() if d.needs_alpha or d.finite_toward_filtered(None)]
        raise ValueError(
            f"divergence={divergence!r}{f' with alpha={alpha}' if entry.needs_alpha else ''} is infinite toward "
            "the filtered model p* (invalid samples have p*(y) = 0); use target='tilted' with target_beta or "
            f"target_validity, or a mass-covering divergence: {', '.join(finite)} (alpha < 1)"
        )


def f_generator(log_t: torch.Tensor, divergence: str, alpha: float | None = None) -> torch.Tensor:
    """f(t) evaluated from log t (finite log t; see `f_divergence` for the p = 0 or π = 0 limits)."""
    return get_divergence(divergence).f(log_t, alpha)


def f_prime(log_t: torch.Tensor, divergence: str, alpha: float | None = None) -> torch.Tensor:
    """f'(t) from log t; log t = +inf (p(y) = 0) gives the limit f'(∞) (−∞-free for the finite cases)."""
    return get_divergence(divergence).f_prime(log_t, alpha)


def pseudo_reward(log_t: torch.Tensor, divergence: str, alpha: float | None = None) -> torch.Tensor:
    """R = −f'(t): the reward whose policy gradient E_π[R ∇log π] is −∇D_f(π‖p)."""
    return -f_prime(log_t, divergence, alpha)


def f_divergence(
    log_pi: torch.Tensor, log_p: torch.Tensor, divergence: str, alpha: float | None = None
) -> torch.Tensor:
    """Exact D_f(π‖p) = Σ_y p(y) f(π(y)/p(y)) for distributions given by log-probs over an enumerable set.

    Points where p(y) = 0 < π(y) contribute π(y)·f'(∞) (= lim_{t→∞} f(t)/t); points where
    π(y) = 0 < p(y) contribute p(y)·f(0). Differentiable in log_pi (used by the exact tests and toy).
    """
    pi, p = log_pi.exp(), log_p.exp()
    both = (pi > 0) & (p > 0)
    safe_log_t = torch.where(both, log_pi - log_p, torch.zeros_like(log_pi))
    terms = torch.where(both, p * f_generator(safe_log_t, divergence, alpha), torch.zeros_like(pi))
    only_pi = (pi > 0) & (p == 0)
    if only_pi.any():
        f_prime_inf = f_prime(torch.tensor(math.inf, dtype=log_pi.dtype), divergence, alpha)
        terms = terms + torch.where(only_pi, pi * f_prime_inf, torch.zeros_like(pi))
    only_p = (pi == 0) & (p > 0)
    if only_p.any():
        f_zero = f_generator(torch.tensor(-1e4, dtype=log_pi.dtype), divergence, alpha)  # log t → −∞
        terms = terms + torch.where(only_p, p * f_zero, torch.zeros_like(p))
    return terms.sum()


def group_log_partition(
    log_unnormalised: torch.Tensor, log_pi_old: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Importance-sampling estimate (unbiased, not self-normalised) of log Z(x) per group of K samples y_i ~ π_old(·|x).

    Z(x) = Σ_y P(y) = E_{π_old}[P(y)/π_old(y)] ≈ (1/K) Σ_i P(y_i)/π_old(y_i), computed in log space:
    log Z ≈ logsumexp_i(log P_i − log π_old_i) − log K. For P = a·v this is the base validity A(x).
    A group with no sample of P > 0 gets −inf.
    """
    log_w = (log_unnormalised - log_pi_old).view(-1, group_size)
    return torch.logsumexp(log_w, dim=1) - math.log(group_size)


def group_ess(log_weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """Effective sample size of self-normalised importance weights per group, as a fraction of K.

    ESS = (Σ w)² / Σ w² / K; 1 when the weights are equal, 1/K when one sample carries them all.
    """
    w = torch.softmax(log_weights.view(-1, group_size), dim=1)
    return 1.0 / (w.pow(2).sum(dim=1) * group_size)


def leave_one_out(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """values_i − mean_{j≠i} values_j within each group (an unbiased baseline, RLOO-style)."""
    grouped = values.view(-1, group_size)
    total = grouped.sum(dim=1, keepdim=True)
    return (grouped - (total - grouped) / (group_size - 1)).view(-1)


def filtered_advantages(
    log_pi: torch.Tensor,
    log_ref: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    *,
    divergence: str = "forward_kl",
    alpha: float | None = None,
    target: str = "filtered",
    target_beta: float | torch.Tensor | None = None,
    log_pi_old: torch.Tensor | None = None,
    pseudo_reward_clip: float = 10.0,
    min_log_partition: float = -30.0,
    base_validity: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence advantages of the f-DPG objective toward p* (or p_β), with diagnostics.

    Inputs are flat (N,) tensors, N = groups × group_size, consecutive rows forming a prompt's group:
    `log_pi` the current policy's sequence log-prob (at sampling time: π_old), `log_ref` the base
    model's, `valid` the binary verdict v ∈ {0, 1}. `target_beta` is a float or a (num_groups,) tensor
    for the tilted target. `log_pi_old` (default `log_pi`) is the sampling policy used for the
    importance weights of Z(x). `base_validity` (num_groups,), if given, is an estimate of A(x) from
    elsewhere (e.g. pooled over earlier visits of the prompt) used instead of the group's own: then
    Z = A (filtered) or Z_β = (1 − A) + A·e^{1/β} (tilted).

    Steps: log P = log a + log v (filtered) or log a + v/β (tilted); log Z by `group_log_partition`
    (or from `base_validity`), floored at `min_log_partition`; log t = log π − (log P − log Z);
    R = −f'(t) clipped to [−clip, clip]; advantage = leave-one-out R. A group with no valid sample (filtered target) has
    no estimate of p* and contributes nothing (advantage 0).
    """
    check_divergence(divergence, alpha, target)
    if group_size < 2:
        raise ValueError("group_size (num_generations) must be ≥ 2 for the leave-one-out baseline")
    log_pi, log_ref, valid = log_pi.detach().double(), log_ref.detach().double(), valid.detach().double()
    log_pi_old = log_pi if log_pi_old is None else log_pi_old.detach().double()
    num_groups = log_pi.numel() // group_size
    if target == "filtered":
        log_unnormalised = torch.where(valid > 0, log_ref, torch.full_like(log_ref, -math.inf))
    else:
        if target_beta is None:
            raise ValueError(
                "target='tilted' needs target_beta (or target_validity, converted by the controller)"
            )
        beta = torch.as_tensor(target_beta, dtype=torch.float64, device=log_ref.device).reshape(-1)
        if (beta <= 0).any():
            raise ValueError(f"target_beta must be > 0, got {beta.tolist()}")
        beta = (
            beta.expand(num_groups).repeat_interleave(group_size)
            if beta.numel() == 1
            else (beta.repeat_interleave(group_size))
        )
        log_unnormalised = log_ref + valid / beta

    log_z_raw = group_log_partition(log_unnormalised, log_pi_old, group_size)
    has_support = torch.isfinite(log_z_raw)
    if base_validity is not None:
        log_a = torch.as_tensor(base_validity, dtype=torch.float64, device=log_pi.device).reshape(-1).log()
        if target == "filtered":
            log_z_raw = torch.where(has_support, log_a, log_z_raw)
        else:  # Z_β = Σ_y a(y)·e^{v(y)/β} = (1 − A) + A·e^{1/β}
            log_z_raw = torch.logaddexp(torch.log1p(-log_a.exp()), log_a + 1.0 / beta[::group_size])
    log_z = torch.clamp(log_z_raw, min=min_log_partition)
    log_p = log_unnormalised - log_z.repeat_interleave(group_size)
    log_t = log_pi - log_p  # +inf where p(y) = 0
    rewards = pseudo_reward(log_t, divergence, alpha).clamp(-pseudo_reward_clip, pseudo_reward_clip)
    advantages = leave_one_out(rewards, group_size)
    row_support = has_support.repeat_interleave(group_size)
    advantages = torch.where(row_support, advantages, torch.zeros_like(advantages))

    # Diagnostics: importance weights w_i ∝ p(y_i)/π_old(y_i) within each group.
    log_w = (log_p - log_pi_old).view(num_groups, group_size)
    log_w_supported = torch.where(has_support[:, None], log_w, torch.zeros_like(log_w))
    w = torch.softmax(log_w_supported, dim=1)
    ess = group_ess(log_w_supported, group_size)
    # KL(p‖π) ≈ Σ_i w̃_i (log p_i − log π_i), self-normalised (valid samples only for p*).
    terms = torch.where(torch.isfinite(log_w), -log_t.view(num_groups, group_size), torch.zeros_like(log_w))
    kl_target_policy = (w * terms).sum(dim=1)
    return {
        "advantages": advantages,
        "pseudo_rewards": rewards,
        "log_partition": log_z_raw,
        "has_support": has_support,
        "ess": torch.where(has_support, ess, torch.zeros_like(ess)),
        "kl_target_policy": torch.where(has_support, kl_target_policy, torch.full_like(ess, math.nan)),
    }
