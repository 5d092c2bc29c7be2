r"""Unlikeliness reward (He, Fried & Welleck, "Rewarding the Unlikely: Lifting GRPO Beyond Distribution
Sharpening", arXiv 2506.02355), as in the authors' reference code.

Why: GRPO's update on a group raises the likelihood of its correct samples, and the likeliest correct ones
gain most (rank bias): the policy sharpens onto answers it already found, and pass@N for large N falls
below the base model's. The unlikeliness reward penalises the likely correct samples: in each group the
samples are ranked by their length-normalised log-prob under the sampling policy π_old (mean token
log-prob), and

    r_i ← r_i · (1 − c · rank_i / G),        c = 0.25 (the authors' `rank_penalty`),

followed by the usual group z-score (`scale_rewards`).

Rank convention (read from the reference code, `verl/trainer/ppo/ray_lean_trainer.py::_compute_advantages`
of AndreHe02/rewarding-unlikely-release: `argsort(argsort(mean_old_log_probs)) / G`): 0-based, ascending in
likelihood, so the *least* likely sample of the group has rank 0 (no penalty) and the likeliest has rank
G − 1 (penalty c·(G−1)/G). The ranks are taken over the whole group, correct and incorrect samples alike
(`unlikeliness_rank_over="group"`, the reference code); since an incorrect sample's reward is 0, only the
correct ones change, but a correct sample's rank counts the incorrect samples below it.
`unlikeliness_rank_over="correct"` ranks the correct samples among themselves (rank 0 … |S|−1, still
divided by G), the other reading of the paper's "rank the correct samples". Ties: the earlier sample
ranks lower (a stable sort; the reference's unstable argsort leaves it arbitrary). The variant that ranks
by *reward* is not this method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm

RANK_OVER = ("group", "correct")


def likelihood_ranks(
    mean_logp: torch.Tensor, group_size: int, among: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) 0-based ascending ranks of `mean_logp` within each group (0 = least likely; ties: earlier first).

    With `among` (N,) bool, only those samples are ranked among themselves (the others get rank 0).
    """
    values = mean_logp.view(-1, group_size).double()
    if among is not None:
        mask = among.view(-1, group_size)
        values = torch.where(mask, values, torch.full_like(values, float("inf")))  # the excluded sort last
    order = torch.sort(values, dim=1, stable=True).indices
    ranks = torch.sort(order, dim=1, stable=True).indices
    if among is not None:
        ranks = torch.where(mask, ranks, torch.zeros_like(ranks))
    return ranks.reshape(-1)


def unlikeliness_rewards(
    reward: torch.Tensor,
    mean_logp: torch.Tensor,
    group_size: int,
    penalty: float = 0.25,
    rank_over: str = "group",
) -> torch.Tensor:
    """(N,) r · (1 − penalty · rank / G), ranks by π_old mean token log-prob (module doc for the convention)."""
    if rank_over not in RANK_OVER:
        raise ValueError(f"rank_over={rank_over!r}: choose one of {RANK_OVER}")
    among = (reward > 0) if rank_over == "correct" else None
    ranks = likelihood_ranks(mean_logp, group_size, among).to(reward.dtype)
    return reward * (1.0 - penalty * ranks / group_size)


def unlikeliness_advantages(
    reward: torch.Tensor,
    mean_logp: torch.Tensor,
    group_size: int,
    penalty: float = 0.25,
    rank_over: str = "group",
    scale_rewards: str = "group",
) -> torch.Tensor:
    """(N,) group z-score of the unlikeliness-penalised rewards."""
    shaped = unlikeliness_rewards(reward, mean_logp, group_size, penalty, rank_over)
    return group_zscore(shaped, group_size, scale_rewards)


@dataclass
class UnlikelinessConfig(PostScoringConfig):
    """Configuration of [`UnlikelinessTrainer`]: [`~trl.GRPOConfig`] plus the rank penalty (module doc)."""

    unlikeliness_penalty: float = field(
        default=0.25,
        metadata={
            "help": "c in r·(1 − c·rank/G): how much the likeliest correct sample of a group is penalised "
            "(0.25 in the authors' recipe; 0 is GRPO). In [0, 1]."
        },
    )
    unlikeliness_rank_over: str = field(
        default="group",
        metadata={
            "help": "Which samples the likelihood ranks are taken over: 'group' (all G, as the reference code) or "
            "'correct' (the correct samples among themselves)."
        },
    )

    def __post_init__(self):
        if not 0.0 <= self.unlikeliness_penalty <= 1.0:
            raise ValueError(
                f"unlikeliness_penalty={self.unlikeliness_penalty} must lie in [0, 1] (a larger c would make the "
                "likeliest correct sample's reward negative); the authors use 0.25"
            )
        if self.unlikeliness_rank_over not in RANK_OVER:
            raise ValueError(
                f"unlikeliness_rank_over={self.unlikeliness_rank_over!r}: choose one of {RANK_OVER}"
            )
        check_sum_aggregation(self)
        super().__post_init__()


@register_algorithm(
    "unlikeliness",
    UnlikelinessConfig,
    "Unlikeliness reward (He et al. 2025): likely correct samples penalised by π_old rank; unlikeliness_penalty",
)
class UnlikelinessTrainer(PostScoringTrainer):
    """GRPO on unlikeliness-penalised rewards (see the module doc)."""

    _name = "Unlikeliness"
    config_class = UnlikelinessConfig
    metric_prefix = "unlikeliness"
    needs_reference_model = False  # never reads log a(y): no base model is built or run (unless beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        mean_logp = batch.log_pi_old / batch.lengths.to(batch.log_pi_old.dtype).clamp(min=1.0)
        return unlikeliness_advantages(
            scored_reward(batch),
            mean_logp,
            batch.group_size,
            penalty=self.args.unlikeliness_penalty,
            rank_over=self.args.unlikeliness_rank_over,
            scale_rewards=self.args.scale_rewards,
        )
