r"""DPH-RL rehearsal (Li et al., "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in
RLVR", arXiv 2509.07430): GRPO without KL on the exploration prompts, plus a mass-covering f-divergence to
the base model estimated on stored base-model samples.

Why: reverse KL (or no KL) lets the policy drop answers the base model knew; a mass-covering divergence
D_f(π_θ‖a) = E_{y~a}[f(π_θ/a)] penalises exactly that, and as an expectation under a it needs only samples
of a drawn once (`filtered-rl rehearsal-sample`, `filtered_rl.rehearsal`): the base model's correct samples
of the near-perfect prompts (all K = 8 samples correct), with their per-token log-probs. No reference model
is built or run (`needs_reference_model = False`). Each loss call (micro-batch) draws
`rehearsal_batch_size` stored samples and adds

    coef · mean over their tokens of f(u_t),   u_t = π_θ(y_t | x, y_<t) / a(y_t | x, y_<t),

with the generator f of the chosen divergence, as in the authors' code (per token, token-mean):
`forward_kl`: u − log u − 1 (coef 0.01–0.05; the authors' k3 form), `js`: u·log u − (u+1)·log((u+1)/2)
(coef 0.05–0.2). Both are `filtered_rl.divergences` generators (Amari α at α = 0, and JS). log u is
clamped to [−20, 20] and the forward-KL term to ≤ 10, as in the authors' code.

Mini-batch size: the authors draw 256 rehearsal samples per step of 128 prompts × 8 samples (1:4);
`rehearsal_batch_size` defaults to a quarter of `per_device_train_batch_size`, per micro-batch and process.
Which samples a call draws depends only on (seed, process, global step, call), so a resumed run draws
the same ones. The policy's log-probs are at temperature 1 (the stored ones are), whatever `temperature`.
The advantages are TRL's own GRPO ones, unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.divergences import f_generator
from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm
from filtered_rl.trainers._stored_samples import StoredSampleDraws

# rehearsal divergence → (registered generator, α); default coefficient (middle of the authors' ranges)
REHEARSAL_DIVERGENCES = {"forward_kl": ("alpha", 0.0), "js": ("js", None)}
DEFAULT_COEF = {"forward_kl": 0.01, "js": 0.1}
LOG_RATIO_CLIP = 20.0
FORWARD_KL_CLIP = 10.0


def rehearsal_divergence(
    policy_logps: torch.Tensor, base_logps: torch.Tensor, mask: torch.Tensor, divergence: str = "forward_kl"
) -> torch.Tensor:
    """Token-mean of f(u), u = π_θ/a per token, over the `mask`ed tokens of (B, T) log-prob tensors."""
    name, alpha = REHEARSAL_DIVERGENCES[divergence]
    log_u = (policy_logps - base_logps).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    values = f_generator(log_u, name, alpha)
    if divergence == "forward_kl":
        values = values.clamp(max=FORWARD_KL_CLIP)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class DPHConfig(PostScoringConfig):
    """Configuration of [`DPHTrainer`]: [`~trl.GRPOConfig`] (beta = 0) plus the rehearsal loss (module doc)."""

    rehearsal_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder written by `filtered-rl rehearsal-sample` (rehearsal.jsonl, rehearsal_info.json): the "
            "base model's correct samples of the near-perfect prompts. Required."
        },
    )
    rehearsal_divergence: str = field(
        default="forward_kl",
        metadata={"help": "'forward_kl' (f(u) = u − log u − 1) or 'js' (u log u − (u+1) log((u+1)/2))."},
    )
    rehearsal_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the rehearsal loss; unset: 0.01 for forward_kl, 0.1 for js (the authors' ranges "
            "0.01–0.05 and 0.05–0.2)."
        },
    )
    rehearsal_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Stored samples per loss call (micro-batch) and process; unset: per_device_train_batch_size // 4 "
            "(at least 1), the authors' 1:4 ratio."
        },
    )
    rehearsal_exclude_near_perfect: bool = field(
        default=True,
        metadata={
            "help": "Train the GRPO part on the exploration prompts only (the near-perfect ones are dropped from the "
            "training set), as the paper does."
        },
    )

    def __post_init__(self):
        if not self.rehearsal_path:
            raise ValueError(
                "rehearsal_path is required: the folder `filtered-rl rehearsal-sample --output-dir ...` writes"
            )
        if self.rehearsal_divergence not in REHEARSAL_DIVERGENCES:
            raise ValueError(
                f"rehearsal_divergence={self.rehearsal_divergence!r}: choose one of {tuple(REHEARSAL_DIVERGENCES)}"
            )
        if self.rehearsal_coef is None:
            self.rehearsal_coef = DEFAULT_COEF[self.rehearsal_divergence]
        if not self.rehearsal_coef >= 0:
            raise ValueError(f"rehearsal_coef={self.rehearsal_coef} must be ≥ 0 (0 is GRPO without KL)")
        if self.rehearsal_batch_size is None:
            self.rehearsal_batch_size = max(1, self.per_device_train_batch_size // 4)
        if self.rehearsal_batch_size < 1:
            raise ValueError(f"rehearsal_batch_size={self.rehearsal_batch_size} must be ≥ 1")
        if self.beta != 0:
            raise ValueError(
                f"beta={self.beta}: DPH-RL's GRPO part has no KL term (the rehearsal loss replaces it, and no "
                "reference model is built); set beta: 0"
            )
        if self.temperature != 1.0:
            warnings.warn(
                f"temperature={self.temperature}: the rehearsal loss compares the untempered policy with the stored "
                "base log-probs (T = 1), while GRPO samples at this T",
                stacklevel=2,
            )
        super().__post_init__()


@register_algorithm(
    "dph",
    DPHConfig,
    "DPH-RL (Li et al. 2025): GRPO on exploration prompts + f-divergence rehearsal on stored base samples",
)
class DPHTrainer(StoredSampleDraws, PostScoringTrainer):
    """GRPO (TRL's advantages) plus the rehearsal loss (see the module doc). Logs `dph/rehearsal_loss`."""

    _name = "DPH"
    config_class = DPHConfig
    metric_prefix = "dph"
    needs_reference_model = False

    def __init__(self, model, reward_funcs=None, args: DPHConfig | None = None, **kwargs: Any):
        from filtered_rl.rehearsal import load_rehearsal

        if args is None or not isinstance(args, DPHConfig):
            raise TypeError("DPHTrainer needs args=DPHConfig(rehearsal_path=...)")
        self.rehearsal = load_rehearsal(
            args.rehearsal_path
        )  # before the model loads: a missing file fails fast
        if not self.rehearsal.samples:
            raise ValueError(
                f"{args.rehearsal_path} holds no rehearsal sample (no near-perfect prompt): rerun "
                "`filtered-rl rehearsal-sample` with a lower --min-correct, or use algorithm grpo"
            )
        if args.rehearsal_exclude_near_perfect and kwargs.get("train_dataset") is not None:
            kwargs["train_dataset"] = self._exploration_prompts(kwargs["train_dataset"], args.rehearsal_path)
        super().__init__(model, reward_funcs, args, **kwargs)

    def _exploration_prompts(self, dataset: Any, path: str) -> Any:
        from filtered_rl.control import prompt_key

        keys = self.rehearsal.near_perfect_keys
        kept = dataset.filter(lambda row: prompt_key(row["prompt"]) not in keys)
        if len(kept) == len(dataset):
            warnings.warn(
                f"no training prompt is among the {len(keys)} near-perfect prompts of {path}: was it sampled from "
                "another dataset, split, seed or prompt count? Training on every prompt",
                stacklevel=3,
            )
        if len(kept) == 0:
            raise ValueError(
                f"every training prompt is near-perfect in {path}: nothing is left to explore; use "
                "rehearsal_exclude_near_perfect: false, or sample with a higher --min-correct"
            )
        return kept

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        # TRL's GRPO advantages (scale_rewards, aggregation and all), gathered back into batch order.
        return self.accelerator.gather(batch.output["advantages"]).to(torch.float64)

    def extra_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        if not self.model.training or self.args.rehearsal_coef == 0:
            return None
        samples = self._draw_samples()
        logps, mask = self.stored_logprobs(model, samples)
        base = torch.zeros(logps.shape, dtype=logps.dtype)
        for row, s in enumerate(samples):
            base[row, : len(s["base_logprobs"])] = torch.tensor(s["base_logprobs"], dtype=base.dtype)
        base = base.to(logps.device)
        loss = rehearsal_divergence(logps, base, mask, self.args.rehearsal_divergence)
        self._metrics["train"]["dph/rehearsal_loss"].append(loss.item())
        return self.args.rehearsal_coef * loss

    def _draw_samples(self) -> list[dict[str, Any]]:
        """This call's mini-batch, without replacement when the pool is large enough."""
        generator = self.draw_generator()
        pool = self.rehearsal.samples
        size = self.args.rehearsal_batch_size
        index = torch.randperm(len(pool), generator=generator)[:size] if size <= len(pool) else None
        if index is None:
            index = torch.randint(len(pool), (size,), generator=generator)
        return [pool[i] for i in index.tolist()]
