"""The real-LM frontier: GRPO + KL against the filtered objectives, on the project's own base model.

Every run starts from the same pretrained base model of a synthetic task (countdown by default), trains for the same number of steps on
the same prompts with the same seed, and is evaluated on held-out prompts: pass@k for k = 1 … n,
distinct valid answers per prompt, coverage of p*'s support and KL(p*‖π). The figures are the pass@k
curves and the coverage–precision plane (pass@1 against pass@n) with the base model marked.

    filtered-rl frontier --preset cpu --output-dir runs/frontier     # minutes on 2 cores
    filtered-rl frontier --preset gpu --seeds 0 1 2                  # the `small` model on one GPU
    filtered-rl frontier --preset cpu --arms mara,passk,grpo-beta-0-04  # any arms (ARMS), the preset's sizes
    filtered-rl frontier --preset cpu --task subset_sum                  # another synthetic task's base model
    filtered-rl frontier --preset subset-cpu --seeds 0 1 2               # the study: every family, exact metrics

With exact metrics (tasks that enumerate their valid answers) every run also records exact validity and
coverage during training (`exact_curve.jsonl`), and the output directory gets `study.md`: each method
family's frontier and the families compared at matched pass@1 (`filtered_rl.synthetic.study`).

Runs are resumable: a finished training run (its `final/` model) or evaluation (`summary.json`) is
reused, a killed one restarts from its last checkpoint / last finished prompt batch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RunSpec:
    """One training configuration: `algorithm` is any registered algorithm (`filtered-rl train --list`).

    `dph`, `filtered_pstar` and `rft` need offline base-model samples: the frontier draws `rehearsal_samples`
    per training prompt (cached under `<output-dir>/rehearsal/`) and keeps the verified ones of the prompts
    with at least `rehearsal_min_correct` of them (`filtered_pstar`, `rft`: 1, every verified sample is a
    draw of p*).
    `pstar_distill` is no RL algorithm: the exact distillation of p* (`filtered_rl.synthetic.distill`).
    """

    name: str
    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)  # config fields: beta, divergence, alpha, ...
    target_validity: float | None = None  # grpo/rloo only: the β-from-μ controller
    rehearsal_min_correct: int | None = None  # dph/filtered_pstar/rft (None: all of them, the paper's)
    rehearsal_samples: int = 8  # dph/filtered_pstar/rft: base-model samples per training prompt
    family: str | None = None  # the method family whose frontier this run is a point of (None: algorithm)

    @property
    def family_name(self) -> str:
        return self.family or self.algorithm


@dataclass
class Preset:
    """Sizes of one frontier experiment (the same budget for every run)."""

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
    task: str = "countdown"  # a registered synthetic task (filtered_rl.synthetic.tasks)
    exact: bool = True  # also exact metrics by teacher forcing, where the task enumerates its valid answers
    base_steps: int | None = None  # pretraining steps of the base model (None: the task's default)
    exact_train_prompts: int = 200  # exact metrics also on this many of the training prompts (0: none)
    curve_points: int = 10  # exact metrics this many times during training (exact tasks only; 0: none)


# Method families: the runs whose points make one frontier in the study (filtered_rl.synthetic.study).
KL_GRPO, KL_RLOO, KL_TILTED = "GRPO + KL", "RLOO + KL", "tilted target p_β"
FILTERED, REMEDIES = "filtered (f-DPG → p*)", "filtered + remedies"
GRPO_SMALL_BETA = RunSpec("grpo β=0.01", "grpo", {"beta": 0.01}, family=KL_GRPO)
GRPO_BETA_004 = RunSpec("grpo β=0.04", "grpo", {"beta": 0.04}, family=KL_GRPO)
GRPO_BETA_02 = RunSpec("grpo β=0.2", "grpo", {"beta": 0.2}, family=KL_GRPO)
# β-from-μ on GRPO needs the KL in the reward (grpo_klr): TRL's GRPO, k3 KL in the loss, overshoots μ and the
# callback refuses it (docs/controller.md). Before 0.2 this arm was "grpo μ=0.8" on TRL's GRPOTrainer.
GRPO_MU_08 = RunSpec("grpo_klr μ=0.8", "grpo_klr", {"beta": 0.04}, target_validity=0.8)
FILTERED_FKL = RunSpec("filtered forward KL", "filtered", {"divergence": "forward_kl"}, family=FILTERED)
FILTERED_ALPHA = {
    a: RunSpec(f"filtered α={a}", "filtered", {"divergence": "alpha", "alpha": a}, family=FILTERED)
    for a in (0.25, 0.5, 0.75, 0.9)
}
FILTERED_JS = RunSpec("filtered JS", "filtered", {"divergence": "js"}, family=FILTERED)
# The literature's diversity-collapse remedies (docs/baselines.md), at the authors' defaults, and the two
# exact KL-control arms (RLOO: k1 KL in the reward; tilted: reverse KL toward p_β).
MARA = RunSpec("mara β=0.1", "mara", {"mara_beta": 0.1}, family="MARA")
# The nano base model never solves a training prompt 8 times out of 8 (of 200 prompts: 1 reaches 6 of 8,
# 43 reach 3 of 8), so "near-perfect" is relaxed to ≥ 3 of 8 here (the paper: 8 of 8).
DPH_FKL = RunSpec(
    "dph forward KL",
    "dph",
    {"rehearsal_divergence": "forward_kl"},
    rehearsal_min_correct=3,
    family="DPH-RL rehearsal",
)
UNLIKELINESS = RunSpec(
    "unlikeliness c=0.25", "unlikeliness", {"unlikeliness_penalty": 0.25}, family="unlikeliness reward"
)
PASSK = RunSpec("pass@k training k=4", "passk", {"passk_k": 4}, family="pass@k training")
INVERSE_SUCCESS = RunSpec(
    "inverse success α=1",
    "inverse_success",
    {"inverse_success_alpha": 1.0},
    family="inverse-success calibration",
)
RLOO_MU_08 = RunSpec("rloo μ=0.8", "rloo", {"beta": 0.04}, target_validity=0.8, family=KL_RLOO)
TILTED_MU_08 = RunSpec("tilted reverse KL μ=0.8", "tilted", {"target_validity": 0.8}, family=KL_TILTED)
BASELINES = (MARA, DPH_FKL, UNLIKELINESS, PASSK, INVERSE_SUCCESS, RLOO_MU_08, TILTED_MU_08)
# The sweep: a few β and the μ controller; α ∈ {0 (forward KL), .25, .5, .75, .9} and JS.
SWEEP = (
    GRPO_SMALL_BETA,
    GRPO_BETA_004,
    GRPO_BETA_02,
    GRPO_MU_08,
    FILTERED_FKL,
    *FILTERED_ALPHA.values(),
    FILTERED_JS,
)

# The study on subset_sum (docs/results.md §4): every family at the knob settings below, families named for
# the frontier plots. GRPO's β = 0 is the collapse-prone end; RLOO and the tilted target are exact KL-control.
GRPO_BETA_0 = RunSpec("grpo β=0", "grpo", {"beta": 0.0}, family=KL_GRPO)
ORACLE = "p* distilled (oracle)"
RFT, RAFT, REINFORCE_REJ = (
    "RFT (offline rejection sampling)",
    "RAFT++ (online rejection sampling)",
    "Reinforce-Rej",
)
PSTAR_DISTILL = RunSpec("p* distilled", "pstar_distill", family=ORACLE)
STUDY_ARMS = (
    GRPO_BETA_0,
    GRPO_BETA_004,
    GRPO_BETA_02,
    RunSpec("rloo β=0.04", "rloo", {"beta": 0.04}, family=KL_RLOO),
    RLOO_MU_08,
    TILTED_MU_08,
    FILTERED_FKL,
    FILTERED_ALPHA[0.5],
    FILTERED_ALPHA[0.9],
    FILTERED_JS,
    # The remedies for the filtered objective's weak points (slow validity, noisy weights):
    RunSpec("filtered forward KL, exact A(x)", "filtered",  # p*'s normaliser measured offline, not per group
            {"divergence": "forward_kl", "partition_estimate": "column"}, family=REMEDIES),
    RunSpec("filtered α 0.9→0", "filtered",  # mode-seeking early for validity, mass-covering late
            {"divergence": "alpha", "alpha": 0.9, "alpha_end": 0.0}, family=REMEDIES),
    RunSpec("filtered forward KL, ratio clip 2", "filtered",  # p*/π (forward KL's pseudo-reward) clipped at 2
            {"divergence": "forward_kl", "pseudo_reward_clip": 2.0}, family=REMEDIES),
    # The literature's remedies, each at its authors' default and one other setting of its knob.
    MARA, RunSpec("mara β=0.5", "mara", {"mara_beta": 0.5}, family="MARA"),
    UNLIKELINESS,
    RunSpec("unlikeliness c=0.5", "unlikeliness", {"unlikeliness_penalty": 0.5}, family="unlikeliness reward"),
    PASSK,
    RunSpec("pass@k training k=2", "passk", {"passk_k": 2}, family="pass@k training"),  # k=8=G trains nothing
    INVERSE_SUCCESS,
    RunSpec("inverse success α=0.5", "inverse_success", {"inverse_success_alpha": 0.5},
            family="inverse-success calibration"),
    DPH_FKL,
    RunSpec("tilted reverse KL μ=0.5", "tilted", {"target_validity": 0.5}, family=KL_TILTED),
    # The base model's verified samples (exact draws of p*, K = 32 a prompt) as extra proposals of forward KL.
    *(RunSpec(f"filtered forward KL + p* samples{label}", "filtered_pstar",
              {"divergence": "forward_kl", "rehearsal_coef": coef}, rehearsal_samples=32, rehearsal_min_correct=1,
              family=REMEDIES) for label, coef in (("", 1.0), (" c=0.3", 0.3), (" c=3", 3.0))),
    # Not methods: forward KL with the exact gradient (needs the valid set), at this budget and 10x longer.
    PSTAR_DISTILL, RunSpec("p* distilled, 10x steps", "pstar_distill", {"steps": 3000}, family=ORACLE),
    # The simplest rivals (issue 26): offline RFT on the same stored set as the p*-samples arms, at two sample
    # budgets (k of its K = 32 draws a prompt, de-duplicated), and the online RAFT++ and Reinforce-Rej with the
    # authors' 4 optimizer steps per generation batch and KL 0.001.
    *(RunSpec(f"rft k={k}", "rft", {} if k == 32 else {"rft_samples_per_prompt": k}, rehearsal_samples=32,
              rehearsal_min_correct=1, family=RFT) for k in (8, 32)),
    RunSpec("raft++", "raft", {"steps_per_generation": 4}, family=RAFT),
    RunSpec("reinforce-rej", "reinforce_rej", {"steps_per_generation": 4}, family=REINFORCE_REJ),
)  # fmt: skip

COUNTDOWN_HARD_ARMS = (
    "grpo β=0", "grpo β=0.2", "rloo μ=0.8", "tilted reverse KL μ=0.8", "filtered forward KL", "filtered α=0.5",
    "filtered forward KL, exact A(x)", "mara β=0.1", "filtered forward KL + p* samples",
    "filtered forward KL + p* samples c=0.3", "filtered forward KL + p* samples c=3", "p* distilled",
    "p* distilled, 10x steps", "unlikeliness c=0.25", "pass@k training k=4", "inverse success α=1", "dph forward KL",
    "rft k=8", "rft k=32", "raft++", "reinforce-rej",
)  # fmt: skip

COUNTDOWN_HARD_LONG_ARMS = (
    "grpo β=0",
    "grpo β=0.2",
    "filtered forward KL, exact A(x)",
    "filtered forward KL + p* samples",
)

_CPU = Preset(
    "nano",
    SWEEP,
    steps=150,
    train_prompts=1000,
    num_generations=8,
    batch_size=32,
    learning_rate=3e-4,
    eval_prompts=48,
    eval_samples=64,
)
PRESETS: dict[str, Preset] = {
    # The quickstart's comparison: collapse-prone GRPO against the forward-KL filtered objective.
    "quick": replace(_CPU, runs=(GRPO_SMALL_BETA, FILTERED_FKL), eval_samples=32, exact=False),
    "cpu": _CPU,
    # Four times the budget for the moderate-β GRPO runs and two filtered ones: where do they go with training?
    "cpu-long": replace(_CPU, runs=(GRPO_BETA_004, GRPO_BETA_02, GRPO_MU_08, FILTERED_FKL, FILTERED_ALPHA[0.5]),
                        steps=600),
    # The decisive testbed: subset_sum's base pretrained 3x longer (A(x) spread over 1e-3 … 0.16, exact pass@256
    # 0.68), every family, 300 steps. ≈ 1.8 min a run on one core; run seeds as parallel processes.
    "subset-cpu": replace(_CPU, runs=STUDY_ARMS, task="subset_sum", max_completion_length=32, base_steps=3600,
                          steps=300),
    # The same study on the harder countdown (its base pretrained 2,400 steps: validity 0.18, exact pass@256
    # 1.0 but coverage@256 0.82), one arm or two a family.
    "countdown-hard-cpu": replace(_CPU, runs=tuple(a for a in STUDY_ARMS if a.name in COUNTDOWN_HARD_ARMS),
                                  task="countdown_hard", max_completion_length=32, base_steps=2400, steps=300),
    # Four times the budget for the fastest arms on countdown_hard: where does validity plateau?
    "countdown-hard-long": replace(_CPU, runs=tuple(a for a in STUDY_ARMS if a.name in COUNTDOWN_HARD_LONG_ARMS),
                                   task="countdown_hard", max_completion_length=32, base_steps=2400, steps=1200,
                                   curve_points=12),
    "gpu": Preset("small", SWEEP, steps=200, train_prompts=20000, num_generations=16, batch_size=256,
                  learning_rate=5e-5, eval_prompts=200, eval_samples=64, max_completion_length=32),
}  # fmt: skip


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower().replace("α", "alpha").replace("β", "beta")
                   .replace("μ", "mu").replace("*", "star")).strip("-")  # fmt: skip


# `--arms`: every run spec by a short name (the baselines) or its slug (e.g. grpo-beta-0-01).
ARMS: dict[str, RunSpec] = {
    "mara": MARA, "dph": DPH_FKL, "unlikeliness": UNLIKELINESS, "passk": PASSK,
    "inverse-success": INVERSE_SUCCESS, "rloo": RLOO_MU_08, "tilted": TILTED_MU_08,
    **{slug(spec.name): spec for spec in (*SWEEP, *BASELINES, *STUDY_ARMS)},
}  # fmt: skip


def select_arms(preset: Preset, arms: list[str] | None) -> Preset:
    """The preset with only the named arms (same sizes); None keeps its own runs."""
    if not arms:
        return preset
    unknown = [name for name in arms if name not in ARMS]
    if unknown:
        raise ValueError(f"--arms {','.join(unknown)}: unknown; choose from {', '.join(ARMS)}")
    return replace(preset, runs=tuple(ARMS[name] for name in dict.fromkeys(arms)))


def select_task(preset: Preset, task: str | None) -> Preset:
    """The preset on another synthetic task (None keeps its own), max_completion_length at least the task's."""
    if task is None:
        return preset
    from filtered_rl.synthetic.tasks import get_task

    length = max(preset.max_completion_length, get_task(task).max_completion_length)  # unknown: lists them
    return replace(preset, task=task, max_completion_length=length)


REHEARSAL_ALGORITHMS = ("dph", "filtered_pstar", "rft")


def prepare_rehearsal(
    spec: RunSpec, base_model: Path, output_dir: Path, preset: Preset, seed: int
) -> RunSpec:
    """`dph`/`filtered_pstar`/`rft` runs: draw (once, resumably) the base model's samples of the training
    prompts; else unchanged."""
    if spec.algorithm not in REHEARSAL_ALGORITHMS or "rehearsal_path" in spec.options:
        return spec
    from filtered_rl.rehearsal import sample_rehearsal

    samples, least = spec.rehearsal_samples, spec.rehearsal_min_correct or spec.rehearsal_samples
    # K = 8 (dph) keeps the folder name it had before K could be chosen
    name = f"seed{seed}-min{least}" if samples == 8 else f"seed{seed}-k{samples}-min{least}"
    folder = output_dir / "rehearsal" / name
    prompts = len(train_task(preset, seed).dataset)  # the training prompts (a task's pool may be smaller)
    sample_rehearsal(
        str(base_model), folder, num_samples=samples, min_correct=least, dataset=preset.task, split="train",
        num_prompts=prompts, max_new_tokens=preset.max_completion_length, seed=seed, progress=False,
    )  # fmt: skip
    return replace(spec, options={**spec.options, "rehearsal_path": str(folder)})


def train_task(preset: Preset, seed: int) -> Any:
    """The prompts (and verifier) every run of this seed trains on; the exact training-prompt metrics read
    the same ones."""
    from filtered_rl.data import load_task

    return load_task(preset.task, split="train", seed=seed, task_options={"num_train": preset.train_prompts})


def enumerated_answers(task: Any) -> tuple[list[str], list[list[str]]] | None:
    """The task's prompts and each one's enumerated valid answers (sorted), or None when there are no
    prompts or the task cannot enumerate some prompt's answers. A prompt may have none."""
    rows = task.dataset.to_list()
    answers = [task.valid_answers(row) for row in rows]
    if not rows or any(a is None for a in answers):
        return None
    return [r["prompt"] for r in rows], [sorted(a) for a in answers]


def train_run(spec: RunSpec, base_model: Path, output_dir: Path, preset: Preset, seed: int) -> Path:
    """Train one run from the base model; returns its final model directory (reused when present)."""
    import torch

    from filtered_rl.callbacks import BetaFromValidityCallback
    from filtered_rl.synthetic.console import attach_console_progress
    from filtered_rl.trainers import ALGORITHMS

    if spec.algorithm == "pstar_distill":
        return distill_run(spec, base_model, output_dir, preset, seed)
    final = output_dir / "final"
    if (final / "config.json").exists():
        return final
    on_gpu = torch.cuda.is_available()
    config_class, trainer_class = (
        ALGORITHMS[spec.algorithm].config_class,
        ALGORITHMS[spec.algorithm].trainer_class,
    )
    args = config_class(
        output_dir=str(output_dir),
        max_steps=preset.steps,
        learning_rate=preset.learning_rate,
        lr_scheduler_type="constant",
        num_generations=preset.num_generations,
        per_device_train_batch_size=preset.batch_size,
        max_completion_length=preset.max_completion_length,
        temperature=1.0,
        seed=seed,
        logging_steps=max(1, preset.steps // 20),
        save_steps=max(1, preset.steps // 2),
        save_total_limit=1,
        gradient_checkpointing=False,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        report_to=[],
        disable_tqdm=True,
        **spec.options,
    )
    task = train_task(preset, seed)
    dataset = task.dataset
    if spec.options.get("partition_estimate") == "column":
        dataset = dataset.add_column(
            args.base_validity_column, exact_base_validity(task, base_model, output_dir.parent, seed)
        )
    trainer = trainer_class(
        model=str(base_model), reward_funcs=task.verifier, args=args, train_dataset=dataset
    )
    if spec.target_validity is not None:
        BetaFromValidityCallback(target_validity=spec.target_validity).attach(trainer)
    curve = exact_curve_callback(base_model, output_dir, preset, seed)
    if curve is not None:
        trainer.add_callback(curve)
    # One bar per run on the console, every logged dict in train_log.jsonl instead of on the screen.
    attach_console_progress(
        trainer, desc=f"{spec.name} (seed {seed})", log_file=output_dir / "train_log.jsonl"
    )
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    (output_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (final / "train_minutes.json").write_text(json.dumps((time.perf_counter() - start) / 60))
    return final


def distill_run(spec: RunSpec, base_model: Path, output_dir: Path, preset: Preset, seed: int) -> Path:
    """The exact distillation of p* on this seed's training prompts (`filtered_rl.synthetic.distill`): the
    preset's steps (or options["steps"]) and prompts per step (batch_size / num_generations, as the RL
    arms see), its learning rate; the held-out exact curve as for the RL arms."""
    from filtered_rl.synthetic.distill import distill_pstar

    enumerated = enumerated_answers(train_task(preset, seed))
    if enumerated is None:
        raise ValueError(
            f"{spec.name!r} distils p* exactly and needs the valid answers of every training prompt; task "
            f"{preset.task!r} does not enumerate them (drop this arm)"
        )
    steps = int(spec.options.get("steps", preset.steps))
    curve = exact_curve_callback(base_model, output_dir, replace(preset, steps=steps), seed)
    per_step = int(spec.options.get("prompts_per_step", max(1, preset.batch_size // preset.num_generations)))
    return distill_pstar(
        base_model, *enumerated, output_dir, steps=steps, learning_rate=preset.learning_rate,
        prompts_per_step=per_step, seed=seed, curve=curve,
    )  # fmt: skip


def exact_base_validity(task: Any, base_model: Path, cache_dir: Path, seed: int) -> list[float]:
    """A(x) of every training prompt, exactly (teacher forcing over its valid answers), for the filtered
    objective's partition_estimate='column': the normaliser of p* measured offline instead of estimated
    from each group. Cached (atomically) per seed in `cache_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import exact_evaluation
    from filtered_rl.evaluation.outputs import atomic_write_text
    from filtered_rl.synthetic.console import quiet_libraries

    path = cache_dir / f"base_validity-seed{seed}-{len(task.dataset)}.json"
    if path.exists():
        return json.loads(path.read_text())
    enumerated = enumerated_answers(task)
    if enumerated is None or not all(enumerated[1]):
        raise ValueError(
            f"partition_estimate='column' on {task.name!r} needs every training prompt's valid answers "
            "enumerated (the task's valid_answers); use partition_estimate='running' for this task"
        )
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model)
    result = exact_evaluation(model, model, tokenizer, *enumerated, ks=(1,))
    values = [float(row["base_validity"]) for row in result["per_prompt"]]
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(values))
    return values


def exact_curve_callback(base_model: Path, output_dir: Path, preset: Preset, seed: int) -> Any | None:
    """The callback measuring exact metrics on this seed's held-out prompts during training, or None when
    the preset asks for no curve or the task cannot enumerate its valid answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.runner import load_config_task
    from filtered_rl.synthetic.console import quiet_libraries
    from filtered_rl.synthetic.exact_curve import CURVE_FILE, ExactCurveCallback

    if not (preset.exact and preset.curve_points > 0):
        return None
    enumerated = enumerated_answers(
        load_config_task(_eval_config(base_model, base_model, output_dir, preset, seed))
    )
    if enumerated is None:
        return None
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        base = AutoModelForCausalLM.from_pretrained(base_model)
    every = max(1, preset.steps // preset.curve_points)
    return ExactCurveCallback(base, tokenizer, *enumerated, every, output_dir / CURVE_FILE)


def evaluate_model(model: Path, base_model: Path, output_dir: Path, preset: Preset, seed: int) -> dict:
    """pass@k, diversity, coverage and KL(p*‖π) on the task's held-out prompts (resumable)."""
    from filtered_rl.evaluation.runner import SUMMARY_FILE, run_eval

    if (output_dir / SUMMARY_FILE).exists():
        summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    else:
        summary = run_eval(_eval_config(model, base_model, output_dir, preset, seed))
    exact = exact_metrics(model, base_model, output_dir, preset, seed)
    exact_train_metrics(model, base_model, output_dir, preset, seed)  # read by the study (study.md)
    return {**summary, "exact": exact} if exact is not None else summary


def _eval_config(model: Path, base_model: Path, output_dir: Path, preset: Preset, seed: int) -> Any:
    from filtered_rl.evaluation.runner import EvalConfig

    return EvalConfig(
        model=str(model),
        output_dir=str(output_dir),
        dataset=preset.task,
        split="test",
        num_prompts=preset.eval_prompts,
        num_samples=preset.eval_samples,
        temperature=1.0,
        max_new_tokens=preset.max_completion_length,
        seed=seed,
        base_model=str(base_model),
        progress=False,
    )


EXACT_FILE = "exact.json"
EXACT_TRAIN_FILE = "exact_train.json"


def exact_metrics(model: Path, base_model: Path, output_dir: Path, preset: Preset, seed: int) -> dict | None:
    """Exact validity, pass@k (k = 1, eval_samples, 256), coverage@k and KL(p* ‖ π(·|valid)) on the held-out
    prompts the sampled evaluation of this seed used, by teacher forcing over the task's enumerated valid
    answers (None when the task cannot enumerate them). For a task with several spellings per answer
    (countdown) these are lower bounds of the validity and pass@k; subset_sum has one spelling, so they are
    exact. Saved (atomically), with the per-prompt values, as exact.json."""
    from filtered_rl.evaluation.runner import load_config_task

    if not preset.exact:
        return None
    task = load_config_task(_eval_config(model, base_model, output_dir, preset, seed))  # the sampled prompts
    return _exact_file(model, base_model, task, output_dir / EXACT_FILE, preset)


def exact_train_metrics(
    model: Path, base_model: Path, output_dir: Path, preset: Preset, seed: int
) -> dict | None:
    """The same exact metrics on the first `exact_train_prompts` prompts the run trained on: where the
    objectives' optima (p*, p_β) are defined, apart from how far the policy generalises. exact_train.json."""
    if not (preset.exact and preset.exact_train_prompts):
        return None
    task = train_task(preset, seed)
    task = replace(
        task, dataset=task.dataset.select(range(min(preset.exact_train_prompts, len(task.dataset))))
    )
    return _exact_file(model, base_model, task, output_dir / EXACT_TRAIN_FILE, preset)


_BASE_SCORES: dict[tuple[str, tuple[str, ...]], list[list[float]]] = {}


def _exact_file(model: Path, base_model: Path, task: Any, path: Path, preset: Preset) -> dict | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import exact_evaluation
    from filtered_rl.evaluation.outputs import atomic_write_text
    from filtered_rl.synthetic.console import quiet_libraries

    if path.exists():
        return json.loads(path.read_text())
    enumerated = enumerated_answers(task)
    if enumerated is None:
        return None
    prompts, answers = enumerated
    with quiet_libraries():  # no "Loading weights" bars
        tokenizer = AutoTokenizer.from_pretrained(model)
        policy = AutoModelForCausalLM.from_pretrained(model)
        base = policy if Path(model) == Path(base_model) else AutoModelForCausalLM.from_pretrained(base_model)
    ks = sorted({1, preset.eval_samples, 256})
    key = (str(base_model), tuple(prompts))  # the base model's scores are the same for every arm of a seed
    result = exact_evaluation(
        policy,
        base,
        tokenizer,
        prompts,
        answers,
        ks,
        base_log_probs=_BASE_SCORES.get(key),
    )
    _BASE_SCORES[key] = result["base_log_probs"]
    atomic_write_text(path, json.dumps({**result["summary"], "per_prompt": result["per_prompt"]}, indent=1))
    return json.loads(path.read_text())  # keys as JSON writes them (k as strings), also on the first call


def row_from_summary(name: str, seed: int, summary: dict, minutes: float | None = None) -> dict:
    ks = sorted(int(k) for k in summary["pass_at_k"])
    coverage = summary.get("coverage") or {}
    kl = summary.get("kl_pstar_to_policy") or {}
    return {
        "run": name,
        "seed": seed,
        "validity": summary["validity"],
        "pass@1": summary["pass_at_k"]["1"]["mean"],
        f"pass@{ks[-1]}": summary["pass_at_k"][str(ks[-1])]["mean"],
        "pass_at_k": {k: summary["pass_at_k"][str(k)]["mean"] for k in ks},
        "distinct_valid": summary["diversity"]["distinct_valid_answers"],
        "support_hit": coverage.get("fraction_of_valid_answers_hit"),
        "pstar_mass_hit": coverage.get("pstar_mass_hit"),
        "kl_pstar_policy": kl.get("mean") if isinstance(kl, dict) else kl,
        **_exact_columns(summary.get("exact")),
        "train_minutes": minutes,
    }


def _exact_columns(exact: dict | None) -> dict:
    """The exact metrics a row reports: validity, pass@256, coverage@256, KL(p* ‖ π(·|valid))."""
    if not exact:
        return {}
    return {
        "exact_validity": exact["validity"],
        "exact_pass@256": exact["pass_at_k"].get("256"),
        "exact_coverage@256": exact["coverage_at_k"].get("256"),
        "exact_kl_valid": exact["kl_pstar_policy_valid"],
    }


def run_frontier(
    preset: str | Preset,
    output_dir: Path,
    seeds: list[int],
    *,
    threads: int | None = None,
    base_model: Path | None = None,
    arms: list[str] | None = None,
    task: str | None = None,
    report_only: bool = False,
    compare: list[tuple[str, str]] = (),
) -> list[dict]:
    """Pretrain (cached) the base model, train every run for every seed, evaluate all; write results.

    `report_only` trains nothing: the runs already finished under `output_dir` are evaluated (if not yet)
    and summarised, the others left out, e.g. to read a study while its seeds still run elsewhere.

    `preset` is a name in PRESETS or a Preset; `base_model` overrides the preset's pretrained base; `arms`
    (names in ARMS) replaces the preset's runs, keeping its sizes; `task` (a registered synthetic task)
    replaces the preset's task, with completions long enough for it. `compare` lists (A, B) pairs of
    names in ARMS (or "base") whose paired differences `study.md` tables; both must be runs of the preset.
    """
    import torch

    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.study import write_study

    if threads:
        torch.set_num_threads(threads)
    preset = select_task(select_arms(PRESETS[preset] if isinstance(preset, str) else preset, arms), task)
    compare_names = compared_runs(preset, compare)  # before anything is trained or loaded
    output_dir.mkdir(parents=True, exist_ok=True)
    base = base_model or load_or_pretrain(
        size=preset.base_size, seed=0, task=preset.task, steps=preset.base_steps
    )
    rows = []
    for seed in seeds:
        summary = evaluate_model(base, base, output_dir / "eval" / f"base-seed{seed}", preset, seed)
        rows.append(row_from_summary("base model", seed, summary))
        for spec in preset.runs:
            run_dir = output_dir / "train" / f"{slug(spec.name)}-seed{seed}"
            if report_only and not (run_dir / "final" / "train_minutes.json").exists():
                continue
            model = train_run(
                prepare_rehearsal(spec, base, output_dir, preset, seed), base, run_dir, preset, seed
            )
            minutes = json.loads((model / "train_minutes.json").read_text())
            summary = evaluate_model(
                model, base, output_dir / "eval" / f"{slug(spec.name)}-seed{seed}", preset, seed
            )
            rows.append(row_from_summary(spec.name, seed, summary, minutes))
            print(
                f"done: {spec.name} (seed {seed}): pass@1 {rows[-1]['pass@1']:.3f}, "
                f"distinct valid {rows[-1]['distinct_valid']:.2f}, {minutes:.1f} min of training",
                flush=True,
            )
    (output_dir / "results.json").write_text(json.dumps({"preset": asdict(preset), "rows": rows}, indent=1))
    table = format_table(aggregate(rows))
    (output_dir / "results.md").write_text(table + "\n")
    plot_frontier(rows, output_dir)
    write_study(
        output_dir,
        [(spec.name, slug(spec.name), spec.family_name) for spec in preset.runs],
        seeds,
        reference=KL_GRPO,
        compare=compare_names,
    )
    return rows


def compared_runs(preset: Preset, compare: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`--compare` pairs as run names (the study's BASE for "base"); an arm outside the preset fails, naming it."""
    from filtered_rl.synthetic.study import BASE

    names = {slug(spec.name) for spec in preset.runs}
    out = []
    for pair in compare:
        for arm in pair:
            if arm != "base" and (arm not in ARMS or slug(ARMS[arm].name) not in names):
                raise ValueError(
                    f"--compare {':'.join(pair)}: {arm!r} is not an arm of this run; choose from base, "
                    + ", ".join(slug(spec.name) for spec in preset.runs)
                )
        out.append(tuple(BASE if arm == "base" else ARMS[arm].name for arm in pair))
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (standard deviation over seeds) of every metric, per run name, in first-seen order."""
    names = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for name in names:
        group = [r for r in rows if r["run"] == name]
        entry: dict[str, Any] = {"run": name, "seeds": len(group)}
        for key, value in group[0].items():
            if (
                key in ("run", "seed", "pass_at_k")
                or not isinstance(value, int | float)
                and value is not None
            ):
                continue
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        out.append(entry)
    return out


def format_table(aggregated: list[dict]) -> str:
    """Markdown table; a ± spread appears when there are several seeds."""
    keys = [k for k in aggregated[0] if k not in ("run", "seeds", "train_minutes")]
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for entry in aggregated:
        cells = []
        for key in keys:
            value = entry.get(key)
            if value is None:
                cells.append("–")
            else:
                mean, std = value
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if entry["seeds"] > 1 else ""))
        lines.append(f"| {entry['run']} | {entry['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    """pass@k curves (mean over seeds); the coverage–precision plane (pass@1 vs pass@n per seed) and
    pass@1 vs distinct valid answers (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["run"] for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for name in names:
        group = [r for r in rows if r["run"] == name]
        ks = sorted(group[0]["pass_at_k"], key=int)
        means = [np.mean([r["pass_at_k"][k] for r in group]) for k in ks]
        style = dict(color="black", linestyle="--") if name == "base model" else dict(color=colors[name])
        ax.plot([int(k) for k in ks], means, marker="o", markersize=3, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("pass@k (held-out prompts)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    passk_path = output_dir / "passk.png"
    fig.savefig(passk_path)
    plt.close(fig)

    # Left: the coverage–precision plane per seed. pass@n saturates when a task has many valid answers per
    # prompt, so the right panel puts the number of distinct valid answers (mean ± std over seeds) beside it.
    fig, (ax, ax_distinct) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    n_key = next(k for k in rows[0] if k.startswith("pass@") and k != "pass@1")
    for name in names:
        group = [r for r in rows if r["run"] == name]
        base = name == "base model"
        marker = (
            dict(marker="*", s=160, color="black") if base else dict(marker="o", s=40, color=colors[name])
        )
        precision = [r["pass@1"] for r in group]
        distinct = [r["distinct_valid"] for r in group]
        ax.scatter(precision, [r[n_key] for r in group], label=name, **marker)
        ax_distinct.errorbar(
            np.mean(precision),
            np.mean(distinct),
            xerr=np.std(precision) if len(group) > 1 else None,
            yerr=np.std(distinct) if len(group) > 1 else None,
            fmt="*" if base else "o",
            markersize=12 if base else 6,
            color="black" if base else colors[name],
            capsize=2,
            label=name,
        )
    ax.set_xlabel("pass@1 (precision)")
    ax.set_ylabel(f"{n_key} (coverage)")
    ax_distinct.set_xlabel("pass@1 (precision)")
    ax_distinct.set_ylabel(f"distinct valid answers per prompt (of {n_key[5:]} samples)")
    for axis in (ax, ax_distinct):
        axis.grid(alpha=0.3)
    ax_distinct.legend(fontsize=7)
    fig.tight_layout()
    plane_path = output_dir / "frontier.png"
    fig.savefig(plane_path)
    plt.close(fig)
    return passk_path, plane_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="experiment size (default: cpu)"
    )
    parser.add_argument("--output-dir", default="runs/frontier", help="where runs, summaries and figures go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training/evaluation seeds")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--arms",
        type=_arm_list,
        default=None,
        help="comma-separated arms to run instead of the preset's, at its sizes, e.g. mara,passk,grpo-beta-0-04 "
        f"(any of: {', '.join(ARMS)})",
    )
    parser.add_argument(
        "--task",
        default=None,
        help="synthetic task of the base model and prompts (default: the preset's, countdown)",
    )
    parser.add_argument(
        "--base-model",
        type=_model_dir,
        default=None,
        help="a base model directory for that task, e.g. one from `filtered-rl pretrain --steps N "
        "--output-dir DIR` (default: the task's cached nano base model, pretrained if absent)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: evaluate and summarise the runs already finished in --output-dir (others are "
        "left out), e.g. while some seeds still run in other processes",
    )
    parser.add_argument(
        "--compare",
        type=_arm_pair,
        action="append",
        default=[],
        metavar="A:B",
        help="arm A minus arm B (names as in --arms, or base) in every exact metric, ± the paired bootstrap SE, "
        "as a table of study.md; repeatable, e.g. --compare filtered-forward-kl:grpo-beta-0-2",
    )


def _model_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a model directory (no config.json in it)")
    return path


def _arm_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown or [text]}; choose from {', '.join(ARMS)}")
    return names


def _arm_pair(text: str) -> tuple[str, str]:
    parts = [name.strip() for name in text.split(":")]
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected A:B, two arm names, e.g. filtered-forward-kl:base"
        )
    unknown = [name for name in parts if name != "base" and name not in ARMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}; choose from base, {', '.join(ARMS)}")
    return parts[0], parts[1]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = run_frontier(
        args.preset,
        Path(args.output_dir),
        args.seeds,
        threads=args.threads,
        arms=getattr(args, "arms", None),
        task=getattr(args, "task", None),
        base_model=getattr(args, "base_model", None),
        report_only=getattr(args, "report_only", False),
        compare=getattr(args, "compare", []),
    )
    print(format_table(aggregate(rows)))
    print(
        f"\nwrote {args.output_dir}/results.md, passk.png, frontier.png in {(time.perf_counter() - start) / 60:.1f} min"
    )
    return 0 if all(math.isfinite(r["validity"]) for r in rows) else 1
