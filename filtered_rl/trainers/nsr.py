r"""Negative-sample reinforcement and Weighted-REINFORCE (Zhu et al., "The Surprising Effectiveness of
Negative Reinforcement in LLM Reasoning", arXiv 2506.01347), as in the authors' code
(TianHongZXY/RLVR-Decomposed: verl's `adv_estimator=psr_nsr` with `advantage=negative|weighted`).

Why: REINFORCE on a ±1 reward splits into positive-sample reinforcement (push up the valid samples, PSR) and
negative-sample reinforcement (push down the invalid ones, NSR). The paper finds that NSR alone keeps pass@k at
large k (it improves over the base model up to k = 256), and that a small weight on PSR (λ = 0.1,
"W-REINFORCE") does best overall. Per completion, with the binary verdict v(y):

    A(y) = λ      if y is valid,
    A(y) = −1     if y is invalid,

no baseline, no group statistics, no division by a standard deviation, then TRL's clipped surrogate (ratio and
clip ε = 0.2, token mean: verl's `masked_mean`). λ = `nsr_positive_weight`: 0 is NSR (the default here), 0.1
W-REINFORCE (the paper's recommendation), 1 plain REINFORCE on ±1 (the paper's "RLVR" row), and PSR alone is
`raft` (A = v).

Readings chosen: (1) one registry entry, `nsr`, with λ as its knob (W-REINFORCE is `nsr_positive_weight: 0.1`),
since the two differ only in that number. (2) The verdict is the binary v(y) (`validity_threshold`), as the
authors' code splits samples by score 1 / 0; a completion no reward function scores gets advantage 0.
(3) KL: the authors' scripts set kl_coef 0 (`beta` 0, the default here: no reference model); they generate
1,024 prompts × 8 and take optimizer steps on mini-batches of 256 prompts (4 per generation), which the recipes'
`nsr:` sections mirror with `steps_per_generation`.

What it converges to: the expected gradient of NSR is E_π[−(1 − v)·∇log π] = ∇E_π[v] (REINFORCE on v − 1), so
validity → 1. On a softmax the logit of a valid answer y moves at rate π(y)·(1 − V) and every valid logit at
the same relative rate (1 − V), so the *ratios* among valid answers drift toward the likelier ones at a rate
that vanishes as V → 1: NSR keeps the prior's proportions approximately, not exactly (the paper's "guided by
the model's prior beliefs"). How close its end point comes to p* on the enumerable tasks, against forward KL's,
is measured in tests/test_remedies_2025.py and reported in docs/baselines.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm


def nsr_advantages(
    valid: torch.Tensor, positive_weight: float = 0.0, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) NSR / W-REINFORCE advantages: λ for a valid sample, −1 for an invalid one (module doc).

    `scored` (N,) bool: False where no reward function scored the completion; those get 0.
    """
    advantages = torch.where(
        valid > 0.5, torch.full_like(valid, float(positive_weight)), torch.full_like(valid, -1.0)
    )
    if scored is not None:
        advantages = torch.where(scored.to(advantages.device), advantages, torch.zeros_like(advantages))
    return advantages


@dataclass
class NSRConfig(PostScoringConfig):
    """Configuration of [`NSRTrainer`]: [`~trl.GRPOConfig`] plus the positive-sample weight λ."""

    nsr_positive_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ in [0, 1], the advantage of a valid sample (an invalid one gets −1): 0 is NSR (negative "
            "samples only), 0.1 W-REINFORCE (the paper's recommendation), 1 REINFORCE on ±1."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "TRL's k3 KL coefficient in the loss; 0 in the authors' scripts (no reference model)."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.nsr_positive_weight) and 0.0 <= self.nsr_positive_weight <= 1.0):
            raise ValueError(
                f"nsr_positive_weight={self.nsr_positive_weight} must lie in [0, 1]: 0 is NSR, 0.1 W-REINFORCE "
                "(the paper's), 1 REINFORCE on ±1"
            )
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta={self.beta} must be a finite number ≥ 0 (0 in the authors' scripts)")
        super().__post_init__()


@register_algorithm(
    "nsr",
    NSRConfig,
    "NSR / W-REINFORCE (Zhu et al. 2025): invalid samples −1, valid ones λ (0: NSR, 0.1: W-REINFORCE); "
    "nsr_positive_weight",
)
class NSRTrainer(PostScoringTrainer):
    """Negative-sample reinforcement, optionally with weighted positives (see the module doc)."""

    _name = "NSR"
    config_class = NSRConfig
    metric_prefix = "nsr"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        scored = ~torch.isnan(batch.rewards_per_func).all(dim=1)
        return nsr_advantages(batch.valid, self.args.nsr_positive_weight, scored)


__all__ = ["NSRConfig", "NSRTrainer", "nsr_advantages"]
