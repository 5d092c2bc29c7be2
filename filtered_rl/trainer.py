"""FilteredGRPOTrainer: TRL's GRPOTrainer, with advantages that descend an f-divergence toward p*.

Swap `GRPOConfig`/`GRPOTrainer` for `FilteredGRPOConfig`/`FilteredGRPOTrainer`; generation, reward
functions, the clipped surrogate, LoRA, gradient accumulation and multi-process training stay TRL's.
Only the advantages change: after TRL has generated and scored a batch, each completion y gets the
f-DPG pseudo-reward R(y) = −f'(π(y)/p(y)) (`filtered_rl.divergences`), with p the filtered model
p* = a·v/A (or the tilted model p_β ∝ a·e^{v/β}), minus a leave-one-out baseline. Since
E_{y~π}[f'(π/p) ∇log π] = ∇D_f(π‖p), TRL's policy-gradient step is then a step down D_f(π‖p).

Hooks into TRL (tested range: trl>=1.16,<1.17), each calling TRL's own method first, none copying TRL code:
- `__init__`: the objective needs the base model's log-probs even when the KL coefficient `beta` is 0,
  where TRL builds no reference model. TRL is constructed with a non-zero `beta` (so it builds the
  reference its own way: a frozen copy, or the adapter-disabled model with PEFT) and `beta` is set back.
- `_calculate_rewards`: TRL sums weighted rewards and keeps no raw ones; the wrapper keeps the gathered
  per-function rewards, from which validity v(y) is read.
- `_generate_and_score_completions`: calls TRL's (with `beta` non-zero for the call, so that TRL computes
  the reference log-probs), then replaces `advantages` and logs the diagnostics.
- `_save_checkpoint` / `_load_optimizer_and_scheduler`: add the per-prompt running estimates of A(x) to
  checkpoints (a JSON file), the way TRL saves its own entropy controller.
`_compute_loss` is TRL's: given advantages, its token-level clipped surrogate summed over tokens is the
f-DPG gradient on-policy, and handles π/π_old for `num_iterations` or `steps_per_generation` > 1.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from filtered_rl.control import (
    ValidityTracker,
    batch_beta_from_validity,
    beta_from_validity,
    estimate_base_validity,
    prompt_key,
)
from filtered_rl.divergences import (
    DIVERGENCES,
    TARGETS,
    check_divergence,
    filtered_advantages,
    group_log_partition,
)

TESTED_TRL = ">=1.16,<1.17"

# Losses that sum each completion's token terms (then divide by a per-batch constant): their gradient is
# A(y)·∇log π(y). "grpo" and "sapo" average per completion (a 1/|y| weight), "vespo" reweights per sequence.
TOKEN_SUM_LOSSES = ("dapo", "dr_grpo", "bnpo", "cispo", "luspo")
SCOPES = ("prompt", "batch")
PARTITION_ESTIMATES = ("group", "running")

TRACKER_FILE = "filtered_validity_tracker.json"

# Any non-zero value: TRL only tests `beta != 0` when deciding to build and run the reference model.
_REFERENCE_ONLY_BETA = 1.0

# Keys of TRL's batch dict that its forward pass takes (multimodal inputs), forwarded unchanged.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class FilteredGRPOConfig(GRPOConfig):
    r"""Configuration of [`FilteredGRPOTrainer`]: [`~trl.GRPOConfig`] plus the distributional objective.

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
            "help": "f-divergence D_f(π‖p) to minimise: 'forward_kl' (KL(p‖π), mass-covering), 'reverse_kl' "
            "(KL(π‖p), only toward target='tilted', where it equals KL-regularised RL), 'js' (Jensen–Shannon), "
            "'tv' (total variation) or 'alpha' (Amari α-divergence, set `alpha`)."
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
            "number). Kept per prompt and saved in checkpoints."
        },
    )
    validity_threshold: float = field(
        default=0.5,
        metadata={
            "help": "A completion is valid when every reward function with non-zero weight returns a reward above "
            "this threshold (binary verifiers return 0/1). None (NaN) means 'does not apply' and is skipped; a "
            "completion no function applies to is invalid."
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


def validity_from_rewards(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, threshold: float = 0.5
) -> torch.Tensor:
    """v(y) ∈ {0, 1}: every weighted reward function that applies (non-NaN) returns > threshold.

    Reward functions with weight 0 are ignored (logged only). A row where no function applies is invalid.
    """
    used = reward_weights.to(rewards_per_func.device) != 0
    rewards = rewards_per_func[:, used]
    applies = ~torch.isnan(rewards)
    passes = (rewards > threshold) | ~applies
    return (passes.all(dim=1) & applies.any(dim=1)).to(torch.float64)


class FilteredGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages minimise D_f(π‖p*) (or D_f(π‖p_β)); see `FilteredGRPOConfig`.

    Arguments are GRPOTrainer's (pass everything after `args` by keyword). The reference model is the
    base model a: built even when `args.beta` is 0 (a frozen copy, or the adapter-disabled model with PEFT).
    Logged per step: `filtered/validity`, `filtered/base_validity` (Z(x) of p*, the estimated A(x)),
    `filtered/ess` (effective sample size of the importance weights p/π_old, fraction of the group),
    `filtered/frac_groups_no_valid`, `filtered/pseudo_reward_mean`, `filtered/kl_target_policy` (estimated
    KL(p‖π)) and, toward p_β, `filtered/target_beta`.
    """

    _tag_names = ["trl", "grpo", "filtered-rl"]
    _name = "FilteredGRPO"

    def __init__(
        self, model: Any, reward_funcs: Any = None, args: FilteredGRPOConfig | None = None, **kwargs: Any
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = FilteredGRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-FilteredGRPO")
        if not isinstance(args, FilteredGRPOConfig):
            raise TypeError(
                f"args must be a FilteredGRPOConfig (got {type(args).__name__}); it adds the divergence and target"
            )
        user_beta = args.beta
        args.beta = user_beta or _REFERENCE_ONLY_BETA  # make TRL build the reference model (see module doc)
        try:
            super().__init__(model, reward_funcs, args, **kwargs)
        finally:
            args.beta = user_beta
        self.beta = user_beta
        self._gathered_rewards: torch.Tensor | None = None
        # A(x) is fixed (a property of the base model), so every visit's estimate is averaged (decay → 1).
        self.validity_tracker = ValidityTracker(decay=0.999)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the per-function rewards gathered over processes but keeps no raw copy after weighting.
        self._gathered_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._gathered_rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        user_beta = self.beta
        self.beta = user_beta or _REFERENCE_ONLY_BETA  # TRL computes ref_per_token_logps only when beta != 0
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.beta = user_beta
        ref_logps = output["ref_per_token_logps"] if user_beta else output.pop("ref_per_token_logps")

        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        mask = output["completion_mask"] * output.get("tool_mask", 1)
        old_logps = output.get("old_per_token_logps")
        if old_logps is None:  # TRL skips it when π_old is the current policy; the objective needs it anyway
            old_logps = self._sampling_policy_logps(output, mode)
        # Sequence log-probs, gathered: a prompt's group may straddle processes (as TRL gathers rewards).
        log_pi = self.accelerator.gather((old_logps.float() * mask).sum(dim=1)).double()
        log_ref = self.accelerator.gather((ref_logps.float() * mask).sum(dim=1)).double()
        valid = validity_from_rewards(
            self._gathered_rewards, self.reward_weights, self.args.validity_threshold
        )
        valid = valid.to(log_pi.device)
        if group_size < 2:  # eval with num_generations_eval=1: no baseline, keep TRL's advantages
            self._metrics[mode]["filtered/validity"].append(valid.mean().item())
            return output

        base_validity = self._base_validity(inputs, valid, log_ref, log_pi, group_size)
        target_beta = self._target_beta(valid, log_ref, log_pi, group_size, mode, base_validity)
        result = filtered_advantages(
            log_pi,
            log_ref,
            valid,
            group_size,
            divergence=self.args.divergence,
            alpha=self.args.alpha,
            target=self.args.target,
            target_beta=target_beta,
            pseudo_reward_clip=self.args.pseudo_reward_clip,
            base_validity=base_validity,
        )
        advantages = result["advantages"].to(
            device=output["advantages"].device, dtype=output["advantages"].dtype
        )
        local = output["advantages"].numel()
        index = self.accelerator.process_index
        output["advantages"] = advantages[index * local : (index + 1) * local]
        self._replace_logged_advantages(advantages)
        self._log_diagnostics(mode, result, valid, log_ref, log_pi, group_size, base_validity)
        return output

    def _save_checkpoint(self, model, trial):
        # The running A(x) estimates are training state: saved beside the optimizer, as TRL saves its own.
        super()._save_checkpoint(model, trial)
        if self.args.partition_estimate == "running" and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, TRACKER_FILE)
            with open(path, "w") as f:
                json.dump(self.validity_tracker.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, TRACKER_FILE) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                self.validity_tracker.load_state_dict(json.load(f))

    def _sampling_policy_logps(self, output: dict[str, Any], mode: str) -> torch.Tensor:
        """Per-token log π_old of the completions, as TRL computes `old_per_token_logps` when it needs them."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=batch_size,
                **{key: output.get(key) for key in _FORWARD_KEYS},
            )
        return logps

    def _base_validity(
        self,
        inputs: list[dict[str, Any]],
        valid: torch.Tensor,
        log_ref: torch.Tensor,
        log_pi: torch.Tensor,
        group_size: int,
    ) -> torch.Tensor | None:
        """Running per-prompt A(x) (`partition_estimate="running"`), else None (the group estimates its own)."""
        if self.args.partition_estimate != "running":
            return None
        # Keys from the gathered prompts, so every process folds in the same values in the same order.
        keys = [prompt_key(prompt) for prompt in gather_object([x["prompt"] for x in inputs])[::group_size]]
        log_valid_ref = torch.where(valid > 0, log_ref, torch.full_like(log_ref, -math.inf))
        this_visit = group_log_partition(log_valid_ref, log_pi, group_size).exp().clamp(max=1.0)
        return self.validity_tracker.update(keys, this_visit.cpu()).to(log_pi.device)

    def _target_beta(
        self,
        valid: torch.Tensor,
        log_ref: torch.Tensor,
        log_pi: torch.Tensor,
        group_size: int,
        mode: str,
        base_validity: torch.Tensor | None = None,
    ) -> float | torch.Tensor | None:
        """β of the tilted target: fixed, or from μ and the estimate of A(x) (`filtered_rl.control`)."""
        args = self.args
        if args.target != "tilted":
            return None
        if args.target_validity is None:
            beta: float | torch.Tensor = args.target_beta
        else:
            if base_validity is None:
                base_validity = estimate_base_validity(valid, group_size, log_ref=log_ref, log_pi_old=log_pi)
            if args.target_validity_scope == "prompt":
                beta = beta_from_validity(args.target_validity, base_validity, strict=False)
            else:
                beta = batch_beta_from_validity(args.target_validity, base_validity, strict=False)
        finite = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
        finite = finite[torch.isfinite(finite)]
        self._metrics[mode]["filtered/target_beta"].append(
            finite.mean().item() if finite.numel() else math.inf
        )
        return beta

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        # TRL queued its own (gathered) advantages for the completions table; put ours in their place.
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    def _log_diagnostics(
        self,
        mode: str,
        result: dict[str, torch.Tensor],
        valid: torch.Tensor,
        log_ref: torch.Tensor,
        log_pi: torch.Tensor,
        group_size: int,
        base_validity: torch.Tensor | None,
    ) -> None:
        # Values are gathered, hence identical on every process.
        metrics = self._metrics[mode]
        if base_validity is None:  # this group's importance-sampling estimate of A(x), Z(x) of p*
            log_valid_ref = torch.where(valid > 0, log_ref, torch.full_like(log_ref, -math.inf))
            base_validity = group_log_partition(log_valid_ref, log_pi, group_size).exp()
        has_valid = valid.view(-1, group_size).sum(dim=1) > 0
        rows = result["has_support"].repeat_interleave(group_size)
        metrics["filtered/validity"].append(valid.mean().item())
        metrics["filtered/base_validity"].append(base_validity.mean().item())
        metrics["filtered/frac_groups_no_valid"].append(1.0 - has_valid.double().mean().item())
        supported = result["has_support"]
        if supported.any():
            metrics["filtered/ess"].append(result["ess"][supported].mean().item())
            metrics["filtered/pseudo_reward_mean"].append(result["pseudo_rewards"][rows].mean().item())
            metrics["filtered/kl_target_policy"].append(result["kl_target_policy"][supported].mean().item())


def end_run(trainer: Any) -> None:
    """Close a (possibly multi-process) run: wait for every process, then destroy the process group.

    Call it last, after `save_model`. Any TRL/transformers trainer works. Why the barrier: when one process
    reaches interpreter exit while gloo's worker thread in another still releases a finished all-gather,
    the process-group destructor and that thread deadlock (one process never exits; seen in 2 of 6 two-process
    CPU runs with torch 2.13, none in 54 with the barrier). `Trainer.end()` alone does not prevent it.
    """
    trainer.accelerator.wait_for_everyone()
    trainer.end()


__all__ = [
    "DIVERGENCES",
    "TARGETS",
    "TESTED_TRL",
    "FilteredGRPOConfig",
    "FilteredGRPOTrainer",
    "end_run",
    "validity_from_rewards",
]
