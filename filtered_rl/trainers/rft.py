r"""RFT, offline rejection-sampling fine-tuning (Yuan et al., "Scaling Relationship on Learning Mathematical
Reasoning with Large Language Models", arXiv 2308.01825): supervised fine-tuning on the base model's own
verified samples.

Why: the simplest rival of the filtered objective. Rejection sampling the base model (keep y ~ a when
v(y) = 1) gives exact draws of p* = a·v/A, so the NLL of the kept samples is a Monte-Carlo estimate of the
forward KL(p*‖π) up to a constant, with no importance weight and no A(x): the very target of `filtered`,
estimated offline once. Each loss call (micro-batch) adds

    −Σ_i Σ_t log π_θ(y_it | x_i, y_i,<t) / Σ_i |y_i|       (the token mean of the NLL, as SFT)

on `rft_batch_size` stored samples. The samples are drawn as SFT reads a dataset: epoch after epoch, each
epoch a fresh permutation of the whole set (every sample weighs the same, so a prompt with a large A(x),
which has more verified samples, weighs more, as in the paper's union of per-prompt samples). Which samples
a call draws depends only on (seed, global step, call, process), so a resumed run draws the same ones.
The policy's own generations (TRL's, every step) are scored and logged (`rft/validity`, an online monitor)
but get advantage 0: they cost a generation, not a gradient. Make them cheap with small
`num_generations`/`per_device_train_batch_size` if the monitor is not wanted.

Knobs (the paper's defaults): the sample budget K per prompt (100 in the paper; here the offline
`filtered-rl rehearsal-sample --num-samples K --min-correct 1`, and `rft_samples_per_prompt` k ≤ K keeps
only the verified samples among the first k draws of each prompt, so one stored set serves several
budgets), de-duplication (on: the paper keeps distinct reasoning paths; here distinct completions of a
prompt), 3 epochs. With `max_steps` unset (≤ 0) the run lasts `rft_epochs` passes over the set.

What it converges to: the per-prompt empirical distribution p̂ of the training set, when π can represent
it. Without de-duplication p̂ is the multiset of verified draws, an unbiased estimate of p* (proportions
kept up to sampling noise, but a valid answer no draw hit gets probability → 0). With de-duplication p̂ is
uniform over the distinct verified answers: as K grows it tends to uniform over p*'s support, not to p*
(rare valid answers are up-weighted). tests/test_rejection_baselines.py trains to p̂ on an enumerable task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from filtered_rl.evaluation.generate import sample_seed
from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm
from filtered_rl.trainers._stored_samples import StoredSampleDraws, load_verified_samples

_EPOCH_STREAM = 2**40  # sample_seed stream of the epoch permutations (apart from any prompt's)


def rft_training_set(
    samples: list[dict[str, Any]], samples_per_prompt: int | None = None, dedup: bool = True
) -> list[dict[str, Any]]:
    """The stored samples RFT trains on, in stored order (module doc).

    `samples_per_prompt = k`: only samples drawn among the first k of their prompt (`sample_index < k`).
    `dedup`: a completion already kept for the same prompt (same token ids) is dropped.
    """
    kept, seen = [], set()
    for sample in samples:
        if samples_per_prompt is not None:
            if "sample_index" not in sample:
                raise ValueError(
                    "rft_samples_per_prompt needs each stored sample's draw index ('sample_index'), which "
                    "`filtered-rl rehearsal-sample` writes; this set has none: leave rft_samples_per_prompt unset"
                )
            if sample["sample_index"] >= samples_per_prompt:
                continue
        if dedup:
            key = (sample["prompt_key"], tuple(sample["completion_ids"]))
            if key in seen:
                continue
            seen.add(key)
        kept.append(sample)
    return kept


def epoch_steps(num_samples: int, epochs: float, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimizer steps for `epochs` passes over `num_samples` stored samples (at least 1)."""
    per_step = batch_size * processes * accumulation
    return max(1, math.ceil(epochs * num_samples / per_step))


@dataclass
class RFTConfig(PostScoringConfig):
    """Configuration of [`RFTTrainer`]: [`~trl.GRPOConfig`] (beta = 0) plus the stored set and the SFT knobs."""

    rehearsal_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder written by `filtered-rl rehearsal-sample --num-samples K --min-correct 1` "
            "(rehearsal.jsonl, rehearsal_info.json): the base model's verified samples. Required."
        },
    )
    rft_samples_per_prompt: int | None = field(
        default=None,
        metadata={
            "help": "Sample budget k per prompt: keep the verified samples among the first k draws of each prompt "
            "(k ≤ the set's --num-samples K); unset: all K (the paper: K = 100)."
        },
    )
    rft_dedup: bool = field(
        default=True,
        metadata={
            "help": "Keep one copy of each distinct completion of a prompt (the paper's distinct reasoning paths); "
            "false: every verified draw, duplicates included."
        },
    )
    rft_epochs: float = field(
        default=3.0,
        metadata={
            "help": "Passes over the training set (3 in the paper). Sets the run's length when max_steps ≤ 0: "
            "ceil(rft_epochs · samples / (rft_batch_size · processes · gradient_accumulation_steps)) steps; a "
            "max_steps > 0 wins (the draws still go epoch by epoch)."
        },
    )
    rft_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Stored samples per loss call (micro-batch) and process; unset: per_device_train_batch_size."
        },
    )

    def __post_init__(self):
        if not self.rehearsal_path:
            raise ValueError(
                "rehearsal_path is required: the folder `filtered-rl rehearsal-sample --min-correct 1 "
                "--output-dir ...` writes (the base model's verified samples)"
            )
        if self.rft_samples_per_prompt is not None and self.rft_samples_per_prompt < 1:
            raise ValueError(
                f"rft_samples_per_prompt={self.rft_samples_per_prompt} must be ≥ 1, or unset to use every draw"
            )
        if not (math.isfinite(self.rft_epochs) and self.rft_epochs > 0):
            raise ValueError(f"rft_epochs={self.rft_epochs} must be a finite number > 0 (3 in the paper)")
        if self.rft_batch_size is None:
            self.rft_batch_size = self.per_device_train_batch_size
        if self.rft_batch_size < 1:
            raise ValueError(f"rft_batch_size={self.rft_batch_size} must be ≥ 1")
        if self.beta != 0:
            raise ValueError(
                f"beta={self.beta}: RFT is supervised fine-tuning on stored samples, with no KL term (and no "
                "reference model); set beta: 0"
            )
        super().__post_init__()


@register_algorithm(
    "rft",
    RFTConfig,
    "RFT (Yuan et al. 2023): SFT on stored verified base samples, K per prompt, dedup, epochs; "
    "rft_samples_per_prompt, rft_dedup, rft_epochs",
)
class RFTTrainer(StoredSampleDraws, PostScoringTrainer):
    """Offline rejection-sampling fine-tuning (see the module doc). Logs `rft/nll` and `rft/epoch`."""

    _name = "RFT"
    config_class = RFTConfig
    metric_prefix = "rft"
    needs_reference_model = False

    def __init__(self, model, reward_funcs=None, args: RFTConfig | None = None, **kwargs: Any):
        if args is None or not isinstance(args, RFTConfig):
            raise TypeError("RFTTrainer needs args=RFTConfig(rehearsal_path=...)")
        stored = load_verified_samples(args.rehearsal_path, "not every prompt's verified samples")
        drawn = stored.info.get("num_samples")
        if (
            args.rft_samples_per_prompt is not None
            and drawn is not None
            and args.rft_samples_per_prompt > drawn
        ):
            raise ValueError(
                f"rft_samples_per_prompt={args.rft_samples_per_prompt} exceeds the {drawn} draws per prompt of "
                f"{args.rehearsal_path}; lower it or resample with --num-samples {args.rft_samples_per_prompt}"
            )
        self.rft_samples = rft_training_set(stored.samples, args.rft_samples_per_prompt, args.rft_dedup)
        if not self.rft_samples:
            raise ValueError(
                f"{args.rehearsal_path} holds no verified sample (within rft_samples_per_prompt="
                f"{args.rft_samples_per_prompt}): draw more (--num-samples)"
            )
        if args.max_steps <= 0:
            args.max_steps = epoch_steps(
                len(self.rft_samples), args.rft_epochs, args.rft_batch_size, args.world_size,
                args.gradient_accumulation_steps,
            )  # fmt: skip
        self._epoch_orders: dict[int, list[int]] = {}
        super().__init__(model, reward_funcs, args, **kwargs)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        # The policy's own samples are only a monitor (rft/validity): no policy-gradient term.
        return torch.zeros_like(batch.valid)

    def extra_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        if not self.model.training:
            return None
        logps, mask = self.stored_logprobs(model, self._draw_samples())
        nll = -(logps * mask).sum() / mask.sum().clamp(min=1)
        self._metrics["train"]["rft/nll"].append(nll.item())
        return nll

    def _draw_samples(self) -> list[dict[str, Any]]:
        """This call's samples: the next `rft_batch_size` of the epoch-by-epoch stream of permutations."""
        step, call = self.next_draw()
        size, count = self.args.rft_batch_size, len(self.rft_samples)
        processes = self.accelerator.num_processes
        slot = (
            step * self.args.gradient_accumulation_steps + call
        ) * processes + self.accelerator.process_index
        picks = []
        for position in range(slot * size, (slot + 1) * size):
            epoch, offset = divmod(position, count)
            picks.append(self.rft_samples[self._epoch_order(epoch)[offset]])
        self._metrics["train"]["rft/epoch"].append((slot + 1) * size / count)
        return picks

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_orders:
            generator = torch.Generator().manual_seed(sample_seed(self.args.seed, _EPOCH_STREAM, epoch))
            self._epoch_orders = {epoch: torch.randperm(len(self.rft_samples), generator=generator).tolist()}
        return self._epoch_orders[epoch]


__all__ = ["RFTConfig", "RFTTrainer", "epoch_steps", "rft_training_set"]
