r"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617), read from verl's `clip_cov` and `kl_cov` policy-loss modes (the authors' port of
PRIME-RL/Entropy-Mechanism-of-RL). Two registry entries, `clip_cov` and `kl_cov`, sharing this module.

Why: under policy gradient the change of the policy's entropy is driven by the covariance, over the tokens, between
a token's log-probability and its advantage: likely tokens with a high advantage lower the entropy. GRPO's entropy
collapses because that covariance stays positive. Both methods restrain the few tokens whose centred product

    cov_t = (A_t − mean A)·(log π(y_t) − mean log π),      means over the micro-batch's completion tokens,

is largest, and leave everything else to the usual clipped surrogate (GRPO's advantages, TRL's loss):

- **Clip-Cov** (`clip_cov`): among the tokens with lb < cov_t < ub (1 and 5) that PPO's clip has not already
  clipped, pick max(1, ⌊ratio·tokens⌋) at random (ratio 2e-4) and stop their gradient (verl multiplies their loss
  by 0, a "correction mask").
- **KL-Cov** (`kl_cov`): take the max(1, ⌊ratio·tokens⌋) tokens with the largest cov_t (ratio 2e-4) and add
  coef·|log π(y_t) − log π_old(y_t)| to their loss (coef 1); verl's `kl_cov` has no ratio clip at all, so
  `epsilon` defaults to 1e6 here (TRL's clip never binds; set 0.2 to keep PPO's clip as well).

How it hooks TRL's loss without copying it: TRL's `_compute_loss` reads the current per-token log-probs from
`_get_per_token_logps_and_entropies`, then builds the clipped surrogate, the KL term and the normaliser itself.
These trainers override that one method, and only while `_compute_loss` runs (with gradients on): Clip-Cov returns
the log-probs with the chosen tokens *detached* (same values, so TRL's ratio, loss value and logs are unchanged,
but those tokens carry no gradient: exactly verl's correction mask for the policy term); KL-Cov computes its
penalty from the same log-probs (with their gradient) and adds it through the post-scoring base's `extra_loss`,
normalised as TRL's "dapo" loss is (the global token mean, verl's "token-mean"). Nothing of TRL's loss is
re-implemented; the selection (the covariance, PPO's clip condition for Clip-Cov) is computed here.

Readings chosen and differences from verl: (1) the advantages are GRPO's group z-score (TRL's, `scale_rewards`),
the paper's base algorithm. (2) `loss_type` must be "dapo" (TRL's default and verl's token-mean) and
`importance_sampling_level` "token". (3) With `beta > 0` Clip-Cov's detached tokens also lose their k3 gradient
(verl masks only the policy term); the defaults have `beta` 0. (4) The random choice uses its own generator
(seeded from `seed` and the process index), so it does not shift the sampling RNG. (5) The selection is per
micro-batch on each process, as verl's per micro-batch; with small micro-batches ⌊2e-4·tokens⌋ is 0 and one token is
chosen. (6) KL-Cov's penalty is |log π − log π_old|: on-policy (one optimizer step per generation, TRL's default)
it is 0 with gradient 0 and KL-Cov is GRPO, so a config that is on-policy warns; the recipes' `kl_cov:` sections
take 4 optimizer steps per generation (`steps_per_generation`), as the authors' runs take several mini-batches per
rollout. Defaults (ratios 2e-4, bounds 1 and 5, coef 1) are verl's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._grpo import check_sum_aggregation, group_zscore, scored_reward
from filtered_rl.trainers._registry import register_algorithm


def token_covariance(advantages: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) centred products (A_t − mean A)(log π_t − mean log π) over the masked tokens; −inf off the mask."""
    mask = mask.bool()
    advantages = (
        advantages.expand_as(logps) if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(logps)
    )
    count = mask.sum().clamp(min=1)
    logps = logps.detach()
    mean_a = (advantages * mask).sum() / count
    mean_l = (logps * mask).sum() / count
    cov = (advantages - mean_a) * (logps - mean_l)
    return torch.where(mask, cov, torch.full_like(cov, -math.inf))


def selection_size(mask: torch.Tensor, ratio: float) -> int:
    """max(1, ⌊ratio·tokens⌋), verl's count of restrained tokens in a micro-batch."""
    return max(1, int(ratio * int(mask.sum().item())))


def ppo_clipped(
    advantages: torch.Tensor, ratio: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """(B, T) True where PPO's clipped term is the one taken (its gradient is already 0)."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return clipped > unclipped


def clip_cov_selection(
    advantages: torch.Tensor,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float,
    lower: float,
    upper: float,
    eps_low: float,
    eps_high: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, T) bool: the tokens Clip-Cov stops (module doc): random among lower < cov < upper, not already clipped."""
    cov = token_covariance(advantages, logps, mask)
    already = ppo_clipped(advantages, torch.exp(logps.detach() - old_logps), eps_low, eps_high)
    candidates = mask.bool() & ~already & (cov > lower) & (cov < upper)
    index = torch.nonzero(candidates.reshape(-1)).squeeze(1)
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    if index.numel():
        order = torch.randperm(index.numel(), generator=generator).to(index.device)
        chosen[index[order[: selection_size(mask, ratio)]]] = True
    return chosen.view_as(candidates)


def kl_cov_selection(
    advantages: torch.Tensor, logps: torch.Tensor, mask: torch.Tensor, *, ratio: float
) -> torch.Tensor:
    """(B, T) bool: the max(1, ⌊ratio·tokens⌋) tokens with the largest covariance (ties: the first in the batch)."""
    cov = token_covariance(advantages, logps, mask).reshape(-1)
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    valid = int(mask.bool().sum().item())
    if valid:
        top = torch.topk(cov, min(selection_size(mask, ratio), valid), largest=True, sorted=True).indices
        chosen[top] = True
    return chosen.view_as(logps)


@dataclass
class CovConfig(PostScoringConfig):
    """What Clip-Cov and KL-Cov share: GRPO's advantages and TRL's token-mean loss."""

    def __post_init__(self):
        if self.loss_type != "dapo":
            raise ValueError(
                f"loss_type={self.loss_type!r}: Clip-Cov and KL-Cov are defined on the token-mean loss (verl's "
                "token-mean, TRL's 'dapo', the default); set loss_type: dapo"
            )
        if self.importance_sampling_level != "token":
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r}: the covariance is per token; set "
                "importance_sampling_level: token"
            )
        check_sum_aggregation(self)
        super().__post_init__()


@dataclass
class ClipCovConfig(CovConfig):
    """Configuration of [`ClipCovTrainer`]: [`~trl.GRPOConfig`] plus which tokens' gradients are stopped."""

    clip_cov_ratio: float = field(
        default=2e-4,
        metadata={
            "help": "Fraction of a micro-batch's completion tokens whose gradient is stopped (at least one); verl's 2e-4."
        },
    )
    clip_cov_lb: float = field(
        default=1.0,
        metadata={"help": "Only tokens with covariance above this are candidates; verl's 1.0."},
    )
    clip_cov_ub: float = field(
        default=5.0,
        metadata={"help": "Only tokens with covariance below this are candidates; verl's 5.0 (above lb)."},
    )

    def __post_init__(self):
        if not (math.isfinite(self.clip_cov_ratio) and 0 < self.clip_cov_ratio <= 1):
            raise ValueError(f"clip_cov_ratio={self.clip_cov_ratio} must lie in (0, 1] (verl's 2e-4)")
        if not (math.isfinite(self.clip_cov_lb) and math.isfinite(self.clip_cov_ub)):
            raise ValueError(
                f"clip_cov_lb={self.clip_cov_lb} and clip_cov_ub={self.clip_cov_ub} must be finite"
            )
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_ub={self.clip_cov_ub} must exceed clip_cov_lb={self.clip_cov_lb} (verl's 1.0 and 5.0)"
            )
        super().__post_init__()


@dataclass
class KLCovConfig(CovConfig):
    """Configuration of [`KLCovTrainer`]: [`~trl.GRPOConfig`] plus which tokens are KL-penalised, and how much."""

    kl_cov_ratio: float = field(
        default=2e-4,
        metadata={
            "help": "Fraction of a micro-batch's completion tokens penalised (those of largest covariance, at least one); verl's 2e-4."
        },
    )
    kl_cov_coef: float = field(
        default=1.0,
        metadata={
            "help": "Coefficient of |log π − log π_old| on the chosen tokens (verl's ppo_kl_coef, 1.0)."
        },
    )
    epsilon: float = field(
        default=1e6,
        metadata={
            "help": "TRL's ratio clip ε. verl's kl_cov has no ratio clip (the KL penalty replaces it), so the default "
            "is large enough never to bind; 0.2 keeps PPO's clip as well."
        },
    )

    def __post_init__(self):
        if not (math.isfinite(self.kl_cov_ratio) and 0 < self.kl_cov_ratio <= 1):
            raise ValueError(f"kl_cov_ratio={self.kl_cov_ratio} must lie in (0, 1] (verl's 2e-4)")
        if not (math.isfinite(self.kl_cov_coef) and self.kl_cov_coef > 0):
            raise ValueError(f"kl_cov_coef={self.kl_cov_coef} must be a finite number > 0 (verl's 1.0)")
        super().__post_init__()
        on_policy = (
            self.num_iterations == 1 and (self.steps_per_generation or 1) <= self.gradient_accumulation_steps
        )
        if on_policy:
            warnings.warn(
                f"kl_cov with steps_per_generation={self.steps_per_generation} and num_iterations=1 is on-policy: "
                "|log π − log π_old| is 0 with gradient 0, so KL-Cov trains as GRPO. Take several optimizer steps "
                "per generation (steps_per_generation > gradient_accumulation_steps, or num_iterations > 1)",
                stacklevel=2,
            )


class _CovTrainer(PostScoringTrainer):
    """GRPO advantages; the policy's per-token log-probs are adjusted while TRL's loss runs (module doc)."""

    needs_reference_model = False  # never reads log a(y): a reference model only for TRL's KL (beta > 0)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cov_inputs: dict[str, Any] | None = None
        self._cov_generator = torch.Generator().manual_seed(
            int(self.args.seed) * 1009 + self.accelerator.process_index
        )

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        return group_zscore(scored_reward(batch), batch.group_size, self.args.scale_rewards)

    def _compute_loss(self, model, inputs):
        self._cov_inputs = inputs
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._cov_inputs = None

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        inputs = self._cov_inputs
        if inputs is not None and torch.is_grad_enabled() and logps.requires_grad:
            self._cov_inputs = None  # once per loss call: TRL reads the policy's log-probs once
            logps = self.restrain(logps, inputs)
        return logps, entropies, aux

    @staticmethod
    def loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def restrain(self, logps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


@register_algorithm(
    "clip_cov",
    ClipCovConfig,
    "Clip-Cov (Cui et al. 2025): GRPO with the gradient of a few high-covariance tokens stopped; clip_cov_ratio",
)
class ClipCovTrainer(_CovTrainer):
    """GRPO whose high-covariance tokens are detached from the loss (module doc). Logs `clip_cov/restrained_frac`."""

    _name = "ClipCov"
    config_class = ClipCovConfig
    metric_prefix = "clip_cov"

    def restrain(self, logps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        args, mask = self.args, self.loss_mask(inputs)
        old = inputs.get("old_per_token_logps")
        chosen = clip_cov_selection(
            inputs["advantages"].to(logps.dtype),
            logps,
            logps.detach() if old is None else old,
            mask,
            ratio=args.clip_cov_ratio,
            lower=args.clip_cov_lb,
            upper=args.clip_cov_ub,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            generator=self._cov_generator,
        )
        self._metrics["train"]["clip_cov/restrained_frac"].append(
            (chosen.sum() / mask.sum().clamp(min=1)).item()
        )
        return torch.where(chosen, logps.detach(), logps)


@register_algorithm(
    "kl_cov",
    KLCovConfig,
    "KL-Cov (Cui et al. 2025): GRPO with |log π − log π_old| on the highest-covariance tokens; kl_cov_ratio",
)
class KLCovTrainer(_CovTrainer):
    """GRPO with a KL penalty on the highest-covariance tokens (module doc). Logs `kl_cov/penalty`."""

    _name = "KLCov"
    config_class = KLCovConfig
    metric_prefix = "kl_cov"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._kl_cov_penalty: torch.Tensor | None = None

    def restrain(self, logps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        mask = self.loss_mask(inputs)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        chosen = kl_cov_selection(
            inputs["advantages"].to(logps.dtype), logps, mask, ratio=self.args.kl_cov_ratio
        )
        penalty = torch.where(chosen & mask.bool(), (logps - old).abs(), torch.zeros_like(logps))
        self._kl_cov_penalty = self.args.kl_cov_coef * penalty.sum()
        self._metrics["train"]["kl_cov/penalty"].append(
            self._kl_cov_penalty.item() / max(int(chosen.sum()), 1)
        )
        return logps

    def extra_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        penalty, self._kl_cov_penalty = self._kl_cov_penalty, None
        if penalty is None:
            return None
        # TRL's "dapo" loss divides the token sum by num_items_in_batch / processes · (accumulation / steps per
        # generation); the base divides extra losses by the accumulation steps, so this is the same token mean.
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        return penalty * self.args.steps_per_generation / tokens


__all__ = [
    "ClipCovConfig",
    "ClipCovTrainer",
    "KLCovConfig",
    "KLCovTrainer",
    "clip_cov_selection",
    "kl_cov_selection",
    "token_covariance",
]
