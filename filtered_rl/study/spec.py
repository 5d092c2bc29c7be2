"""What a study runs: its arms (`RunSpec`) and its sizes, model and task (`StudyConfig`). Stdlib only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSpec:
    """One arm: `algorithm` is any registered algorithm (`filtered-rl train --list`), `options` its settings.

    `options` are keys of the algorithm's config (beta, divergence, alpha, ...; any TRL key too), set on top
    of the study's own settings. `dph`, `filtered_pstar` and `rft` need offline base-model samples: the study
    draws `rehearsal_samples` per training prompt (cached under `<output-dir>/rehearsal/`) and keeps the
    verified ones of the prompts with at least `rehearsal_min_correct` of them (`filtered_pstar`, `rft`: 1,
    every verified sample is a draw of p*). `pstar_distill` is no RL algorithm: the exact distillation of p*
    (`filtered_rl.study.distill`), for tasks that enumerate their valid answers.
    """

    name: str
    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)  # config fields: beta, divergence, alpha, ...
    target_validity: float | None = None  # grpo_klr/rloo only: the β-from-μ controller
    rehearsal_min_correct: int | None = None  # dph/filtered_pstar/rft (None: all of them, the paper's)
    rehearsal_samples: int = 8  # dph/filtered_pstar/rft: base-model samples per training prompt
    family: str | None = None  # the method family whose frontier this run is a point of (None: algorithm)

    @property
    def family_name(self) -> str:
        return self.family or self.algorithm


@dataclass
class StudyConfig:
    """Sizes, model and task of one study (the same budget for every arm); the synthetic presets are these.

    The first fields are the synthetic presets' (`filtered_rl.synthetic.frontier.PRESETS`, where this class
    is also called `Preset`). `model` is the base model every arm starts from (a hub id, a directory,
    `filtered-rl:<name>`); None: the synthetic task's own `base_size` model, pretrained `base_steps` steps.
    `task` is anything `filtered_rl.data.load_task` accepts, with `data_files`, `verifier`, `prompt_column`,
    `gold_column`, `system_prompt` and `conversational` as there. `settings` are config keys (TRL's or the
    algorithm's) for every arm; an arm's own options win.
    """

    base_size: str
    runs: tuple[RunSpec, ...]
    steps: int
    train_prompts: int
    num_generations: int
    batch_size: int
    learning_rate: float
    eval_prompts: int
    eval_samples: int
    max_completion_length: int = 24
    task: str = "countdown"  # a registered synthetic task (filtered_rl.synthetic.tasks) or any load_task name
    exact: bool = True  # also exact metrics by teacher forcing, where the task enumerates its valid answers
    base_steps: int | None = None  # pretraining steps of the base model (None: the task's default)
    exact_train_prompts: int = 200  # exact metrics also on this many of the training prompts (0: none)
    curve_points: int = 10  # exact metrics this many times during training (exact tasks only; 0: none)
    model: str | None = None  # the base model (None: the synthetic task's own, pretrained and cached)
    data_files: str | None = None
    verifier: str | None = None
    prompt_column: str | None = None
    gold_column: str | None = None
    system_prompt: str | None = "auto"
    conversational: bool | None = None
    train_split: str = "train"
    eval_split: str = "test"
    settings: dict[str, Any] = field(default_factory=dict)  # config keys for every arm
    distinct_m: int = 4  # sampled diversity that does not grow with validity: distinct among m valid
    temperature: float = 1.0  # training and evaluation samples


# Keys of an arm (in a study YAML) that are no config field: they say how the study runs it.
ARM_KEYS = ("name", "family", "rehearsal_samples", "rehearsal_min_correct")
# StudyConfig fields a study YAML may set at its top level (besides `arms`, `seeds` and `settings`).
CONFIG_KEYS = (
    "model", "task", "steps", "train_prompts", "num_generations", "batch_size", "learning_rate", "eval_prompts",
    "eval_samples", "max_completion_length", "exact", "exact_train_prompts", "curve_points", "data_files",
    "verifier", "prompt_column", "gold_column", "system_prompt", "conversational", "train_split", "eval_split",
    "distinct_m", "temperature", "base_size", "base_steps",
)  # fmt: skip


def slug(name: str) -> str:
    """A run name as a safe directory name: `grpo β=0.01` → `grpo-beta-0-01`."""
    return "".join(c if c.isalnum() else "-" for c in name.lower().replace("α", "alpha").replace("β", "beta")
                   .replace("μ", "mu").replace("γ", "gamma").replace("λ", "lambda").replace("*", "star")
                   ).strip("-")  # fmt: skip
