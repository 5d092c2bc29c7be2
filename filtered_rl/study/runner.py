"""Run a study: train every arm from one base model with one budget and seed, evaluate, write the report.

Every arm trains through `filtered-rl train`'s code path: its settings become a `filtered-rl train` config
(`train/<arm>-seed<s>/train_config.yaml`, which `filtered-rl train --config` reproduces by hand), parsed and
checked by the same parser (`filtered_rl.train.parse_recipe_args`), the same task loading and the same
trainer construction (`filtered_rl.train.make_trainer`). The study adds what the comparison needs: the
final model in `final/`, the exact curve callback where the task enumerates its valid answers, one
progress bar per run. Every base and arm model is evaluated by the sampled evaluator (`filtered-rl eval`'s
`run_eval`: `summary.json`, `samples.jsonl`, then `sampled.json` per prompt) and, where the task enumerates
its valid answers, by teacher forcing (`exact.json`, `exact_train.json`).

Resumable: a finished arm (`final/`) or evaluation (`summary.json`) is reused; a killed arm resumes from its
newest complete checkpoint, a killed evaluation from its last finished prompt batch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from filtered_rl.study.spec import RunSpec, StudyConfig, slug


class StudyError(ValueError):
    """A study that cannot run as given (an arm, a setting, the task or the model); the message says why."""


BASE_NAME = "base model"
REHEARSAL_ALGORITHMS = ("dph", "filtered_pstar", "rft")
EXACT_FILE = "exact.json"
EXACT_TRAIN_FILE = "exact_train.json"
TRAIN_CONFIG = "train_config.yaml"


# --- the task ------------------------------------------------------------------------------------------


def is_synthetic(config: StudyConfig) -> bool:
    from filtered_rl.data import synthetic_task

    return synthetic_task(config.task) is not None


def task_kwargs(config: StudyConfig) -> dict[str, Any]:
    """load_task's keyword arguments shared by the training and held-out prompts."""
    return {
        "data_files": config.data_files,
        "conversational": config.conversational,
        "system_prompt": config.system_prompt,
        "prompt_column": config.prompt_column,
        "verifier": config.verifier,
        "gold_column": config.gold_column,
    }


def train_task(preset: StudyConfig, seed: int) -> Any:
    """The prompts (and verifier) every run of this seed trains on; the exact training-prompt metrics read
    the same ones. A synthetic task draws `train_prompts` (at most its pool), any other the first ones."""
    from filtered_rl.data import load_task

    if is_synthetic(preset):
        return load_task(
            preset.task, split="train", seed=seed, task_options={"num_train": preset.train_prompts},
            **task_kwargs(preset),
        )  # fmt: skip
    return load_task(
        preset.task, split=preset.train_split, limit=preset.train_prompts, seed=seed, **task_kwargs(preset)
    )


def enumerated_answers(task: Any) -> tuple[list[str], list[list[str]]] | None:
    """The task's prompts and each one's enumerated valid answers (sorted), or None when there are no
    prompts or the task cannot enumerate some prompt's answers. A prompt may have none."""
    rows = task.dataset.to_list()
    answers = [task.valid_answers(row) for row in rows]
    if not rows or any(a is None for a in answers):
        return None
    return [r["prompt"] for r in rows], [sorted(a) for a in answers]


# --- training --------------------------------------------------------------------------------------------


def prepare_rehearsal(
    spec: RunSpec,
    base_model: Path | str,
    output_dir: Path,
    preset: StudyConfig,
    seed: int,
    prompts: int | None = None,
) -> RunSpec:
    """`dph`/`filtered_pstar`/`rft` runs: draw (once, resumably) the base model's samples of the training
    prompts (`prompts` of them; None: as many as this seed trains on); else unchanged."""
    if spec.algorithm not in REHEARSAL_ALGORITHMS or "rehearsal_path" in spec.options:
        return spec
    from filtered_rl.rehearsal import sample_rehearsal

    samples, least = spec.rehearsal_samples, spec.rehearsal_min_correct or spec.rehearsal_samples
    # K = 8 (dph) keeps the folder name it had before K could be chosen
    name = f"seed{seed}-min{least}" if samples == 8 else f"seed{seed}-k{samples}-min{least}"
    folder = output_dir / "rehearsal" / name
    if prompts is None:
        prompts = len(train_task(preset, seed).dataset)  # the training prompts (a task's pool may be smaller)
    extra: dict[str, Any] = {"split": "train"}
    if not is_synthetic(preset):
        extra = {**task_kwargs(preset), "split": preset.train_split}
        extra["chat_template"] = extra.pop("conversational")
    sample_rehearsal(
        str(base_model), folder, num_samples=samples, min_correct=least, dataset=preset.task, num_prompts=prompts,
        max_new_tokens=preset.max_completion_length, seed=seed, progress=False, **extra,
    )  # fmt: skip
    return replace(spec, options={**spec.options, "rehearsal_path": str(folder)})


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def arm_train_config(
    spec: RunSpec, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int, gpu: bool = False
) -> dict[str, Any]:
    """The `filtered-rl train` config of one arm: the study's sizes, then its `settings`, then the arm's own
    options (the later win)."""
    config: dict[str, Any] = {
        "algorithm": spec.algorithm,
        "model_name_or_path": _model_name(base_model),
        "dataset_name": preset.task,
        "dataset_train_split": preset.train_split,
        "output_dir": str(output_dir),
        "max_steps": preset.steps,
        "learning_rate": preset.learning_rate,
        "lr_scheduler_type": "constant",
        "num_generations": preset.num_generations,
        "per_device_train_batch_size": preset.batch_size,
        "max_completion_length": preset.max_completion_length,
        "temperature": preset.temperature,
        "seed": seed,
        "logging_steps": max(1, preset.steps // 20),
        "save_steps": max(1, preset.steps // 2),
        "save_total_limit": 1,
        "gradient_checkpointing": False,
        "use_cpu": not gpu,
        "bf16": gpu,
        "report_to": "none",
        "disable_tqdm": True,
    }
    for key, value in task_kwargs(preset).items():
        if value is not None and not (key == "system_prompt" and value == "auto"):
            config[key] = value
    prompts_key = "countdown_train_prompts" if is_synthetic(preset) else "max_train_prompts"
    config[prompts_key] = preset.train_prompts
    config.update(preset.settings)
    config.update(spec.options)
    if spec.target_validity is not None:
        config["target_validity"] = spec.target_validity
    return config


def _model_name(model: Path | str) -> str:
    """A local model directory as an absolute path (the config is valid from anywhere), a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def parse_arm(config: dict[str, Any], path: Path, name: str) -> tuple[str, tuple]:
    """`filtered-rl train`'s parse and checks of one arm's config (written to `path`); a refusal names the arm."""
    import yaml

    from filtered_rl.evaluation.outputs import atomic_write_text
    from filtered_rl.train import parse_recipe_args

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    try:
        return parse_recipe_args(["--config", str(path)])
    except SystemExit as error:
        message = str(error.code).removeprefix("filtered-rl train: ")
        raise StudyError(f"arm {name!r} ({config['algorithm']}): {message}") from None


def train_run(
    spec: RunSpec, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
) -> Path:
    """Train one arm from the base model; returns its final model directory (reused when present)."""
    from filtered_rl import run_dir
    from filtered_rl.synthetic.console import attach_console_progress
    from filtered_rl.train import check_before_loading, load_training_task, make_trainer

    if spec.algorithm == "pstar_distill":
        return distill_run(spec, base_model, output_dir, preset, seed)
    final = output_dir / "final"
    if (final / "config.json").exists():
        return final
    config = arm_train_config(spec, base_model, output_dir, preset, seed, on_gpu())
    algorithm, parsed = parse_arm(config, output_dir / TRAIN_CONFIG, spec.name)
    script_args, training_args, _, *controller = parsed
    task = load_training_task(script_args, training_args)
    try:
        check_before_loading(task, training_args, controller[0] if controller else None)
    except SystemExit as error:
        raise StudyError(f"arm {spec.name!r}: {error.code}") from None
    dataset = task.dataset
    if spec.options.get("partition_estimate") == "column":
        dataset = dataset.add_column(
            training_args.base_validity_column,
            exact_base_validity(task, base_model, output_dir.parent, seed),
        )
    resume = None
    if run_dir.own_checkpoints(output_dir):
        try:
            resume = run_dir.resolve_resume(True, str(output_dir), log=False)
        except run_dir.ResumeError as error:
            print(f"{spec.name} (seed {seed}): {error}; training afresh", file=sys.stderr)
    run_dir.claim(output_dir, [TRAIN_CONFIG, "README.md", "final", "train_log.json", "train_log.jsonl",
                               CURVE_NAME], kind="study arm")  # fmt: skip
    curve = exact_curve_callback(base_model, output_dir, preset, seed)
    trainer = make_trainer(
        algorithm, parsed, str(base_model), dataset, task.verifier, callbacks=[curve] if curve else []
    )
    # One bar per run on the console, every logged dict in train_log.jsonl instead of on the screen.
    attach_console_progress(
        trainer, desc=f"{spec.name} (seed {seed})", log_file=output_dir / "train_log.jsonl"
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, final)
    (output_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (final / "train_minutes.json").write_text(json.dumps((time.perf_counter() - start) / 60))
    return final


CURVE_NAME = "exact_curve.jsonl"


def save_final_model(trainer: Any, final: Path) -> None:
    """The arm's final model as a plain model directory, what the evaluators load and a rerun reuses: a
    LoRA (PEFT) policy is merged into its base weights, where `save_model` would write the adapter alone."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model.merge_and_unload().save_pretrained(str(final))
    else:
        trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))


def distill_run(
    spec: RunSpec, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
) -> Path:
    """The exact distillation of p* on this seed's training prompts (`filtered_rl.study.distill`): the
    preset's steps (or options["steps"]) and prompts per step (batch_size / num_generations, as the RL
    arms see), its learning rate; the held-out exact curve as for the RL arms."""
    from filtered_rl.study.distill import distill_pstar

    enumerated = enumerated_answers(train_task(preset, seed))
    if enumerated is None:
        raise StudyError(
            f"{spec.name!r} distils p* exactly and needs the valid answers of every training prompt; task "
            f"{preset.task!r} does not enumerate them (drop this arm)"
        )
    steps = int(spec.options.get("steps", preset.steps))
    curve = exact_curve_callback(base_model, output_dir, replace(preset, steps=steps), seed)
    per_step = int(spec.options.get("prompts_per_step", max(1, preset.batch_size // preset.num_generations)))
    return distill_pstar(
        Path(base_model), *enumerated, output_dir, steps=steps, learning_rate=preset.learning_rate,
        prompts_per_step=per_step, seed=seed, curve=curve,
    )  # fmt: skip


# --- exact metrics (tasks that enumerate their valid answers) ----------------------------------------------


def exact_base_validity(task: Any, base_model: Path | str, cache_dir: Path, seed: int) -> list[float]:
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
        raise StudyError(
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


def exact_curve_callback(
    base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
) -> Any | None:
    """The callback measuring exact metrics on this seed's held-out prompts during training, or None when
    the preset asks for no curve or the task cannot enumerate its valid answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.runner import load_config_task
    from filtered_rl.study.curve import CURVE_FILE, ExactCurveCallback
    from filtered_rl.synthetic.console import quiet_libraries

    if not (preset.exact and preset.curve_points > 0):
        return None
    enumerated = enumerated_answers(
        load_config_task(eval_config(base_model, base_model, output_dir, preset, seed))
    )
    if enumerated is None:
        return None
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        base = AutoModelForCausalLM.from_pretrained(base_model)
    every = max(1, preset.steps // preset.curve_points)
    return ExactCurveCallback(base, tokenizer, *enumerated, every, output_dir / CURVE_FILE)


def exact_metrics(
    model: Path | str, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
) -> dict | None:
    """Exact validity, pass@k (k = 1, eval_samples, 256), coverage@k and KL(p* ‖ π(·|valid)) on the held-out
    prompts the sampled evaluation of this seed used, by teacher forcing over the task's enumerated valid
    answers (None when the task cannot enumerate them). For a task with several spellings per answer
    (countdown) these are lower bounds of the validity and pass@k; subset_sum has one spelling, so they are
    exact. Saved (atomically), with the per-prompt values, as exact.json."""
    from filtered_rl.evaluation.runner import load_config_task

    if not preset.exact:
        return None
    task = load_config_task(eval_config(model, base_model, output_dir, preset, seed))  # the sampled prompts
    return _exact_file(model, base_model, task, output_dir / EXACT_FILE, preset)


def exact_train_metrics(
    model: Path | str, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
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


_BASE_SCORES: dict[tuple[str, str], list[list[float]]] = {}


def _exact_file(
    model: Path | str, base_model: Path | str, task: Any, path: Path, preset: StudyConfig
) -> dict | None:
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
        base = policy if str(model) == str(base_model) else AutoModelForCausalLM.from_pretrained(base_model)
    ks = sorted({1, preset.eval_samples, 256})
    # The base model's scores are the same for every arm of a seed; prompts may be chat messages (lists).
    key = (str(base_model), json.dumps(prompts, sort_keys=True))
    result = exact_evaluation(
        policy, base, tokenizer, prompts, answers, ks, base_log_probs=_BASE_SCORES.get(key)
    )
    _BASE_SCORES[key] = result["base_log_probs"]
    atomic_write_text(path, json.dumps({**result["summary"], "per_prompt": result["per_prompt"]}, indent=1))
    return json.loads(path.read_text())  # keys as JSON writes them (k as strings), also on the first call


# --- evaluation ------------------------------------------------------------------------------------------


def eval_config(
    model: Path | str, base_model: Path | str, output_dir: Path, preset: StudyConfig, seed: int
) -> Any:
    """`filtered-rl eval`'s config for one model of the study: the held-out prompts of this seed."""
    from filtered_rl.evaluation.runner import EvalConfig

    return EvalConfig(
        model=str(model),
        output_dir=str(output_dir),
        dataset=preset.task,
        data_files=preset.data_files,
        split=preset.eval_split,
        num_prompts=preset.eval_prompts,
        num_samples=preset.eval_samples,
        temperature=preset.temperature,
        max_new_tokens=preset.max_completion_length,
        chat_template=preset.conversational,
        system_prompt=preset.system_prompt,
        prompt_column=preset.prompt_column,
        verifier=preset.verifier,
        gold_column=preset.gold_column,
        seed=seed,
        base_model=str(base_model),
        progress=False,
    )


def evaluate_model(
    model: Path | str,
    base_model: Path | str,
    output_dir: Path,
    preset: StudyConfig,
    seed: int,
    sampled: bool = False,
) -> dict:
    """pass@k, diversity, coverage and KL(p*‖π) on the task's held-out prompts (resumable); with `sampled`,
    also the per-prompt sampled metrics (`sampled.json`)."""
    from filtered_rl.evaluation.runner import SUMMARY_FILE, run_eval
    from filtered_rl.study.sampled import sampled_metrics

    if (output_dir / SUMMARY_FILE).exists():
        summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    else:
        summary = run_eval(eval_config(model, base_model, output_dir, preset, seed))
    if sampled:
        per_prompt = sampled_metrics(output_dir, preset.eval_samples, preset.distinct_m)["per_prompt"]
        defined = [r["distinct_m_valid"] for r in per_prompt if r["distinct_m_valid"] is not None]
        summary = {**summary, "distinct_m_valid": sum(defined) / len(defined) if defined else None}
    exact = exact_metrics(model, base_model, output_dir, preset, seed)
    exact_train_metrics(model, base_model, output_dir, preset, seed)  # read by the study (study.md)
    return {**summary, "exact": exact} if exact is not None else summary


# --- the study ------------------------------------------------------------------------------------------


def arm_dir(output_dir: Path, spec: RunSpec, seed: int) -> Path:
    return output_dir / "train" / f"{slug(spec.name)}-seed{seed}"


def run_seed(
    preset: StudyConfig,
    base: Path | str,
    output_dir: Path,
    seed: int,
    *,
    report_only: bool = False,
    sampled: bool = False,
    prepare: Any = None,
) -> list[dict]:
    """Evaluate the base, train and evaluate every arm of one seed; the rows of the results table.
    `prepare(spec, seed)` draws an arm's stored samples (default: `prepare_rehearsal`)."""
    from filtered_rl.study.tables import row_from_summary

    prepare = prepare or (lambda spec, s: prepare_rehearsal(spec, base, output_dir, preset, s))
    summary = evaluate_model(base, base, output_dir / "eval" / f"base-seed{seed}", preset, seed, sampled)
    rows = [row_from_summary(BASE_NAME, seed, summary)]
    for spec in preset.runs:
        run_dir = arm_dir(output_dir, spec, seed)
        if report_only and not (run_dir / "final" / "train_minutes.json").exists():
            continue
        model = train_run(prepare(spec, seed), base, run_dir, preset, seed)
        minutes = json.loads((model / "train_minutes.json").read_text())
        summary = evaluate_model(
            model, base, output_dir / "eval" / f"{slug(spec.name)}-seed{seed}", preset, seed, sampled
        )
        rows.append(row_from_summary(spec.name, seed, summary, minutes))
        print(
            f"done: {spec.name} (seed {seed}): pass@1 {rows[-1]['pass@1']:.3f}, "
            f"distinct valid {rows[-1]['distinct_valid']:.2f}, {minutes:.1f} min of training",
            flush=True,
        )
    return rows


def write_results(
    preset: StudyConfig,
    output_dir: Path,
    rows: list[dict],
    seeds: list[int],
    *,
    reference: str | None = None,
    compare: list[tuple[str, str]] = (),
    sampled: bool = False,
    preamble: list[str] = (),
) -> None:
    """results.json, results.md, passk.png, frontier.png and study.md (with `sampled`, the sampled metrics'
    sections first, then the exact ones where the task enumerates its valid answers)."""
    from dataclasses import asdict

    from filtered_rl.study.report import EXACT, SAMPLED, write_study
    from filtered_rl.study.tables import aggregate, format_table, plot_frontier

    (output_dir / "results.json").write_text(json.dumps({"preset": asdict(preset), "rows": rows}, indent=1))
    (output_dir / "results.md").write_text(format_table(aggregate(rows)) + "\n")
    plot_frontier(rows, output_dir)
    runs = [(spec.name, slug(spec.name), spec.family_name) for spec in preset.runs]
    if sampled:
        write_study(
            output_dir, runs, seeds, reference=reference, compare=compare, metric_sets=(SAMPLED, EXACT),
            title="# Study (mean ± bootstrap SE over seeds and prompts)", preamble=preamble,
        )  # fmt: skip
    else:
        write_study(output_dir, runs, seeds, reference=reference, compare=compare)
