"""Moved to `filtered_rl.study.distill` (the study is part of the product); this name still imports."""

from filtered_rl.study.distill import distill_pstar, pstar_weights

__all__ = ["distill_pstar", "pstar_weights"]
