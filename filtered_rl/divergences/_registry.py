"""The divergence registry: one `Divergence` entry per file of this package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from filtered_rl.registry import Registry

Generator = Callable[[torch.Tensor, float | None], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence D_f(π‖p) = E_p[f(π/p)], given through f and f' as functions of log t, t = π/p.

    `finite_toward_filtered(alpha)` says whether D_f(π‖p*) is finite for a π that puts mass on invalid
    outputs (where p* = 0, t = ∞): exactly when f'(∞) = lim f(t)/t is finite.
    """

    name: str
    summary: str
    f: Generator
    f_prime: Generator
    finite_toward_filtered: Callable[[float | None], bool] = lambda alpha: True
    needs_alpha: bool = False


DIVERGENCES: Registry[Divergence] = Registry("divergence", discover="filtered_rl.divergences")
