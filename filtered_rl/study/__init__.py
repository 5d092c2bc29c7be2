"""The side-by-side study: which objective keeps pass@k at the pass@1 you need, on your model and task.

`filtered-rl study` (`filtered_rl.study.cli`) trains several arms (any registered algorithm with any
settings) from one base model with one budget and seeds, evaluates every one with the sampled evaluator
(and exactly, where the task enumerates its valid answers), and writes `study.md`: each method family's
frontier, the families compared at matched pass@1 and arm-by-arm differences, with paired bootstrap
standard errors over seeds and prompts.

- `spec`: an arm (`RunSpec`) and a study's sizes, model and task (`StudyConfig`; the synthetic presets of
  `filtered-rl frontier` are these);
- `config`: a study YAML (arms as `algorithm: {setting: value or [values]}`) into a `StudyConfig`;
- `runner`: training an arm through `filtered-rl train`'s code path, the sampled and exact evaluations;
- `sampled`, `curve`, `distill`: per-prompt sampled metrics, exact metrics during training, p* distilled;
- `tables`, `report`: the results table and figures, study.md.

Nothing here imports torch until a study runs.
"""

from filtered_rl.study.spec import RunSpec, StudyConfig, slug

__all__ = ["RunSpec", "StudyConfig", "slug"]
