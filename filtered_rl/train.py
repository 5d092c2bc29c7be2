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
    countdown_train_prompts: int = field(
        default=2000, metadata={"help": "generated countdown training prompts"}
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
    """(algorithm, (script_args, training_args, model_args[, controller_args])) from flags + YAML."""
    algorithm, argv = resolve_config(argv)
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
    try:
        return algorithm, TrlParser(dataclasses).parse_args_and_config(args=argv)
    except ValueError as error:  # a config's __post_init__ names the field
        raise SystemExit(f"filtered-rl train: {error}") from None


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


def check_before_loading(task: Any, training_args: Any, controller: Any | None) -> None:
    """Fail on settings and data that would only fail later, before any model is loaded (minutes for a real one).

    The verifier is called once on the first training row with an empty completion: a missing gold column
    raises there, naming the column, instead of at the first reward call after generation.
    """
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
    row = dataset[0]
    columns = {key: [value] for key, value in row.items() if key != "prompt"}
    try:
        task.verifier(prompts=[row["prompt"]], completions=[""], completion_ids=[[]], **columns)
    except KeyError as error:
        raise SystemExit(
            f"dataset {task.name!r} lacks a column its verifier reads: {error.args[0] if error.args else error} "
            f"(columns: {dataset.column_names}); set gold_column / prompt_column, or pick the matching verifier"
        ) from None


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
    from trl import get_peft_config, get_quantization_config

    from filtered_rl.callbacks import BetaFromValidityCallback
    from filtered_rl.data import load_task
    from filtered_rl.trainers import ALGORITHMS
    from filtered_rl.trainers._base import end_run

    trainer_class = ALGORITHMS[algorithm].trainer_class
    task = load_task(
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
        countdown_kwargs={"num_train": script_args.countdown_train_prompts},
    )

    check_before_loading(task, training_args, controller[0] if controller else None)
    model_path = resolve_model(model_args.model_name_or_path)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = trainer_class(
        model=model_path,
        reward_funcs=task.verifier,
        args=training_args,
        train_dataset=task.dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if controller and controller[0].target_validity is not None:
        BetaFromValidityCallback(
            target_validity=controller[0].target_validity,
            closed_loop=controller[0].controller_closed_loop,
            estimator=controller[0].controller_estimator,
        ).attach(trainer)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"model saved to {training_args.output_dir}")
    end_run(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
