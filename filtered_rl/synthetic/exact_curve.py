"""Moved to `filtered_rl.study.curve` (the study is part of the product); this name still imports."""

from filtered_rl.study.curve import CURVE_FILE, ExactCurveCallback, curve_point, read_curve

__all__ = ["CURVE_FILE", "ExactCurveCallback", "curve_point", "read_curve"]
