r"""RAFT / RAFT++, online rejection-sampling fine-tuning (Dong et al., "RAFT: Reward rAnked FineTuning",
arXiv 2304.06767; Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to
Reinforce", arXiv 2504.11343), as in the latter's code (RLHFlow/Minimal-RL, verl's `adv_estimator=raft`
with `policy_loss=plusplus`).

Why: the simplest online baseline. Each step samples G completions per prompt from the current policy,
keeps the valid ones and trains on them only:

    A(y) = v(y)  (1 for a kept sample, 0 for a rejected one),
    loss = −Σ_t min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A) / (all tokens of the batch),   r_t = π_θ/π_old

which is TRL's clipped surrogate with these advantages: RAFT++ is RAFT plus this importance ratio and
clipping, which act when a generation batch serves several optimizer steps (`steps_per_generation` above
`gradient_accumulation_steps`, or `num_iterations` > 1; the authors' scripts: 1,024 prompts per generation,
mini-batches of 256, so 4 steps). On-policy (TRL's default) r = 1 and RAFT++ is RAFT. Rejected samples stay
in the batch with advantage 0, so they count in the token mean (the authors' code zeroes their advantage
the same way). A group with no valid sample contributes nothing; an all-valid group is trained on in full.

Reading chosen: the authors' code keeps the samples whose reward equals the batch's maximum, and zeroes
everything when that maximum is the failure reward (−1 in their ±1 convention). With a binary verifier the
kept samples are exactly the valid ones (all tied at the maximum), so A = v(y) here, read from the verdicts
(`validity_threshold`); the reward's scale does not matter. `raft_max_per_group = k` keeps only the first k
valid samples of each group (ties broken by sampling order, which is random): k = 1 is the original RAFT's
best-of-n on a binary reward. KL: the authors' scripts add TRL-style k3 KL to the loss with coefficient 0.001
(`beta`, the default here); `beta: 0` is RAFT++ without it.

What it converges to: the expected gradient E_π[v·∇log π] = ∇ E_π[v] is REINFORCE on v without a baseline,
so validity rises to 1, and on a softmax the logit of a valid answer y grows at rate π(y)·(1 − V): the likely
valid answers grow fastest, so the end point keeps fewer of p*'s proportions than p* (tests: KL(p*‖π) among
valid answers is measured on the enumerable one-token task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm


def raft_advantages(valid: torch.Tensor, group_size: int, max_per_group: int | None = None) -> torch.Tensor:
    """(N,) RAFT advantages: 1 for a kept valid sample, 0 otherwise (module doc).

    With `max_per_group = k`, only the first k valid samples of each group (in batch order) are kept.
    """
    grouped = valid.view(-1, group_size) > 0.5
    if max_per_group is not None:
        grouped = grouped & (grouped.long().cumsum(dim=1) <= max_per_group)
    return grouped.to(valid.dtype).reshape(-1)


@dataclass
class RAFTConfig(PostScoringConfig):
    """Configuration of [`RAFTTrainer`]: [`~trl.GRPOConfig`] (its `epsilon` clip) plus which samples are kept."""

    raft_max_per_group: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many valid samples per group (the first ones sampled); unset: every valid "
            "sample, as RAFT++ in the authors' code. 1 is the original RAFT's best-of-n on a binary reward."
        },
    )
    beta: float = field(
        default=0.001,
        metadata={
            "help": "TRL's k3 KL coefficient in the loss; 0.001 in the authors' scripts (kl_loss_coef, low_var_kl). "
            "0: RAFT++ without KL (no reference model is built)."
        },
    )

    def __post_init__(self):
        if self.raft_max_per_group is not None and self.raft_max_per_group < 1:
            raise ValueError(
                f"raft_max_per_group={self.raft_max_per_group} must be ≥ 1, or unset to keep every valid sample"
            )
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta={self.beta} must be a finite number ≥ 0 (0.001 in the authors' scripts)")
        super().__post_init__()


@register_algorithm(
    "raft",
    RAFTConfig,
    "RAFT++ (Xiong et al. 2025): online rejection sampling, train on the valid samples with TRL's ratio and "
    "clip; raft_max_per_group",
)
class RAFTTrainer(PostScoringTrainer):
    """Online rejection-sampling fine-tuning (see the module doc). Logs `raft/kept_fraction`."""

    _name = "RAFT"
    config_class = RAFTConfig
    metric_prefix = "raft"
    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        advantages = raft_advantages(batch.valid, batch.group_size, self.args.raft_max_per_group)
        self._metrics[batch.mode]["raft/kept_fraction"].append(advantages.mean().item())
        return advantages


__all__ = ["RAFTConfig", "RAFTTrainer", "raft_advantages"]
