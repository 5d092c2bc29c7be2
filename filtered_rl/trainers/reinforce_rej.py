r"""Reinforce-Rej (Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to
Reinforce", arXiv 2504.11343), as in the authors' code (RLHFlow/Minimal-RL, verl's
`adv_estimator=reinforce_rej` with `policy_loss=plusplus`).

Why: the paper finds that GRPO's gain over plain REINFORCE comes from the prompts it implicitly drops (a
group whose samples are all wrong has advantage 0), not from its reward normalisation. Reinforce-Rej is
REINFORCE on the raw reward that drops *both* degenerate kinds of group, all-incorrect and all-correct:

    A(y) = r(y)   if the group of y has valid and invalid samples,     r(y) = +1 valid, −1 invalid,
    A(y) = 0      if every sample of the group is valid, or every one invalid,

no baseline and no division by a standard deviation, then TRL's clipped surrogate (importance ratio and
clip ε = 0.2) with the dual clip of the authors' loss: for A < 0 the ratio is capped at c = 3
(`delta = 3.0`, TRL's two-sided clipping, which is the same bound). Dropped samples stay in the batch with
advantage 0 and count in the token mean, as in the authors' code.

Readings chosen: (1) the reward is the authors' ±1 (their RAFT zeroes a batch whose best reward is −1, so an
incorrect sample scores −1); with a 0/1 verifier the verdict v(y) is mapped to r = v − (1 − v)·|n|,
n = `reinforce_rej_negative_reward` (−1; 0 makes it RAFT on the mixed groups only). (2) "All valid / all
invalid" is read from the verdicts (`validity_threshold`), which is the authors' "group reward std = 0" for a
binary reward. (3) KL: the authors' scripts add k3 KL to the loss with coefficient 0.001 (`beta`, the
default here). `reinforce_rej_filter` gives the paper's ablations (drop only all-invalid groups, only
all-valid ones, or none: plain REINFORCE with ±1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm

FILTERS = ("both", "all_invalid", "all_valid", "none")


def reinforce_rej_advantages(
    valid: torch.Tensor, group_size: int, negative_reward: float = -1.0, drop: str = "both"
) -> torch.Tensor:
    """(N,) Reinforce-Rej advantages (module doc): the raw reward (+1 valid, `negative_reward` invalid), 0 for
    the samples of the dropped groups (`drop`: "both", "all_invalid", "all_valid" or "none")."""
    if drop not in FILTERS:
        raise ValueError(f"drop={drop!r}: choose one of {FILTERS}")
    grouped = valid.view(-1, group_size) > 0.5
    reward = torch.where(grouped, 1.0, float(negative_reward)).to(valid.dtype)
    count = grouped.sum(dim=1, keepdim=True)
    dropped = torch.zeros_like(count, dtype=torch.bool)
    if drop in ("both", "all_invalid"):
        dropped = dropped | (count == 0)
    if drop in ("both", "all_valid"):
        dropped = dropped | (count == group_size)
    return torch.where(dropped, torch.zeros_like(reward), reward).reshape(-1)


@dataclass
class ReinforceRejConfig(PostScoringConfig):
    """Configuration of [`ReinforceRejTrainer`]: [`~trl.GRPOConfig`] plus the reward and the group filter."""

    reinforce_rej_negative_reward: float = field(
        default=-1.0,
        metadata={
            "help": "Reward of an invalid sample (a valid one gets +1): −1 in the authors' code; in [−1, 0], 0 "
            "trains on the valid samples of the mixed groups only."
        },
    )
    reinforce_rej_filter: str = field(
        default="both",
        metadata={
            "help": "Which groups get advantage 0: 'both' (all-valid and all-invalid, Reinforce-Rej), "
            "'all_invalid', 'all_valid', or 'none' (plain REINFORCE on ±1): the paper's ablations."
        },
    )
    beta: float = field(
        default=0.001,
        metadata={
            "help": "TRL's k3 KL coefficient in the loss; 0.001 in the authors' scripts (kl_loss_coef, low_var_kl). "
            "0: no KL (no reference model is built)."
        },
    )
    delta: float | None = field(
        default=3.0,
        metadata={
            "help": "Cap on the importance ratio (TRL's two-sided clipping): for negative advantages the dual clip "
            "c = 3 of the authors' loss (verl's clip_ratio_c); None: TRL's one-sided clip only."
        },
    )

    def __post_init__(self):
        if not (
            math.isfinite(self.reinforce_rej_negative_reward)
            and -1.0 <= self.reinforce_rej_negative_reward <= 0
        ):
            raise ValueError(
                f"reinforce_rej_negative_reward={self.reinforce_rej_negative_reward} must lie in [−1, 0] (the "
                "authors' −1; a valid sample gets +1)"
            )
        if self.reinforce_rej_filter not in FILTERS:
            raise ValueError(f"reinforce_rej_filter={self.reinforce_rej_filter!r}: choose one of {FILTERS}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta={self.beta} must be a finite number ≥ 0 (0.001 in the authors' scripts)")
        if self.delta is not None and not self.delta > 1.0 + self.epsilon:
            raise ValueError(
                f"delta={self.delta} must exceed 1 + epsilon = {1.0 + self.epsilon} (the authors' dual clip: 3.0), "
                "or be unset"
            )
        super().__post_init__()


@register_algorithm(
    "reinforce_rej",
    ReinforceRejConfig,
    "Reinforce-Rej (Xiong et al. 2025): REINFORCE on ±1 rewards, all-valid and all-invalid groups dropped; "
    "reinforce_rej_filter",
)
class ReinforceRejTrainer(PostScoringTrainer):
    """REINFORCE with degenerate groups dropped (see the module doc). Logs `reinforce_rej/frac_groups_kept`."""

    _name = "ReinforceRej"
    config_class = ReinforceRejConfig
    metric_prefix = "reinforce_rej"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        advantages = reinforce_rej_advantages(
            batch.valid,
            batch.group_size,
            self.args.reinforce_rej_negative_reward,
            self.args.reinforce_rej_filter,
        )
        kept = batch.grouped(advantages).abs().sum(dim=1) > 0
        self._metrics[batch.mode]["reinforce_rej/frac_groups_kept"].append(kept.double().mean().item())
        return advantages


__all__ = ["ReinforceRejConfig", "ReinforceRejTrainer", "reinforce_rej_advantages"]
