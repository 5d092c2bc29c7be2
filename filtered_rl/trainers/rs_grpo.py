r"""RS-GRPO: risk-seeking GRPO (Jiang et al., "Risk-Sensitive RL for Alleviating Exploration Dilemmas in Large
Language Models", arXiv 2509.24261), as in the authors' code (Jackory/RS-GRPO, `compute_rs_grpo_advantage`).

Why: the mean-reward objective sharpens the policy around the modes it already has. The risk-seeking objective
J_β = (1/β)·log E_π[e^{β r}] interpolates between the mean reward (β → 0) and the maximum (β → ∞); its policy
gradient has the per-sample advantage, estimated from a group of N samples,

    A_β(y_i) = (1/β)·( e^{β r_i} / ((1/N)·Σ_j e^{β r_j}) − 1 ),

no division by a standard deviation (`scale_rewards` does not apply). The authors recommend β = 2.

For a binary reward this is a re-weighted Dr.GRPO: the advantages sum to 0 over the group, and with c of N samples
valid, m = 1 + (c/N)·(e^β − 1), A_β(y) = (e^β − 1)/(β·m)·(r − c/N): the group-centred reward times a factor
that is largest for hard prompts (c/N small: (e^β − 1)/β) and smallest for easy ones ((e^β − 1)/(β·e^β)).
Ties (all valid, all invalid) give 0; a group of one sample gives 0 (as the authors' code).

Reading chosen: the reward is TRL's weighted reward sum (the verdict for a 0/1 verifier), computed in log space
(logsumexp) so large β does not overflow; unscored completions (NaN) are left out of the mean and get 0.
What it converges to: for a binary reward J_β is increasing in the validity V, so its optimum is V = 1 with no
preference among valid answers (asserted on the enumerable task; its KL to p* among valid answers is measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, scored_reward
from filtered_rl.trainers._registry import register_algorithm


def rs_grpo_advantages(reward: torch.Tensor, group_size: int, beta: float = 2.0) -> torch.Tensor:
    """(N,) risk-seeking advantages (1/β)(e^{βr}/mean e^{βr} − 1) per group; NaN rewards are left out and get 0."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta} must be a finite number > 0")
    grouped = reward.view(-1, group_size).to(torch.float64)
    scored = ~torch.isnan(grouped)
    scaled = torch.where(scored, beta * grouped, torch.full_like(grouped, -math.inf))
    counts = scored.sum(dim=1, keepdim=True)
    log_mean = torch.logsumexp(scaled, dim=1, keepdim=True) - counts.clamp(min=1).to(torch.float64).log()
    advantages = torch.expm1(scaled - log_mean) / beta
    keep = scored & (counts > 1)
    return torch.where(keep, advantages, torch.zeros_like(advantages)).reshape(-1).to(reward.dtype)


@dataclass
class RSGRPOConfig(PostScoringConfig):
    """Configuration of [`RSGRPOTrainer`]: [`~trl.GRPOConfig`] plus the risk-seeking coefficient β."""

    rs_grpo_beta: float = field(
        default=2.0,
        metadata={
            "help": "β > 0 of the risk-seeking objective (1/β)·log E[e^{βr}]: toward 0 the mean reward (Dr.GRPO's "
            "advantages), large β the maximum; 2 is the authors' recommendation. Not TRL's KL `beta`."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.rs_grpo_beta) and 0 < self.rs_grpo_beta <= 50):
            raise ValueError(
                f"rs_grpo_beta={self.rs_grpo_beta} must be a number in (0, 50] (the authors recommend 2; it is "
                "not TRL's KL beta)"
            )
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "rs_grpo",
    RSGRPOConfig,
    "RS-GRPO (Jiang et al. 2025): risk-seeking advantage (1/β)(e^{βr}/mean e^{βr} − 1); rs_grpo_beta",
)
class RSGRPOTrainer(PostScoringTrainer):
    """GRPO with the risk-seeking advantage (see the module doc)."""

    _name = "RSGRPO"
    config_class = RSGRPOConfig
    metric_prefix = "rs_grpo"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        return rs_grpo_advantages(scored_reward(batch), batch.group_size, self.args.rs_grpo_beta)


__all__ = ["RSGRPOConfig", "RSGRPOTrainer", "rs_grpo_advantages"]
