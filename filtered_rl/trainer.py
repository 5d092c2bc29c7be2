"""Compatibility module: the trainer moved to `filtered_rl.trainers.filtered` (public names: `filtered_rl`).

Kept so that `from filtered_rl.trainer import FilteredGRPOConfig, FilteredGRPOTrainer, end_run` (0.1 code)
still works; new code imports from `filtered_rl`.
"""

from filtered_rl.divergences import DIVERGENCES, TARGETS
from filtered_rl.trainers._base import TESTED_TRL, end_run, validity_from_rewards
from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer

__all__ = [
    "DIVERGENCES",
    "TARGETS",
    "TESTED_TRL",
    "FilteredGRPOConfig",
    "FilteredGRPOTrainer",
    "end_run",
    "validity_from_rewards",
]
