r"""MARA: mode-anchored reward augmentation (GX-Chen et al., "KL-Regularized Reinforcement Learning is
Designed to Mode Collapse", arXiv 2510.20817).

Why: under reverse-KL regularisation with coefficient β the optimal policy is p ∝ a·exp(R/β). With a 0/1
verifier every valid answer has the same R, so p keeps the base model's *ratios* between valid answers:
a valid answer the base model finds 100× less likely stays 100× less likely, and at small β the target
is, by construction, concentrated on the base model's favourite valid answer. MARA changes the rewards
so that the KL-optimal target is flat over the high-reward samples: within a group, S = {i : R_i ≥ τ};
the anchor z ∈ S is the member with the highest base log-prob log a(y); every i ∈ S gets

    R̄_i = R(z) + β·(log a(z) − log a(y_i)),

the others keep R. Then a(y_i)·exp(R̄_i/β) = a(z)·exp(R(z)/β) for every i ∈ S: one value, a flat target.

Reading chosen (the paper regularises with reverse KL and uses one β): MARA's β *is* the KL coefficient,
`mara_beta`, and by default (`mara_kl="reward"`) the KL is folded into the reward exactly as RLOO does,
R̃_i = R̄_i − β·(log π_old(y_i) − log a(y_i)) (k1 on the sequence), so that REINFORCE's fixed point is
exactly the flat target; TRL's `beta` (its k3 term in the loss) must then be 0, or the run would carry two
different KLs. Because the KL sits inside the reward, `scale_rewards` ("group" by default) divides reward
*and* KL by the same per-group number: a per-prompt step size, not a change of the per-prompt optimum.
`mara_kl="loss"` instead keeps TRL's k3 term with `beta == mara_beta` (what many GRPO setups do); then
`scale_rewards` divides only the reward part, so the effective KL coefficient becomes β·std and the target
is no longer flat (and k3's gradient is not that of KL(π‖a), see the TRL notes): a warning says so unless
`scale_rewards="none"`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm

KL_PLACEMENTS = ("reward", "loss")


def mara_rewards(
    reward: torch.Tensor, log_ref: torch.Tensor, group_size: int, beta: float, tau: float = 1.0
) -> torch.Tensor:
    """(N,) augmented rewards R̄: within each group, samples with R ≥ τ are anchored to the likeliest of them.

    `reward` (N,) rewards (NaN: unscored, never in S); `log_ref` (N,) sequence log-probs log a(y) under the
    base model; groups are consecutive. A group with no sample in S is returned unchanged. Ties for the
    anchor go to the first sample (any tied member gives the same R̄ when the tied rewards are equal).
    """
    rewards = reward.view(-1, group_size)
    log_a = log_ref.view(-1, group_size).to(rewards.dtype)
    in_set = rewards >= tau  # NaN compares False
    anchor_log_a, anchor = torch.where(in_set, log_a, torch.full_like(log_a, -math.inf)).max(
        dim=1, keepdim=True
    )
    anchor_reward = rewards.gather(1, anchor)
    anchor_log_a = torch.where(torch.isfinite(anchor_log_a), anchor_log_a, torch.zeros_like(anchor_log_a))
    augmented = anchor_reward + beta * (anchor_log_a - log_a)
    return torch.where(in_set, augmented, rewards).reshape(-1)


def mara_advantages(
    reward: torch.Tensor,
    log_ref: torch.Tensor,
    log_pi_old: torch.Tensor,
    group_size: int,
    beta: float,
    tau: float = 1.0,
    kl_in_reward: bool = True,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """(N,) advantages: group z-score of R̄ (minus β·(log π_old − log a) when the KL is in the reward)."""
    shaped = mara_rewards(reward, log_ref, group_size, beta, tau)
    if kl_in_reward:
        shaped = shaped - beta * (log_pi_old.to(shaped.dtype) - log_ref.to(shaped.dtype))
    return group_zscore(shaped, group_size, scale_rewards)


@dataclass
class MARAConfig(PostScoringConfig):
    """Configuration of [`MARATrainer`]: [`~trl.GRPOConfig`] plus MARA's anchor and KL coefficient (module doc)."""

    mara_beta: float = field(
        default=0.1,
        metadata={
            "help": "β > 0: the reverse-KL coefficient and the anchor's slope, R̄_i = R(z) + β·(log a(z) − log a(y_i)). "
            "One β for both is what makes the KL-optimal target flat over the high-reward samples."
        },
    )
    mara_tau: float = field(
        default=1.0,
        metadata={
            "help": "τ: samples with reward ≥ τ form the anchored set S (1.0 for a 0/1 verifier: the valid ones)."
        },
    )
    mara_kl: str = field(
        default="reward",
        metadata={
            "help": "Where the KL goes: 'reward' (k1 β·(log π_old − log a) subtracted from R̄ before the group "
            "baseline: the flat target is the exact fixed point; TRL's `beta` must be 0) or 'loss' (TRL's k3 term, "
            "`beta` must equal `mara_beta`; inexact, see the module doc)."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.mara_beta) and self.mara_beta > 0):
            raise ValueError(
                f"mara_beta={self.mara_beta} must be a finite number > 0: it is the KL coefficient MARA anchors to "
                "(e.g. mara_beta: 0.1)"
            )
        if not math.isfinite(self.mara_tau):
            raise ValueError(f"mara_tau={self.mara_tau} must be finite (1.0 for a 0/1 verifier)")
        if self.mara_kl not in KL_PLACEMENTS:
            raise ValueError(f"mara_kl={self.mara_kl!r}: choose one of {KL_PLACEMENTS}")
        if self.mara_kl == "reward" and self.beta != 0:
            raise ValueError(
                f"beta={self.beta} with mara_kl='reward': MARA already puts the KL (coefficient mara_beta) in the "
                "reward; TRL's k3 term would add a second one. Set beta: 0, or mara_kl: loss with beta == mara_beta"
            )
        if self.mara_kl == "loss" and self.beta != self.mara_beta:
            raise ValueError(
                f"beta={self.beta} with mara_kl='loss': the anchor is flat only for the KL coefficient it was built "
                f"with; set beta: {self.mara_beta} (= mara_beta)"
            )
        if self.mara_kl == "loss" and self.scale_rewards not in ("none", False):
            warnings.warn(
                f"mara_kl='loss' with scale_rewards={self.scale_rewards!r}: dividing the rewards by their std changes "
                "the effective KL coefficient, so the target is no longer flat; prefer scale_rewards: none",
                stacklevel=2,
            )
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "mara",
    MARAConfig,
    "MARA (GX-Chen et al. 2025): valid samples anchored to the likeliest, flat KL-optimal target; mara_beta",
)
class MARATrainer(PostScoringTrainer):
    """GRPO on mode-anchored rewards R̄ (see the module doc). Logs `mara/anchored_fraction`."""

    _name = "MARA"
    config_class = MARAConfig
    metric_prefix = "mara"

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        args = self.args
        reward = scored_reward(batch)
        self._metrics[batch.mode]["mara/anchored_fraction"].append(
            (reward >= args.mara_tau).double().mean().item()
        )
        return mara_advantages(
            reward,
            batch.log_ref,
            batch.log_pi_old,
            batch.group_size,
            beta=args.mara_beta,
            tau=args.mara_tau,
            kl_in_reward=args.mara_kl == "reward",
            scale_rewards=args.scale_rewards,
        )
