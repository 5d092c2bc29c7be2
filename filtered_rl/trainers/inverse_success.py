r"""Inverse-success advantage calibration (Fan et al., "When Sharpening Becomes Collapse: Sampling Bias and
Semantic Coupling in RL with Verifiable Rewards", arXiv 2601.15609).

Why: a finite batch reinforces the modes it happened to sample, and easy prompts (most samples correct)
contribute most of that sharpening. Scaling the *positive* GRPO advantages of a group by

    (G − |S⁺|)^α,      |S⁺| = the group's number of correct samples, α = 1,

makes a correct answer to a hard prompt (few successes) count more than one to an easy prompt, and leaves
the negative advantages alone. Reading chosen: the factor multiplies TRL's group-normalised advantages
(after `scale_rewards`), unnormalised as written, so positive advantages grow by up to (G − 1)^α (7× for
G = 8): mind the learning rate. A group that is all correct has advantages 0 anyway.

Left out: the paper's second component, distribution-level calibration with a memory network that steers
*which* samples are drawn. It is a custom sampler inside generation, not a function of a scored batch, so it
does not fit this family (post-scoring advantages on TRL's own generation) without replacing TRL's
generation; see docs/baselines.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm


def inverse_success_advantages(
    advantages: torch.Tensor, valid: torch.Tensor, group_size: int, alpha: float = 1.0
) -> torch.Tensor:
    """(N,) advantages with the positive ones scaled by (G − |S⁺|)^α, |S⁺| = valid samples of the group."""
    grouped = advantages.view(-1, group_size)
    successes = (valid.view(-1, group_size) > 0.5).sum(dim=1, keepdim=True).to(grouped.dtype)
    scale = (group_size - successes) ** alpha
    return torch.where(grouped > 0, grouped * scale, grouped).reshape(-1)


@dataclass
class InverseSuccessConfig(PostScoringConfig):
    """Configuration of [`InverseSuccessTrainer`]: [`~trl.GRPOConfig`] plus the calibration exponent."""

    inverse_success_alpha: float = field(
        default=1.0,
        metadata={
            "help": "α ≥ 0 in (G − |S⁺|)^α, the factor on a group's positive advantages (|S⁺| its correct "
            "samples); 1 in the paper, 0 is GRPO."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.inverse_success_alpha) and self.inverse_success_alpha >= 0):
            raise ValueError(
                f"inverse_success_alpha={self.inverse_success_alpha} must be a finite number ≥ 0 (1 in the paper)"
            )
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "inverse_success",
    InverseSuccessConfig,
    "Inverse-success calibration (Fan et al. 2026): positive advantages × (G − |S⁺|)^α; inverse_success_alpha",
)
class InverseSuccessTrainer(PostScoringTrainer):
    """GRPO whose positive advantages are scaled by the group's failure count (see the module doc)."""

    _name = "InverseSuccess"
    config_class = InverseSuccessConfig
    metric_prefix = "inverse_success"
    needs_reference_model = False  # never reads log a(y): no base model is built or run (unless beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        advantages = group_zscore(scored_reward(batch), batch.group_size, self.args.scale_rewards)
        return inverse_success_advantages(
            advantages, batch.valid, batch.group_size, self.args.inverse_success_alpha
        )
