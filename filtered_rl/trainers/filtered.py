"""FilteredGRPOTrainer: TRL's GRPOTrainer, with advantages that descend an f-divergence toward p*.

Swap `GRPOConfig`/`GRPOTrainer` for `FilteredGRPOConfig`/`FilteredGRPOTrainer`; generation, reward
functions, the clipped surrogate, LoRA, gradient accumulation and multi-process training stay TRL's.
Only the advantages change (a `PostScoringTrainer` objective): each completion y gets the f-DPG
pseudo-reward R(y) = −f'(π(y)/p(y)) (`filtered_rl.divergences`), with p the filtered model
p* = a·v/A (or the tilted model p_β ∝ a·e^{v/β}), minus a leave-one-out baseline. Since
E_{y~π}[f'(π/p) ∇log π] = ∇D_f(π‖p), TRL's policy-gradient step is then a step down D_f(π‖p).

`_compute_loss` is TRL's: given advantages, its token-level clipped surrogate summed over tokens is the
f-DPG gradient on-policy, and handles π/π_old for `num_iterations` or `steps_per_generation` > 1.
The per-prompt running estimates of A(x) are checkpointed by the base trainer.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from filtered_rl.control import (
    ValidityTracker,
    batch_beta_from_validity,
    beta_from_validity,
    estimate_base_validity,
)
from filtered_rl.divergences import (
    DIVERGENCES,
    TARGETS,
    check_divergence,
    filtered_advantages,
    group_log_partition,
)
from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm

# Losses that sum each completion's token terms (then divide by a per-batch constant): their gradient is
# A(y)·∇log π(y). "grpo" and "sapo" average per completion (a 1/|y| weight), "vespo" reweights per sequence.
TOKEN_SUM_LOSSES = ("dapo", "dr_grpo", "bnpo", "cispo", "luspo")
SCOPES = ("prompt", "batch")
PARTITION_ESTIMATES = ("group", "running", "column")
LEGACY_TRACKER_FILE = "filtered_validity_tracker.json"  # filtered-rl 0.1 checkpoints


@dataclass
class FilteredGRPOConfig(PostScoringConfig):
    r"""Configuration of [`FilteredGRPOTrainer`]: [`~trl.GRPOConfig`] plus the distributional objective.

    (`validity_threshold` and `no_valid_patience` come from `PostScoringConfig`.)

    The policy is trained to minimise D_f(π‖p) for the target p: the filtered model p*(y|x) = a(y|x)·v(y)/A(x)
    (`target="filtered"`), or the tilted model p_β ∝ a·e^{v/β} (`target="tilted"`, the optimum of KL-regularised
    RL with coefficient β). TRL's own reward scaling (`scale_rewards`, `multi_objective_aggregation`) does not
    apply: the advantages are the f-DPG pseudo-rewards. TRL's `beta` (a KL(π‖a) penalty in the loss) still
    applies if set, on top of the objective; leave it at 0.

    Sampling: TRL divides logits by `temperature` for both the policy and the base model, so at T ≠ 1 the
    target is built from the *tempered* base model a_T (per-token softmax(logits/T)) and what approaches it is
    the policy sampled at T. Keep T = 1 (the default) unless that is what you want, and evaluate at the same
    T. `top_p`, `top_k`, `min_p` and `repetition_penalty` change the sampling distribution but not the
    log-probs, which biases Z(x) and the importance weights; a warning is issued.
    """

    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "f-divergence D_f(π‖p) to minimise, one of the registry `filtered_rl.divergences.DIVERGENCES`: "
            + "; ".join(f"'{name}' ({entry.summary})" for name, entry in DIVERGENCES.items())
            + ". Toward target='filtered' only the mass-covering ones are finite."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "α of divergence='alpha': 0 → forward KL, 1 → reverse KL, 0.5 → squared Hellinger (×4). Toward "
            "target='filtered' α must be < 1."
        },
    )
    target: str = field(
        default="filtered",
        metadata={
            "help": "Target distribution: 'filtered' (p* = a·v/A, the base model restricted to valid answers) or "
            "'tilted' (p_β ∝ a·exp(v/β); set `target_beta` or `target_validity`)."
        },
    )
    target_beta: float | None = field(
        default=None,
        metadata={
            "help": "β of target='tilted' (> 0). Smaller β → closer to p*. Exclusive with `target_validity`."
        },
    )
    target_validity: float | None = field(
        default=None,
        metadata={
            "help": "μ in (0, 1) for target='tilted': β is chosen each step so that p_β has validity μ (β = "
            "1/(logit μ − logit A(x)), A(x) the base validity estimated from the group). Exclusive with "
            "`target_beta`."
        },
    )
    target_validity_scope: str = field(
        default="prompt",
        metadata={
            "help": "How `target_validity` sets β: 'prompt' (one β per prompt; prompts whose estimated A(x) is 0, "
            "1 or already ≥ μ get β = inf, i.e. a pull toward the base model) or 'batch' (one β for the batch, "
            "solving mean_x μ_x(β) = μ over prompts with 0 < A(x) < 1)."
        },
    )
    pseudo_reward_clip: float = field(
        default=10.0,
        metadata={
            "help": "Pseudo-rewards −f'(π/p) are clipped to [−clip, clip] (forward KL's p/π is unbounded when π "
            "has little mass where p has much)."
        },
    )
    partition_estimate: str = field(
        default="running",
        metadata={
            "help": "Estimate of A(x) = Σ_y a(y|x)·v(y), the normaliser of p*: 'group' uses only this step's K "
            "samples (self-normalised, so a group that sampled one valid answer takes it for all of p*), "
            "'running' averages the unbiased importance-sampling estimate (1/K)·Σ a·v/π_old over every visit of "
            "the prompt so far (A is a property of the fixed base model, so every visit estimates the same "
            "number). Kept per prompt and saved in checkpoints. 'column' reads A(x) from the dataset column "
            "`base_validity_column`, measured beforehand from base-model samples or, on enumerable tasks, exactly "
            "(`filtered_rl.evaluation.exact`): no estimation noise, at the cost of an offline pass."
        },
    )
    base_validity_column: str = field(
        default="base_validity",
        metadata={
            "help": "Dataset column holding A(x) in (0, 1] per prompt, for partition_estimate='column'."
        },
    )
    alpha_end: float | None = field(
        default=None,
        metadata={
            "help": "With divergence='alpha': anneal α linearly from `alpha` (step 0) to `alpha_end` (max_steps), "
            "e.g. 0.9 → 0: the mode-seeking end raises validity fast, the forward-KL end covers p* late. Unset: "
            "α fixed."
        },
    )

    def __post_init__(self):
        check_divergence(self.divergence, self.alpha, self.target)
        if self.divergence != "alpha" and self.alpha is not None:
            raise ValueError(
                f"alpha={self.alpha} is only used with divergence='alpha' (got divergence={self.divergence!r})"
            )
        if self.target == "tilted":
            if (self.target_beta is None) == (self.target_validity is None):
                raise ValueError(
                    "target='tilted' needs exactly one of target_beta (β > 0) or target_validity (μ in (0, 1))"
                )
        elif self.target_beta is not None or self.target_validity is not None:
            raise ValueError(
                "target_beta/target_validity set with target='filtered', which has no β; use target='tilted' or unset them"
            )
        if self.target_beta is not None and not self.target_beta > 0:
            raise ValueError(f"target_beta must be > 0, got {self.target_beta}")
        if self.target_validity is not None and not 0 < self.target_validity < 1:
            raise ValueError(
                f"target_validity must lie strictly in (0, 1), got {self.target_validity}; "
                "μ → 1 is the filtered model itself (use target='filtered')"
            )
        if self.target_validity_scope not in SCOPES:
            raise ValueError(f"target_validity_scope={self.target_validity_scope!r}: choose one of {SCOPES}")
        if self.alpha_end is not None:
            if self.divergence != "alpha":
                raise ValueError(
                    f"alpha_end={self.alpha_end} anneals α: set divergence='alpha' (and alpha=start)"
                )
            check_divergence("alpha", self.alpha_end, self.target)
        if self.partition_estimate not in PARTITION_ESTIMATES:
            raise ValueError(
                f"partition_estimate={self.partition_estimate!r}: choose one of {PARTITION_ESTIMATES}"
            )
        if not self.pseudo_reward_clip > 0:
            raise ValueError(f"pseudo_reward_clip must be > 0, got {self.pseudo_reward_clip}")
        if self.loss_type not in TOKEN_SUM_LOSSES:
            raise ValueError(
                f"loss_type={self.loss_type!r} does not give the f-divergence gradient: it must sum each "
                f"completion's token terms (the gradient of log π(y)); use one of {TOKEN_SUM_LOSSES} "
                "('dapo', TRL's default, is fine)"
            )
        if self.mask_truncated_completions:
            raise ValueError(
                "mask_truncated_completions=True drops truncated completions, which are samples of π too: Z(x) "
                "and the importance weights would be biased. Leave it False (a truncated answer fails the verifier)"
            )
        if self.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True moves the base model a, and with it the target p* = a·v/A; set it to False"
            )
        if self.top_entropy_quantile != 1.0:
            raise ValueError(
                "top_entropy_quantile < 1 keeps only some tokens in the loss, so the gradient is no longer that of "
                "log π(y); set top_entropy_quantile=1.0"
            )
        if self.temperature != 1.0:
            warnings.warn(
                f"temperature={self.temperature}: TRL scales policy and reference logits by 1/T, so the target is "
                "the filtered *tempered* base model and it is the policy sampled at this T that approaches it",
                stacklevel=2,
            )
        if self.top_p < 1.0 or self.top_k or self.min_p or self.repetition_penalty != 1.0:
            warnings.warn(
                "top_p/top_k/min_p/repetition_penalty change the sampling distribution but not TRL's log-probs: "
                "Z(x) and the importance weights of the filtered objective are biased; prefer plain sampling",
                stacklevel=2,
            )
        super().__post_init__()


@register_algorithm(
    "filtered",
    FilteredGRPOConfig,
    "f-DPG toward the filtered model p* (or p_β): divergence forward_kl | js | tv | alpha | reverse_kl (tilted)",
)
class FilteredGRPOTrainer(PostScoringTrainer):
    """GRPOTrainer whose advantages minimise D_f(π‖p*) (or D_f(π‖p_β)); see `FilteredGRPOConfig`.

    Arguments are GRPOTrainer's (pass everything after `args` by keyword). The reference model is the
    base model a: built even when `args.beta` is 0 (a frozen copy, or the adapter-disabled model with PEFT).
    Logged per step: `filtered/validity`, `filtered/base_validity` (Z(x) of p*, the estimated A(x)),
    `filtered/ess` (effective sample size of the importance weights p/π_old, fraction of the group),
    `filtered/frac_groups_no_valid`, `filtered/pseudo_reward_mean`, `filtered/kl_target_policy` (estimated
    KL(p‖π)) and, toward p_β, `filtered/target_beta` (finite values only).
    """

    _name = "FilteredGRPO"
    config_class = FilteredGRPOConfig
    metric_prefix = "filtered"

    def __init__(self, model, reward_funcs=None, args: FilteredGRPOConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs, args, **kwargs)
        # A(x) is fixed (a property of the base model), so every visit's estimate is averaged (decay → 1).
        self.validity_tracker = ValidityTracker(decay=0.999)
        if self.args.partition_estimate == "running":
            self.register_state("validity_tracker", self.validity_tracker)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        log_pi, log_ref, valid, group_size = batch.log_pi_old, batch.log_ref, batch.valid, batch.group_size
        base_validity = self._base_validity(batch)
        target_beta = self._target_beta(batch, base_validity)
        result = filtered_advantages(
            log_pi,
            log_ref,
            valid,
            group_size,
            divergence=self.args.divergence,
            alpha=self.current_alpha(),
            target=self.args.target,
            target_beta=target_beta,
            pseudo_reward_clip=self.args.pseudo_reward_clip,
            base_validity=base_validity,
        )
        self._log_diagnostics(batch, result, base_validity)
        if self.args.alpha_end is not None:
            self._metrics[batch.mode]["filtered/alpha"].append(self.current_alpha())
        return result["advantages"]

    def current_alpha(self) -> float | None:
        """α in force: fixed, or linearly annealed from `alpha` to `alpha_end` over `max_steps`."""
        args = self.args
        if args.alpha_end is None:
            return args.alpha
        progress = min(1.0, self.state.global_step / max(1, self.state.max_steps or args.max_steps))
        return args.alpha + (args.alpha_end - args.alpha) * progress

    def _load_legacy_state(self, checkpoint: str) -> bool:
        path = os.path.join(checkpoint, LEGACY_TRACKER_FILE)
        if not os.path.exists(path):
            return False
        from filtered_rl.trainers._base import read_json

        fix = "resume from an earlier checkpoint-* folder, or delete this checkpoint folder yourself"
        self.validity_tracker.load_state_dict(read_json(path, "per-prompt A(x) tracker", fix))
        return True

    def _base_validity(self, batch: ScoredBatch) -> torch.Tensor | None:
        """A(x) per group: from the dataset column, the running per-prompt average, or None (the group's own)."""
        if self.args.partition_estimate == "column":
            return _column_base_validity(batch, self.args.base_validity_column)
        if self.args.partition_estimate != "running":
            return None
        # Keys from the gathered prompts, so every process folds in the same values in the same order.
        this_visit = _group_base_validity(batch).clamp(max=1.0)
        return self.validity_tracker.update(batch.group_keys(), this_visit.cpu()).to(batch.log_pi_old.device)

    def _target_beta(
        self, batch: ScoredBatch, base_validity: torch.Tensor | None
    ) -> float | torch.Tensor | None:
        """β of the tilted target: fixed, or from μ and the estimate of A(x) (`filtered_rl.control`)."""
        args = self.args
        if args.target != "tilted":
            return None
        if args.target_validity is None:
            beta: float | torch.Tensor = args.target_beta
        else:
            if base_validity is None:
                base_validity = estimate_base_validity(
                    batch.valid, batch.group_size, log_ref=batch.log_ref, log_pi_old=batch.log_pi_old
                )
            if args.target_validity_scope == "prompt":
                beta = beta_from_validity(args.target_validity, base_validity, strict=False)
            else:
                beta = batch_beta_from_validity(args.target_validity, base_validity, strict=False)
        finite = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
        finite = finite[torch.isfinite(finite)]
        if finite.numel():  # every prompt at β = inf (no tilt possible) logs nothing rather than inf
            self._metrics[batch.mode]["filtered/target_beta"].append(finite.mean().item())
        return beta

    def _log_diagnostics(
        self, batch: ScoredBatch, result: dict[str, torch.Tensor], base_validity: torch.Tensor | None
    ) -> None:
        # Values are gathered, hence identical on every process.
        metrics = self._metrics[batch.mode]
        if base_validity is None:  # this group's importance-sampling estimate of A(x), Z(x) of p*
            base_validity = _group_base_validity(batch)
        rows = result["has_support"].repeat_interleave(batch.group_size)
        metrics["filtered/base_validity"].append(base_validity.mean().item())
        supported = result["has_support"]
        if supported.any():
            metrics["filtered/ess"].append(result["ess"][supported].mean().item())
            metrics["filtered/pseudo_reward_mean"].append(result["pseudo_rewards"][rows].mean().item())
            metrics["filtered/kl_target_policy"].append(result["kl_target_policy"][supported].mean().item())


def _column_base_validity(batch: ScoredBatch, column: str) -> torch.Tensor:
    """A(x) per group from a dataset column (gathered: a group may straddle processes)."""
    from accelerate.utils import gather_object

    if column not in batch.inputs[0]:
        raise KeyError(
            f"partition_estimate='column' needs a dataset column {column!r} with A(x) per prompt (columns: "
            f"{sorted(batch.inputs[0])}); add it or set base_validity_column=..."
        )
    values = gather_object([float(row[column]) for row in batch.inputs])[:: batch.group_size]
    values = torch.tensor(values, dtype=torch.float64, device=batch.log_pi_old.device)
    if ((values <= 0) | (values > 1) | torch.isnan(values)).any():
        raise ValueError(
            f"column {column!r} must hold A(x) in (0, 1]; got {values[(values <= 0) | (values > 1)][:3].tolist()}"
        )
    return values


def _group_base_validity(batch: ScoredBatch) -> torch.Tensor:
    """This visit's importance-sampling estimate of A(x) per group: (1/K) Σ a·v/π_old."""
    log_valid_ref = torch.where(batch.valid > 0, batch.log_ref, torch.full_like(batch.log_ref, -math.inf))
    return group_log_partition(log_valid_ref, batch.log_pi_old, batch.group_size).exp()


__all__ = ["DIVERGENCES", "TARGETS", "FilteredGRPOConfig", "FilteredGRPOTrainer"]
