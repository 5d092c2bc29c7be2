"""GRPO's group-normalised advantages as a pure function, for the objectives that reshape rewards first.

MARA, the unlikeliness reward and inverse-success calibration change the rewards (or the positive
advantages) and then hand them to "the usual group z-score". `group_zscore` is TRL 1.16's formula for
`multi_objective_aggregation="sum_then_normalize"` (grpo_trainer.py), written once here so that those
objectives differ from the `grpo` arm only in what they change: a NaN-aware group mean, the unbiased
NaN-aware standard deviation of the group (`scale_rewards="group"`) or of the whole batch (`"batch"`),
+1e-4, and advantage 0 for unscorable completions.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import nanstd

SCALE_REWARDS = ("group", "batch", "none")
_STD_EPS = 1e-4  # TRL's


def group_zscore(reward: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """(N,) advantages: reward minus its group mean, divided by the group (or batch) std + 1e-4.

    NaN rewards (completions no reward function scored) are left out of the statistics and get 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: choose one of {SCALE_REWARDS}")
    grouped = reward.view(-1, group_size)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + _STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(reward) + _STD_EPS)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def scored_reward(batch: Any) -> torch.Tensor:
    """The batch's weighted reward sum, NaN where no reward function applied (as TRL treats those rows)."""
    unscorable = torch.isnan(batch.rewards_per_func).all(dim=1)
    return torch.where(unscorable, torch.full_like(batch.reward, float("nan")), batch.reward)


def check_sum_aggregation(config: Any) -> None:
    """These objectives reshape the weighted reward sum; TRL's per-function normalisation would be ignored."""
    if config.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={config.multi_objective_aggregation!r}: this objective reshapes the "
            "weighted sum of the rewards, so only 'sum_then_normalize' (TRL's default) applies; set it back"
        )
