r"""PKPO: pass@k policy optimisation (Walder & Karkhanis, "Pass@K Policy Optimization: Solving Harder
Reinforcement Learning Problems", arXiv 2505.15201), binary-reward estimators, any k ≤ n, k annealed.

Why: rewarding each sample for being correct optimises pass@1; optimising pass@k = P(one of k samples is correct)
rewards a group for covering more valid answers. PKPO derives, from a group of n samples with c correct, an
*unbiased* estimate of ∇pass@k as a policy gradient Σ_i r_i·∇log π(y_i) with jointly transformed rewards (the
mean over all C(n, k) subsets of the subset's pass/fail, credited to its members):

    r_i = k/n                              if y_i is correct,
    r_i = (k/n)·ρ(n − 1, c, k − 1)         if y_i is incorrect,      ρ(n, c, k) = 1 − C(n−c, k)/C(n, k),

(an incorrect sample is credited with the subsets it shares with a correct one), and a baseline that keeps the
estimate unbiased because it does not depend on y_i: the pass@k estimate of the *other* n − 1 samples,

    b_i = (k/n)·ρ(n − 1, c_{−i}, k'),     c_{−i} = correct samples other than y_i,   k' = min(k, n − 1),

so that A_i = n·(r_i − b_i) (the factor n makes TRL's per-sample mean the estimate itself; with k = 1 it is
exactly RLOO's advantage, f_i − mean of the others' f). `pkpo_baseline: none` drops b_i (the raw, non-negative
estimator). k is annealed by `pkpo_k_end`: the paper trains with a large k, then a small one, to gain pass@1
back while keeping pass@k; here k switches from `pkpo_k` to `pkpo_k_end` after `pkpo_anneal_fraction` of the
run's optimizer steps.

Readings chosen: (1) binary rewards only (the verdicts v(y), `validity_threshold`): the paper's continuous
"maxg@k" estimator is not implemented, since every verifier here is binary. (2) The baseline: the paper's
variance-reduced estimators subtract a leave-one-out quantity; its exact form could not be checked against the
paper's text here, so the one used is the unbiased pass@k estimate of the other samples (for k = n, where that is
undefined, their pass@(k − 1) estimate: still independent of y_i, so the gradient stays unbiased). (3) Scale:
×n as above, no division by a standard deviation (`scale_rewards` does not apply).

How it differs from `passk` (Chen et al. 2025, `passk_training.py`), which shares ρ (`pass_at_k_estimate`): both
start from the same per-sample credit (Chen's advantage is ((n/k)·r_i − ρ)/σ, σ = √(ρ(1 − ρ)): the group-mean
baseline and a division by σ, checked in tests/test_remedies_2025.py), but `passk` normalises each group by σ, so
a group with every k-subset passing (σ = 0, e.g. ≥ 5 of 8 correct at k = 4) teaches nothing and k = n is refused;
PKPO keeps the unnormalised, unbiased gradient of pass@k (a leave-one-out baseline, no σ), allows k = n and anneals
k. What it converges to on a binary task: pass@k is increasing in the validity V, so validity → 1 (asserted on the
enumerable task), with no preference among valid answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm
from filtered_rl.trainers.passk_training import pass_at_k_estimate

BASELINES = ("loo", "none")


def pkpo_rewards_table(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, incorrect) effective rewards r_i indexed by the group's number of correct samples c = 0 … n."""
    correct = [k / n] * (n + 1)
    incorrect = [(k / n) * pass_at_k_estimate(n - 1, c, k - 1) if c < n else 0.0 for c in range(n + 1)]
    return torch.tensor(correct, dtype=torch.float64), torch.tensor(incorrect, dtype=torch.float64)


def pkpo_advantages(valid: torch.Tensor, group_size: int, k: int, baseline: str = "loo") -> torch.Tensor:
    """(N,) PKPO advantages n·(r_i − b_i) from binary verdicts (module doc); groups of `group_size` consecutive."""
    n = group_size
    if not 1 <= k <= n:
        raise ValueError(f"PKPO needs 1 ≤ k ≤ group size {n}, got k={k}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}: choose one of {BASELINES}")
    correct_r, incorrect_r = pkpo_rewards_table(n, k)
    grouped = (valid.view(-1, n) > 0.5).cpu()
    counts = grouped.sum(dim=1, keepdim=True).expand_as(grouped)
    rewards = torch.where(grouped, correct_r[counts], incorrect_r[counts])
    if baseline == "loo" and n > 1:
        k_others = min(k, n - 1)
        # b_i: the other n − 1 samples' pass@k' estimate; they hold c − 1 correct ones if y_i is correct, else c.
        table = torch.tensor([pass_at_k_estimate(n - 1, c, k_others) for c in range(n)], dtype=torch.float64)
        others = counts - grouped.long()
        rewards = rewards - (k / n) * table[others]
    return (n * rewards).reshape(-1).to(device=valid.device, dtype=valid.dtype)


def annealed_k(k: int, k_end: int | None, step: int, max_steps: int, fraction: float) -> int:
    """k at optimizer step `step`: `k` before `fraction`·max_steps, `k_end` from there on (if set)."""
    if k_end is None or max_steps <= 0:
        return k
    return k if step < fraction * max_steps else k_end


@dataclass
class PKPOConfig(PostScoringConfig):
    """Configuration of [`PKPOTrainer`]: [`~trl.GRPOConfig`] plus k, its annealing and the baseline."""

    pkpo_k: int = field(
        default=4,
        metadata={
            "help": "k of the pass@k objective, 1 ≤ k ≤ num_generations (k = n allowed; k = 1 is RLOO). The paper "
            "sweeps k; none is a default."
        },
    )
    pkpo_k_end: int | None = field(
        default=None,
        metadata={
            "help": "k after annealing (e.g. 1, to regain pass@1, as the paper's annealed runs); unset: k stays "
            "pkpo_k for the whole run."
        },
    )
    pkpo_anneal_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the run's optimizer steps after which k switches to pkpo_k_end, in (0, 1)."
        },
    )
    pkpo_baseline: str = field(
        default="loo",
        metadata={
            "help": "'loo': subtract the other samples' pass@k estimate (unbiased, lower variance); 'none': the raw "
            "estimator (non-negative advantages)."
        },
    )

    def __post_init__(self):
        for name in ("pkpo_k", "pkpo_k_end"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"{name}={value} must be ≥ 1")
            for generations_name in ("num_generations", "num_generations_eval"):
                generations = getattr(self, generations_name, None)
                if generations is not None and generations > 1 and value > generations:
                    raise ValueError(
                        f"{name}={value} exceeds {generations_name}={generations}: pass@k of a group of n samples "
                        f"needs k ≤ n; lower {name} or raise {generations_name}"
                    )
        if not (math.isfinite(self.pkpo_anneal_fraction) and 0 < self.pkpo_anneal_fraction < 1):
            raise ValueError(f"pkpo_anneal_fraction={self.pkpo_anneal_fraction} must lie in (0, 1)")
        if self.pkpo_baseline not in BASELINES:
            raise ValueError(f"pkpo_baseline={self.pkpo_baseline!r}: choose one of {BASELINES}")
        super().__post_init__()


@register_algorithm(
    "pkpo",
    PKPOConfig,
    "PKPO (Walder & Karkhanis 2025): unbiased pass@k gradient for any k ≤ n, leave-one-out baseline, k annealed; "
    "pkpo_k, pkpo_k_end",
)
class PKPOTrainer(PostScoringTrainer):
    """Pass@k policy optimisation (see the module doc). Logs `pkpo/k` and `pkpo/group_pass_at_k`."""

    _name = "PKPO"
    config_class = PKPOConfig
    metric_prefix = "pkpo"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def current_k(self, group_size: int) -> int:
        args = self.args
        k = annealed_k(
            args.pkpo_k,
            args.pkpo_k_end,
            self.state.global_step,
            self.state.max_steps,
            args.pkpo_anneal_fraction,
        )
        return min(k, group_size)  # an eval group may be smaller than k

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        k = self.current_k(batch.group_size)
        counts = batch.grouped(batch.valid).gt(0.5).sum(dim=1).tolist()
        rho = [pass_at_k_estimate(batch.group_size, c, k) for c in counts]
        metrics = self._metrics[batch.mode]
        metrics["pkpo/k"].append(float(k))
        metrics["pkpo/group_pass_at_k"].append(sum(rho) / len(rho))
        return pkpo_advantages(batch.valid, batch.group_size, k, self.args.pkpo_baseline)


__all__ = ["PKPOConfig", "PKPOTrainer", "annealed_k", "pkpo_advantages", "pkpo_rewards_table"]
