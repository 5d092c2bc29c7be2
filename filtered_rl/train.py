"""`filtered-rl train`: one training entry point for every registered algorithm, driven by a YAML config.

    filtered-rl train --config recipes/configs/countdown-nano-cpu.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/train.py \
        --config recipes/configs/gsm8k-qwen2.5-0.5b-lora.yaml

`algorithm` (YAML key or `--algorithm`) picks the trainer and hence the config dataclass, from the
registry `filtered_rl.trainers.ALGORITHMS` (`filtered-rl train --list` prints it): e.g. `grpo` (TRL's
GRPOTrainer, k3 KL in the loss), `grpo_klr` (GRPO with the KL in the reward), `rloo` (TRL's RLOOTrainer, KL in the reward), `filtered`
(FilteredGRPOTrainer). Setting `target_validity` (μ) turns the β-from-μ controller on for the
algorithms that accept it. Flags override the YAML.
`model_name_or_path: filtered-rl:nano` (or `:small`) builds/loads the project's own base model,
`filtered-rl:smollm2-135m` SmolLM2-135M-Instruct from the dev install (`filtered_rl.models`).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _default_dataset() -> str:
    from filtered_rl.data import default_dataset

    return default_dataset()


OWN_MODEL_PREFIX = "filtered-rl:"


@dataclass
class ScriptArguments:
    """What to train on and how to score it (the trainer's own options live in its config)."""

    algorithm: str = field(
        default="grpo",
        metadata={"help": "a registered algorithm (`filtered-rl train --list`): grpo, rloo, filtered, ..."},
    )
    dataset_name: str = field(
        default_factory=lambda: _default_dataset(),
        metadata={
            "help": "a synthetic task (countdown, subset_sum) | gsm8k | math500 | humaneval | mbpp, or any "
            "hub/local dataset (default: the default synthetic task)"
        },
    )
    data_files: str | None = field(
        default=None,
        metadata={
            "help": "local file or folder with the public release's files (e.g. ../shared/data/gsm8k); "
            "unset: the hub"
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "split to train on"})
    max_train_prompts: int | None = field(default=None, metadata={"help": "keep the first N prompts"})
    prompt_column: str | None = field(default=None, metadata={"help": "prompt column of a custom dataset"})
    verifier: str | None = field(
        default=None, metadata={"help": "math | code | a synthetic task's name (custom datasets)"}
    )
    gold_column: str | None = field(default=None, metadata={"help": "column holding the gold answer/tests"})
    system_prompt: str | None = field(
        default="auto",
        metadata={"help": "'auto' (boxed answer for math, code block for code), text, or null"},
    )
    conversational: bool | None = field(
        default=None,
        metadata={"help": "chat-formatted prompts (default: true for math/code, false for synthetic tasks)"},
    )
    countdown_train_prompts: int | None = field(
        default=None,
        metadata={
            "help": "training prompts of a synthetic task (default: the task's default; countdown has 638, "
            "more is refused)"
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "train into an output_dir holding files filtered-rl did not write (they are still never "
            "overwritten or deleted); without it such a directory is refused unless resuming"
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "longest prompt in tokens (chat template applied); longer ones are refused before training. "
            "Default: the model's max_position_embeddings minus max_completion_length"
        },
    )


@dataclass
class ControllerArguments:
    """grpo_klr/rloo only: the β-from-μ controller (the filtered/tilted configs have their own `target_validity`)."""

    target_validity: float | None = field(
        default=None,
        metadata={
            "help": "μ: set the KL coefficient each step so that KL-control's optimum has this validity "
            "(the config's beta must be > 0); unset: fixed beta"
        },
    )
    controller_closed_loop: bool = field(default=False, metadata={"help": "add the bounded PI correction"})
    controller_estimator: str = field(default="importance", metadata={"help": "importance | policy | column"})

    def __post_init__(self):
        from filtered_rl.callbacks import ESTIMATORS

        if self.target_validity is not None and not 0 < self.target_validity < 1:
            raise ValueError(
                f"target_validity={self.target_validity} must lie strictly in (0, 1) (μ → 1 is the filtered model: "
                "use algorithm: filtered)"
            )
        if self.controller_estimator not in ESTIMATORS:
            raise ValueError(
                f"controller_estimator={self.controller_estimator!r}: choose one of {ESTIMATORS}"
            )


def resolve_config(argv: list[str]) -> tuple[str, list[str]]:
    """Pick the algorithm and flatten its YAML section; returns (algorithm, argv for TrlParser).

    A YAML config may hold sections named after the algorithms (`grpo:`, `rloo:`, `filtered:`); the
    section of the chosen algorithm is merged into the top level (section keys win) and the others are
    dropped, so that one file serves every algorithm. `--algorithm` on the command line beats the
    YAML's `algorithm`; other flags beat the YAML as usual.
    """
    from filtered_rl.trainers import ALGORITHMS

    argv = list(argv)
    algorithm = _flag_value(argv, "--algorithm")
    config_path = _flag_value(argv, "--config")
    config = _read_yaml(config_path) if config_path else {}
    algorithm = algorithm or config.get("algorithm") or "grpo"
    if algorithm not in ALGORITHMS:
        raise SystemExit(
            f"algorithm={algorithm!r} is not supported; choose one of {ALGORITHMS.names()} (YAML key `algorithm`)"
        )
    sections = [
        key for key, value in config.items() if isinstance(value, dict) and key != "model_init_kwargs"
    ]
    unknown = [key for key in sections if key not in ALGORITHMS and not _is_config_field(key)]
    if unknown:
        raise SystemExit(
            f"{config_path}: YAML sections {unknown} name no registered algorithm; sections must be one of "
            f"{ALGORITHMS.names()}"
        )
    if config_path and any(isinstance(config.get(name), dict) for name in ALGORITHMS):
        flat = {k: v for k, v in config.items() if k not in ALGORITHMS}
        flat.update(config.get(algorithm) or {})
        flat["algorithm"] = algorithm
        resolved = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="filtered-rl-", delete=False)
        with resolved:
            yaml.safe_dump(flat, resolved)
        argv = _replace_flag_value(argv, "--config", resolved.name)
    return algorithm, argv


def _read_yaml(path: str) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise SystemExit(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value at the top level")
    return config


def _is_config_field(key: str) -> bool:
    """Dict-valued keys that are options of some config (e.g. `model_init_kwargs`), not algorithm sections."""
    from filtered_rl.trainers import ALGORITHMS

    return any(
        key in getattr(entry.config_class, "__dataclass_fields__", {}) for entry in ALGORITHMS.values()
    )


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _replace_flag_value(argv: list[str], flag: str, value: str) -> list[str]:
    out = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == flag and i + 1 < len(argv):
            out += [flag, value]
            skip = True
        elif arg.startswith(flag + "="):
            out.append(f"{flag}={value}")
        else:
            out.append(arg)
    return out


def resolve_model(name_or_path: str) -> str:
    """Hub name or path as given; `filtered-rl:<name>` (nano, small, smollm2-135m: `filtered_rl.models`)
    builds or converts the model once into the cache and returns its directory."""
    from filtered_rl.models import NamedModelError
    from filtered_rl.models import resolve_model as resolve_named

    try:
        return resolve_named(name_or_path)
    except NamedModelError as error:
        raise SystemExit(f"filtered-rl: {error}") from None


def parse_recipe_args(argv: list[str]) -> tuple[str, tuple]:
    """(algorithm, (script_args, training_args, model_args[, controller_args])) from flags + YAML.

    Settings that cannot work are refused here, naming the field (`check_settings`); a sectioned YAML's
    flattened copy (`resolve_config`) is deleted once parsed."""
    given = _flag_value(argv, "--config")
    algorithm, resolved = resolve_config(argv)
    flattened = _flag_value(resolved, "--config")
    try:
        return _parse(algorithm, resolved)
    finally:
        if flattened and flattened != given:
            Path(flattened).unlink(missing_ok=True)


def _parse(algorithm: str, argv: list[str]) -> tuple[str, tuple]:
    from trl import ModelConfig, TrlParser

    from filtered_rl.trainers import ALGORITHMS

    entry = ALGORITHMS[algorithm]
    dataclasses = (ScriptArguments, entry.config_class, ModelConfig)
    if entry.accepts_controller:
        dataclasses += (ControllerArguments,)
    elif "target_validity" not in entry.config_class.__dataclass_fields__ and _sets(argv, "target_validity"):
        raise SystemExit(
            f"filtered-rl train: target_validity (the β-from-μ controller) is not available for algorithm "
            f"{algorithm!r}: " + CONTROLLER_ALTERNATIVES
        )
    generations = _setting(argv, "num_generations")  # TRL's __post_init__ divides by it
    if generations is not None and _number_or_none(generations) is not None and float(generations) < 2:
        raise SystemExit(
            f"filtered-rl train: num_generations={generations}: needs at least 2 completions per prompt (a group's "
            "advantages compare them); e.g. num_generations: 8"
        )
    try:
        parsed = TrlParser(dataclasses).parse_args_and_config(args=argv)
    except (ValueError, ZeroDivisionError) as error:  # a config's __post_init__ names the field
        raise SystemExit(f"filtered-rl train: {error}") from None
    check_settings(parsed[0], parsed[1])
    return algorithm, parsed


def _setting(argv: list[str], key: str) -> Any:
    """A setting's value as given: the flag, else the (flattened) YAML config, else None."""
    value = _flag_value(argv, f"--{key}")
    if value is not None:
        return value
    config_path = _flag_value(argv, "--config")
    return _read_yaml(config_path).get(key) if config_path else None


def _number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_settings(script_args: Any, training_args: Any) -> None:
    """Refuse settings that would only fail after the model loads (or silently do nothing), naming the
    field and the fix. Runs right after parsing, before any data or model is loaded."""
    import math

    def refuse(name: str, value: Any, need: str, example: str) -> None:
        raise SystemExit(f"filtered-rl train: {name}={value} {need}; e.g. {name}: {example}")

    args = training_args
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        refuse("learning_rate", args.learning_rate, "must be a number > 0", "1.0e-6")
    for name, example in (("per_device_train_batch_size", 8), ("gradient_accumulation_steps", 1)):
        if getattr(args, name) < 1:
            refuse(name, getattr(args, name), "must be ≥ 1", example)
    if getattr(args, "max_completion_length", 1) is not None and args.max_completion_length < 1:
        refuse("max_completion_length", args.max_completion_length, "must be ≥ 1 token", 256)
    temperature = getattr(args, "temperature", 1.0)
    if not (math.isfinite(temperature) and temperature > 0):
        refuse(
            "temperature", temperature, "must be a number > 0 (training samples; 1.0 = the model itself)", 1.0
        )
    beta = getattr(args, "beta", 0.0)
    if not (math.isfinite(beta) and beta >= 0):
        refuse("beta", beta, "(the KL coefficient) must be ≥ 0", 0.04)
    save_by_steps = str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
    if save_by_steps and not (args.save_steps and args.save_steps > 0):
        refuse(
            "save_steps",
            args.save_steps,
            "must be > 0 with save_strategy: steps (use save_strategy: no to save no checkpoints)",
            100,
        )
    if args.max_steps == 0 or args.max_steps < -1:
        refuse("max_steps", args.max_steps, "must be ≥ 1 (or -1: num_train_epochs decides)", 500)
    for name in ("countdown_train_prompts", "max_train_prompts", "max_prompt_length"):
        value = getattr(script_args, name, None)
        if value is not None and value < 1:
            refuse(name, value, "must be ≥ 1 (or left out)", 256)


CONTROLLER_ALTERNATIVES = (
    "β = 1/(logit μ − logit A) gives validity μ only where the optimum is the tilted model p_β. Use "
    "grpo_klr (GRPO with the KL in the reward), rloo, or tilted (target_validity of the exact KL-control "
    "objective); TRL's grpo adds a k3 KL to the loss, whose fixed point is not p_β (docs/controller.md)"
)


def _sets(argv: list[str], key: str) -> bool:
    """Whether a flag or the (flattened) YAML config sets `key` to something other than null."""
    if _flag_value(argv, f"--{key}") is not None:
        return True
    config_path = _flag_value(argv, "--config")
    return bool(config_path) and _read_yaml(config_path).get(key) is not None


def config_class(algorithm: str) -> type:
    """The config dataclass of a registered algorithm."""
    from filtered_rl.trainers import ALGORITHMS

    return ALGORITHMS[algorithm].config_class


def check_before_loading(
    task: Any, training_args: Any, controller: Any | None, script_args: Any | None = None
) -> None:
    """Fail on settings and data that would only fail later, before any model is loaded (minutes for a real one).

    The verifier is called once on the first training row with an empty completion: a missing gold column
    raises there, naming the column, instead of at the first reward call after generation.
    """
    from filtered_rl.data import DataError, check_verifier_columns

    if controller is not None and controller.target_validity is not None and not training_args.beta > 0:
        raise SystemExit(
            f"target_validity={controller.target_validity} (the β-from-μ controller) needs beta > 0 in the config: "
            "TRL builds the reference model only then (e.g. beta: 0.04; the controller overwrites it)"
        )
    dataset = task.dataset
    if len(dataset) == 0:
        raise SystemExit(
            f"dataset {task.name!r} has no training prompts (check dataset_train_split, max_train_prompts)"
        )
    if "prompt" not in dataset.column_names:
        raise SystemExit(f"dataset {task.name!r} has no 'prompt' column (columns: {dataset.column_names})")
    try:
        check_verifier_columns(task)
    except DataError as error:
        raise SystemExit(str(error)) from None
    wanted = script_args and script_args.max_train_prompts is None and script_args.countdown_train_prompts
    if wanted and task.synthetic is not None and len(dataset) < wanted:
        raise SystemExit(
            f"countdown_train_prompts={wanted}: the synthetic task {task.name!r} has only {len(dataset)} distinct "
            f"training prompts with these options; set countdown_train_prompts: {len(dataset)} or less (or leave it "
            "out for all of them)"
        )


def list_algorithms() -> str:
    """One line per registered algorithm, for `filtered-rl train --list`."""
    from filtered_rl.trainers import ALGORITHMS

    width = max(len(name) for name in ALGORITHMS)
    return "\n".join(f"{name:<{width}}  {entry.summary}" for name, entry in ALGORITHMS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print(list_algorithms())
        return 0
    algorithm, (script_args, training_args, model_args, *controller) = parse_recipe_args(argv)
    from filtered_rl import run_dir
    from filtered_rl.data import DataError
    from filtered_rl.trainers._base import end_run

    output_dir = training_args.output_dir
    try:
        run_dir.check_model_path(model_args.model_name_or_path, "model_name_or_path")
        resume = run_dir.resolve_resume(
            training_args.resume_from_checkpoint, output_dir, log=training_args.process_index == 0
        )
        foreign = run_dir.check_train_output_dir(
            output_dir,
            resuming=resume is not None,
            overwrite=script_args.overwrite_output_dir,
            save_steps=training_args.save_steps,
            max_steps=training_args.max_steps,
            save_by_steps=str(getattr(training_args.save_strategy, "value", "")) == "steps",
            start_step=run_dir.checkpoint_step(resume),
        )
    except ValueError as error:  # ResumeError, OutputDirError, a missing model directory
        raise SystemExit(f"filtered-rl train: {error}") from None
    try:
        task = load_training_task(script_args, training_args)
    except (DataError, FileNotFoundError) as error:
        raise SystemExit(f"filtered-rl train: {error}") from None

    check_before_loading(task, training_args, controller[0] if controller else None, script_args)
    model_path = resolve_model(model_args.model_name_or_path)
    check_prompt_length_limit(task, model_path, training_args, script_args)
    if training_args.should_save:
        run_dir.claim(output_dir, [] if "README.md" in foreign else ["README.md"], kind="training run")
    trainer = make_trainer(
        algorithm, (script_args, training_args, model_args, *controller), model_path, task.dataset, task.verifier,
        foreign=set(foreign),
    )  # fmt: skip
    if "README.md" in foreign:  # TRL writes its model card to output_dir/README.md at every save
        trainer.create_model_card = lambda *args, **kwargs: None

    trainer.train(resume_from_checkpoint=resume)
    saved = _save_final_model(trainer, Path(output_dir), set(foreign))
    trainer.accelerator.print(f"model saved to {saved}")
    end_run(trainer)
    return 0


def load_training_task(script_args: Any, training_args: Any) -> Any:
    """The training prompts and verifier `filtered-rl train` uses for these settings (`load_task`)."""
    from filtered_rl.data import load_task

    return load_task(
        script_args.dataset_name,
        data_files=script_args.data_files,
        split=script_args.dataset_train_split,
        limit=script_args.max_train_prompts,
        conversational=script_args.conversational,
        system_prompt=script_args.system_prompt,
        prompt_column=script_args.prompt_column,
        verifier=script_args.verifier,
        gold_column=script_args.gold_column,
        seed=training_args.seed,
        countdown_kwargs=(
            {"num_train": script_args.countdown_train_prompts}
            if script_args.countdown_train_prompts
            else None
        ),
    )


def make_trainer(
    algorithm: str,
    parsed: tuple,
    model_path: str,
    train_dataset: Any,
    reward_funcs: Any,
    *,
    foreign: set[str] = frozenset(),
    callbacks: list[Any] = (),
) -> Any:
    """The trainer of `filtered-rl train` (also the study's, `filtered_rl.study`): the algorithm's trainer
    class on `model_path` with the parsed (script, training, model[, controller]) arguments, checkpoints
    rotated by `RunDirectoryCallback` (never `foreign` entries), the β-from-μ controller attached when set."""
    from trl import get_peft_config, get_quantization_config

    from filtered_rl.callbacks import BetaFromValidityCallback, RunDirectoryCallback
    from filtered_rl.trainers import ALGORITHMS

    script_args, training_args, model_args, *controller = parsed
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    # transformers' rotation deletes any checkpoint-N folder: RunDirectoryCallback rotates only ours.
    save_total_limit, training_args.save_total_limit = training_args.save_total_limit, None
    trainer = ALGORITHMS[algorithm].trainer_class(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=[
            RunDirectoryCallback(training_args.output_dir, set(foreign), save_total_limit),
            *callbacks,
        ],
    )
    if controller and controller[0].target_validity is not None:
        BetaFromValidityCallback(
            target_validity=controller[0].target_validity,
            closed_loop=controller[0].controller_closed_loop,
            estimator=controller[0].controller_estimator,
        ).attach(trainer)
    return trainer


def _save_final_model(trainer: Any, output_dir: Path, foreign: set[str]) -> Path:
    """`trainer.save_model` into output_dir, claiming what it wrote; with foreign entries there, through a
    staging folder so that no foreign file is replaced (`run_dir.install_final_model`)."""
    from filtered_rl import run_dir

    if not foreign:
        trainer.save_model(str(output_dir))
        if trainer.args.should_save:
            run_dir.claim(output_dir, run_dir.new_entries(output_dir, foreign))
        return output_dir
    staging = output_dir / run_dir.FINAL_STAGING
    trainer.save_model(str(staging))
    if not trainer.args.should_save:
        return output_dir
    run_dir.claim(output_dir, [staging.name])
    return run_dir.install_final_model(output_dir, staging, foreign)


def check_prompt_length_limit(task: Any, model_path: str, training_args: Any, script_args: Any) -> None:
    """Refuse prompts longer than `max_prompt_length` tokens (default: the model's context length minus
    max_completion_length) before the model loads: such a prompt makes generation hang or run out of memory."""
    from filtered_rl.data import DataError, check_prompt_lengths, prompt_length_limit, prompt_token_lengths

    limit = prompt_length_limit(
        model_path, training_args.max_completion_length, script_args.max_prompt_length
    )
    if limit is None:
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return  # TRL reports it when it loads the model
    dataset = task.dataset
    ids = (
        dataset["prompt_id"]
        if "prompt_id" in dataset.column_names
        else [f"row {i}" for i in range(len(dataset))]
    )
    setting = (
        f"max_prompt_length={script_args.max_prompt_length}"
        if script_args.max_prompt_length is not None
        else f"the model's context length minus max_completion_length={training_args.max_completion_length} "
        "(set max_prompt_length to change it)"
    )
    try:
        check_prompt_lengths(
            prompt_token_lengths(dataset["prompt"], tokenizer),
            ids,
            limit,
            setting=setting,
            source=f"dataset {task.name!r}",
        )
    except DataError as error:
        raise SystemExit(f"filtered-rl train: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
