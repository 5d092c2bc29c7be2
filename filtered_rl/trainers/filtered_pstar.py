r"""Filtered objective plus stored samples of p*: the base model's verified samples as extra proposals.

Why: forward KL toward p* estimates its gradient −E_{p*}[∇log π] from samples of π weighted by p*/π, and
those weights are noisy (effective sample size about 0.3 of the group) exactly where π has not yet found
p*'s mass. Samples of p* itself need no weight: rejection sampling the base model (keep a draw y ~ a
when v(y) = 1) gives exact draws of p* = a·v/A, so the gradient of KL(p*‖π) on them is the plain
log-likelihood gradient, −∇log π(y), with importance weight p*/p* = 1 and no estimate of A(x). They are
drawn once, offline (`filtered-rl rehearsal-sample --num-samples K --min-correct 1`: every prompt with at
least one verified sample of K, its verified samples), and each loss call (micro-batch) adds

    coef · (−Σ_i Σ_t log π_θ(y_it | x_i, y_i,<t)) / Σ_i |y_i|       (the token mean of the NLL)

on `rehearsal_batch_size` of them, drawn prompt-uniformly (a prompt, then one of its samples), so that
prompts with a large A(x), which have more samples, do not dominate. The f-DPG advantages on π's own
samples are unchanged (`FilteredGRPOTrainer`): both terms descend the same KL(p*‖π), one with noisy
weights on fresh samples, one with weight 1 on a fixed finite set.

The price: a prompt with A(x)·K ≪ 1 has no stored sample, and the stored set is finite, so at a large
`rehearsal_coef` the policy memorises its few samples per prompt instead of covering p* (pure rejection-
sampling fine-tuning). With coef = 1 a stored sample weighs as much as a fresh sample of advantage 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.trainers._registry import register_algorithm
from filtered_rl.trainers._stored_samples import StoredSampleDraws, load_verified_samples
from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer


@dataclass
class FilteredPStarConfig(FilteredGRPOConfig):
    """[`FilteredGRPOConfig`] plus the stored p* samples and their loss (module doc)."""

    rehearsal_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder written by `filtered-rl rehearsal-sample --min-correct 1` (rehearsal.jsonl, "
            "rehearsal_info.json): the base model's verified samples, i.e. draws of p*. Required."
        },
    )
    rehearsal_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the stored samples' token-mean NLL (0: the filtered objective alone)."},
    )
    rehearsal_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Stored samples per loss call (micro-batch) and process; unset: per_device_train_batch_size // 4 "
            "(at least 1)."
        },
    )

    def __post_init__(self):
        if not self.rehearsal_path:
            raise ValueError(
                "rehearsal_path is required: the folder `filtered-rl rehearsal-sample --min-correct 1 "
                "--output-dir ...` writes (the base model's verified samples)"
            )
        if self.target != "filtered":
            raise ValueError(
                f"target={self.target!r}: stored base samples are draws of p* only; use target='filtered'"
            )
        if not self.rehearsal_coef >= 0:
            raise ValueError(f"rehearsal_coef={self.rehearsal_coef} must be ≥ 0")
        if self.rehearsal_batch_size is None:
            self.rehearsal_batch_size = max(1, self.per_device_train_batch_size // 4)
        if self.rehearsal_batch_size < 1:
            raise ValueError(f"rehearsal_batch_size={self.rehearsal_batch_size} must be ≥ 1")
        super().__post_init__()


@register_algorithm(
    "filtered_pstar",
    FilteredPStarConfig,
    "filtered f-DPG toward p* plus the NLL of stored verified base samples (exact draws of p*)",
)
class FilteredPStarTrainer(StoredSampleDraws, FilteredGRPOTrainer):
    """`FilteredGRPOTrainer` plus the stored-p*-sample loss (module doc). Logs `filtered/pstar_nll`."""

    _name = "FilteredPStar"
    config_class = FilteredPStarConfig

    def __init__(self, model, reward_funcs=None, args: FilteredPStarConfig | None = None, **kwargs: Any):
        if args is None or not isinstance(args, FilteredPStarConfig):
            raise TypeError("FilteredPStarTrainer needs args=FilteredPStarConfig(rehearsal_path=...)")
        stored = load_verified_samples(args.rehearsal_path, "those are not p*'s draws for every prompt")
        by_prompt: dict[str, list[dict[str, Any]]] = {}
        for sample in stored.samples:
            by_prompt.setdefault(sample["prompt_key"], []).append(sample)
        if not by_prompt:
            raise ValueError(
                f"{args.rehearsal_path} holds no verified sample: draw more (--num-samples) or use algorithm "
                "filtered"
            )
        self.pstar_samples = [by_prompt[key] for key in sorted(by_prompt)]
        super().__init__(model, reward_funcs, args, **kwargs)

    def extra_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        if not self.model.training or self.args.rehearsal_coef == 0:
            return None
        logps, mask = self.stored_logprobs(model, self._draw_samples())
        nll = -(logps * mask).sum() / mask.sum().clamp(min=1)
        self._metrics["train"]["filtered/pstar_nll"].append(nll.item())
        return self.args.rehearsal_coef * nll

    def _draw_samples(self) -> list[dict[str, Any]]:
        """This call's samples, prompt-uniform (a prompt, then one of its samples)."""
        generator = self.draw_generator()
        size = self.args.rehearsal_batch_size
        prompts = torch.randint(len(self.pstar_samples), (size,), generator=generator).tolist()
        picks = torch.rand(size, generator=generator, dtype=torch.float64).tolist()
        return [self.pstar_samples[p][int(u * len(self.pstar_samples[p]))] for p, u in zip(prompts, picks)]


__all__ = ["FilteredPStarConfig", "FilteredPStarTrainer"]
