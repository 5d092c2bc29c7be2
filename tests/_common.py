"""Helpers shared by the trainer tests: one CPU training config and exact float64 tensors."""

from __future__ import annotations

from typing import Any

import torch

# TRL config keys for a quiet, checkpoint-free CPU run (every trainer test's base settings).
CPU: dict[str, Any] = dict(
    use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True
)


def t(values: Any) -> torch.Tensor:
    """A float64 tensor, so hand-computed advantages compare at 1e-12."""
    return torch.tensor(values, dtype=torch.float64)
