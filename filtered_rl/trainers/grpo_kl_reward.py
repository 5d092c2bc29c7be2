"""GRPO with the KL in the reward (`grpo_klr`): the objective whose optimum the β-from-μ rule describes.

TRL's GRPOTrainer adds β·k3 to the *loss*. On-policy its expected gradient is that of KL(a‖π), not of
KL(π‖a), and by default (`scale_rewards="group"`) the verifier's part of the advantage is divided by the
group's reward std while the KL term is not, so the effective β changes with the validity. Neither run
converges to the tilted model p_β ∝ a·e^{v/β}, and β = 1/(logit μ − logit A) does not give validity μ
(docs/controller.md: μ = 0.6 from A = 0.2 gave 0.99 with the defaults, 0.82 with `scale_rewards="none"`).

This objective folds the KL into the reward before the group baseline, as RLOO does:

    R(y) = v(y) − β·(log π_old(y|x) − log a(y|x))                       (sequence k1, summed over tokens)
    advantage_i = R_i − (1/(K−1))·Σ_{j≠i} R_j                           (leave-one-out baseline)

Since E_{y~π}[log(π/a)·∇log π] = ∇KL(π‖a) (the score has mean 0), TRL's policy-gradient step on these
advantages is a step up E_π[v] − β·KL(π‖a), whose maximiser is exactly p_β, with validity
logit μ = logit A + 1/β. Generation, the clipped token-level surrogate (π/π_old for several steps per
generation), LoRA, gradient accumulation and multi-process training stay TRL's; TRL's own k3 loss term
is switched off (`beta` here is the coefficient *in the reward*, like `RLOOConfig.beta`).

The reward is the binary verdict v(y) of the post-scoring base (`validity_threshold`), the quantity μ and
A are probabilities of. For graded or weighted rewards use TRL's RLOOTrainer, which folds the same KL into
its weighted reward sum.

β-from-μ: `BetaFromValidityCallback(target_validity=μ).attach(trainer)` sets `trainer.beta` after each
generation (used from the next generation's advantages on, as with RLOO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm

# Losses that sum each completion's token terms (then divide by a per-batch constant): the gradient of a
# completion's terms is advantage·∇log π(y), the REINFORCE gradient. Same list as the filtered objective.
TOKEN_SUM_LOSSES = ("dapo", "dr_grpo", "bnpo", "cispo", "luspo")


@dataclass
class GRPOKLRewardConfig(PostScoringConfig):
    r"""Configuration of [`GRPOKLRewardTrainer`]: [`~trl.GRPOConfig`] with the KL folded into the reward.

    (`validity_threshold` and `no_valid_patience` come from `PostScoringConfig`.) `beta` keeps its name but
    not TRL's meaning: it weighs the sequence KL estimate log(π_old/a) subtracted from the verdict, and TRL's
    k3 term in the loss is off. `scale_rewards` must be "none": dividing a group's advantages by its reward
    std is a per-prompt step size that depends on the sampled rewards, which moves the fixed point off p_β.
    """

    beta: float = field(
        default=0.05,
        metadata={
            "help": "KL coefficient β ≥ 0 *in the reward*: each completion's reward is v(y) − β·log(π_old(y)/a(y)) "
            "(as RLOOConfig.beta), so training converges to p_β ∝ a·exp(v/β), validity logit μ = logit A + 1/β. "
            "TRL's k3 loss term is not used. BetaFromValidityCallback may set it from a target validity."
        },
    )
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "Must be 'none' (kept for GRPOConfig compatibility): the advantages are reward minus the "
            "leave-one-out mean of the group, unscaled, so that their expected step is the gradient of "
            "E[v] − β·KL(π‖a)."
        },
    )
    kl_reward_clip: float | None = field(
        default=None,
        metadata={
            "help": "If set (> 0), the per-sequence log-ratio log(π_old/a) is clipped to [−clip, clip] before it "
            "is weighed by β (a guard against a rare sequence that the base model finds extremely unlikely); "
            "None (default) keeps the exact k1 estimate, whose optimum is p_β."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(
                f"beta={self.beta} must be a finite number ≥ 0 (the KL coefficient in the reward)"
            )
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if scale != "none":
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r}: the KL-in-reward objective needs scale_rewards='none'. "
                "Dividing each group's advantages by its reward std changes the step per prompt with the sampled "
                "rewards, and the fixed point is no longer the tilted model p_β (so β-from-μ would miss μ)"
            )
        if self.kl_reward_clip is not None and not self.kl_reward_clip > 0:
            raise ValueError(f"kl_reward_clip={self.kl_reward_clip} must be > 0 or None")
        if self.loss_type not in TOKEN_SUM_LOSSES:
            raise ValueError(
                f"loss_type={self.loss_type!r} averages or reweights each completion's tokens, so its gradient is "
                f"not advantage·∇log π(y); use one of {TOKEN_SUM_LOSSES} ('dapo', TRL's default, is fine)"
            )
        if self.mask_truncated_completions:
            raise ValueError(
                "mask_truncated_completions=True drops truncated completions, which are samples of π too: the "
                "policy gradient would be biased. Leave it False (a truncated answer fails the verifier)"
            )
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True moves the base model a, and with it the optimum p_β ∝ a·exp(v/β); set it "
                "to False"
            )
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                "top_entropy_quantile < 1 keeps only some tokens in the loss, so the gradient is no longer that of "
                "log π(y); set top_entropy_quantile=1.0"
            )
        super().__post_init__()


@register_algorithm(
    "grpo_klr",
    GRPOKLRewardConfig,
    "GRPO with the KL folded into the reward (leave-one-out baseline, unscaled): optimum p_β exactly (beta)",
    accepts_controller=True,
)
class GRPOKLRewardTrainer(PostScoringTrainer):
    """GRPOTrainer whose advantages are v − β·log(π_old/a) minus a leave-one-out baseline; see the module doc.

    Logged per step: `grpo_klr/validity`, `grpo_klr/frac_groups_no_valid`, `grpo_klr/kl` (mean sequence
    log(π_old/a), an unbiased estimate of KL(π‖a)) and `grpo_klr/beta`.
    """

    _name = "GRPOKLReward"
    config_class = GRPOKLRewardConfig
    metric_prefix = "grpo_klr"
    # Read by BetaFromValidityCallback: `beta` weighs KL(π‖a) in the reward, so β-from-μ holds here.
    kl_in_reward = True

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        log_ratio = batch.log_pi_old - batch.log_ref  # k1: E_π[log π/a] = KL(π‖a)
        if self.args.kl_reward_clip is not None:
            log_ratio = log_ratio.clamp(-self.args.kl_reward_clip, self.args.kl_reward_clip)
        beta = float(self.beta)
        rewards = batch.valid - beta * log_ratio if beta else batch.valid.clone()
        grouped = batch.grouped(rewards)
        size = batch.group_size
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (size - 1)  # leave-one-out mean
        metrics = self._metrics[batch.mode]
        metrics[f"{self.metric_prefix}/kl"].append(log_ratio.mean().item())
        metrics[f"{self.metric_prefix}/beta"].append(beta)
        return (grouped - baseline).flatten()

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        # The KL is in the advantages; TRL's loss adds its k3 term whenever self.beta != 0, so hide β from it.
        beta, self.beta = self.beta, 0.0
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.beta = beta


__all__ = ["GRPOKLRewardConfig", "GRPOKLRewardTrainer"]
