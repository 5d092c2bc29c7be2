r"""F-GRPO: focal scaling of GRPO's advantages (Plyusov et al., "F-GRPO: Don't Let Your Policy Learn the Obvious
and Forget the Rare", arXiv 2602.06717).

Why: with a finite group of N samples, a prompt the policy already solves often yields a group that has valid and
invalid samples but misses the rare valid answers; its update pushes mass onto the valid answers it sampled
(the common ones), so the unsampled valid mass can shrink while validity grows. Such prompts are the
high-success ones. F-GRPO down-weights them with a focal-loss factor on the whole group's advantages:

    A_F(y) = g(x)·A_GRPO(y),     g(x) = (1 − μ̂_pos(x))^γ,     μ̂_pos(x) = (valid samples of the group) / N,

where A_GRPO is TRL's group-normalised advantage (`scale_rewards` as configured; "group" by default, so this is
F-GRPO on GRPO, the paper's main setting; "none" gives Dr.GRPO-style advantages). γ = 0 is GRPO. A group that is
all valid or all invalid has A_GRPO = 0 (σ = 0 gives 0) whatever g.

Readings chosen: (1) μ̂_pos is the empirical success rate of the sampled group, read from the binary verdicts
(`validity_threshold`); unscored completions count as not valid. (2) The factor is applied after TRL's
normalisation, to positive and negative advantages alike (it scales the prompt's update, not a sign).
(3) γ: the paper's value could not be read from the material available when this was written (its abstract and
summaries give the formula, not the setting); `f_grpo_gamma` defaults to 1.0 and is the knob to sweep.

What it converges to: g > 0 wherever the group is mixed, so the expected update is GRPO's with a per-prompt step
size; validity → 1 (asserted on the enumerable task), with the easy prompts' updates shrunk as they are solved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm


def focal_weights(valid: torch.Tensor, group_size: int, gamma: float = 1.0) -> torch.Tensor:
    """(groups,) g(x) = (1 − μ̂_pos(x))^γ, μ̂_pos = the group's fraction of valid samples."""
    success = (valid.view(-1, group_size) > 0.5).to(torch.float64).mean(dim=1)
    return (1.0 - success) ** gamma


def f_grpo_advantages(
    advantages: torch.Tensor, valid: torch.Tensor, group_size: int, gamma: float = 1.0
) -> torch.Tensor:
    """(N,) GRPO advantages (TRL's, after `scale_rewards`) scaled group-wise by (1 − μ̂_pos)^γ."""
    weights = focal_weights(valid, group_size, gamma).to(advantages.dtype)
    return (advantages.view(-1, group_size) * weights.unsqueeze(1)).reshape(-1)


@dataclass
class FGRPOConfig(PostScoringConfig):
    """Configuration of [`FGRPOTrainer`]: [`~trl.GRPOConfig`] plus the focal exponent γ."""

    f_grpo_gamma: float = field(
        default=1.0,
        metadata={
            "help": "γ ≥ 0 in g(x) = (1 − μ̂_pos(x))^γ, the factor on a group's GRPO advantages (μ̂_pos its fraction "
            "of valid samples); 0 is GRPO, larger γ down-weights well-solved prompts more. The paper's value "
            "could not be verified here: sweep it."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.f_grpo_gamma) and self.f_grpo_gamma >= 0):
            raise ValueError(f"f_grpo_gamma={self.f_grpo_gamma} must be a finite number ≥ 0 (0 is GRPO)")
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "f_grpo",
    FGRPOConfig,
    "F-GRPO (Plyusov et al. 2026): GRPO advantages × (1 − group success rate)^γ; f_grpo_gamma",
)
class FGRPOTrainer(PostScoringTrainer):
    """GRPO with the focal factor on each group's advantages (see the module doc). Logs `f_grpo/mean_weight`."""

    _name = "FGRPO"
    config_class = FGRPOConfig
    metric_prefix = "f_grpo"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        gamma = self.args.f_grpo_gamma
        weights = focal_weights(batch.valid, batch.group_size, gamma)
        self._metrics[batch.mode]["f_grpo/mean_weight"].append(weights.mean().item())
        advantages = group_zscore(scored_reward(batch), batch.group_size, self.args.scale_rewards)
        return f_grpo_advantages(advantages, batch.valid, batch.group_size, gamma)


__all__ = ["FGRPOConfig", "FGRPOTrainer", "f_grpo_advantages", "focal_weights"]
