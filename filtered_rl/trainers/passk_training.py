r"""Pass@k training with the analytical advantages (Chen et al. 2025, "Pass@k Training for Adaptively
Balancing Exploration and Exploitation of Large Reasoning Models", arXiv 2508.10751).

Why: GRPO rewards each sample for being correct (pass@1), which pays most for making the likeliest correct
answer likelier. Rewarding a *set* of k samples for containing one correct answer (pass@k) pays for
coverage instead. Averaging over every k-subset of a group of N samples with c correct gives closed forms
(no subsets are drawn): the group's pass@k estimate ρ = 1 − C(N−c, k)/C(N, k), σ = √(ρ(1−ρ)), and

    correct:    (1 − ρ)/σ
    incorrect:  (1 − ρ − C(N−c−1, k−1)/C(N−1, k−1))/σ

(an incorrect sample loses only in the subsets where every other member is incorrect too). σ = 0 gives 0
for the whole group: no correct sample (ρ = 0), or fewer than k incorrect ones, so that every k-subset
passes (ρ = 1): with N = 8 and k = 4, groups with 5 or more correct samples teach nothing. The advantages
are already normalised, so `scale_rewards` does not apply; correctness is the binary verdict v(y)
(`validity_threshold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from filtered_rl.trainers._base import PostScoringConfig, PostScoringTrainer, ScoredBatch
from filtered_rl.trainers._registry import register_algorithm


def _comb(n: int, k: int) -> int:
    """C(n, k), 0 outside 0 ≤ k ≤ n (a group with no incorrect sample has no 'other incorrect' subsets)."""
    return math.comb(n, k) if n >= 0 and 0 <= k <= n else 0


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """ρ(n, c, k) = 1 − C(n−c, k)/C(n, k): the unbiased pass@k estimate from n samples with c correct (k ≤ n);
    the mean over every k-subset of whether it holds a correct sample. Shared with PKPO (`pkpo.py`)."""
    return 1.0 - _comb(n - c, k) / _comb(n, k)


def passk_advantage_table(group_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, incorrect) advantages indexed by the number of correct samples c = 0 … N, float64."""
    n = group_size
    correct, incorrect = [], []
    for c in range(n + 1):
        rho = pass_at_k_estimate(n, c, k)
        sigma = math.sqrt(rho * (1.0 - rho))
        if sigma == 0.0:
            correct.append(0.0)
            incorrect.append(0.0)
            continue
        correct.append((1.0 - rho) / sigma)
        incorrect.append((1.0 - rho - _comb(n - c - 1, k - 1) / _comb(n - 1, k - 1)) / sigma)
    return torch.tensor(correct, dtype=torch.float64), torch.tensor(incorrect, dtype=torch.float64)


def passk_advantages(valid: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """(N,) analytical pass@k advantages from binary verdicts `valid` (N,), groups of `group_size` consecutive."""
    if not 1 <= k <= group_size:
        raise ValueError(f"pass@k training needs 1 ≤ k ≤ group size {group_size}, got k={k}")
    correct_table, incorrect_table = passk_advantage_table(group_size, k)
    grouped = valid.view(-1, group_size) > 0.5
    counts = grouped.sum(dim=1, keepdim=True).expand_as(grouped).cpu()
    advantages = torch.where(grouped.cpu(), correct_table[counts], incorrect_table[counts])
    return advantages.reshape(-1).to(valid.device)


@dataclass
class PassKConfig(PostScoringConfig):
    """Configuration of [`PassKTrainer`]: [`~trl.GRPOConfig`] plus the k of pass@k."""

    passk_k: int = field(
        default=4,
        metadata={
            "help": "k of the pass@k objective, 1 ≤ k ≤ num_generations (k = 1 is GRPO with σ-normalised "
            "advantages). Larger k rewards coverage more and the likeliest answer less."
        },
    )

    def __post_init__(self):
        if self.passk_k < 1:
            raise ValueError(f"passk_k={self.passk_k} must be ≥ 1")
        for name in ("num_generations", "num_generations_eval"):
            generations = getattr(self, name, None)
            if generations is not None and generations > 1 and self.passk_k > generations:
                raise ValueError(
                    f"passk_k={self.passk_k} exceeds {name}={generations}: pass@k of a group of N samples needs "
                    f"k ≤ N; lower passk_k or raise {name}"
                )
        if self.num_generations > 1 and self.passk_k == self.num_generations:
            # Every k-subset of the group is the whole group: one pass@k per group, no contrast inside it.
            raise ValueError(
                f"passk_k={self.passk_k} equals num_generations: every sample of a group gets the same pass@k, so "
                "every advantage is 0 and nothing trains; use passk_k < num_generations"
            )
        super().__post_init__()


@register_algorithm(
    "passk",
    PassKConfig,
    "Pass@k training (Chen et al. 2025): analytical pass@k advantages over each group; passk_k",
)
class PassKTrainer(PostScoringTrainer):
    """GRPO with the analytical pass@k advantages (see the module doc). Logs `passk/group_pass_at_k`."""

    _name = "PassK"
    config_class = PassKConfig
    metric_prefix = "passk"
    needs_reference_model = False  # never reads log a(y): no base model is built or run (unless beta > 0)

    def compute_advantages(self, batch: ScoredBatch) -> torch.Tensor:
        k = min(self.args.passk_k, batch.group_size)  # an eval group may be smaller than k
        grouped = batch.grouped(batch.valid)
        counts = grouped.sum(dim=1).long().tolist()
        rho = [pass_at_k_estimate(batch.group_size, c, k) for c in counts]
        self._metrics[batch.mode]["passk/group_pass_at_k"].append(sum(rho) / len(rho))
        return passk_advantages(batch.valid, batch.group_size, k)
