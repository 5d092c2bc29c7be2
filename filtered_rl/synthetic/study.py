"""Moved to `filtered_rl.study.report` (the study is part of the product); this name still imports."""

from filtered_rl.study.report import *  # noqa: F403
from filtered_rl.study.report import (  # noqa: F401  (the names older code imported)
    BASE,
    KEYS,
    METRICS,
    arm_difference_table,
    arm_points,
    difference_table,
    family_frontiers,
    matched_levels,
    matched_table,
    paired_resamples,
    per_prompt_values,
    plot_curves,
    plot_study,
    points_table,
    spread,
    study_section,
    write_study,
)
