"""One training recipe for every algorithm the project compares, driven by a YAML config.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/train.py \
        --config recipes/configs/gsm8k-qwen2.5-0.5b-lora.yaml

`algorithm` (YAML key or `--algorithm`) picks the trainer and hence the config dataclass:
- `grpo`: TRL's GRPOTrainer, KL in the loss (`beta`), optionally with the β-from-μ controller;
- `rloo`: TRL's RLOOTrainer, KL folded into the reward (PPO-style), optionally with the controller;
- `filtered`: FilteredGRPOTrainer, any divergence toward the filtered (or tilted) model.
Setting `target_validity` (μ) turns the controller on for grpo/rloo. Flags override the YAML.
`model_name_or_path: filtered-rl:nano` (or `:small`) builds/loads the project's own base model.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALGORITHMS = ("grpo", "rloo", "filtered")
OWN_MODEL_PREFIX = "filtered-rl:"


@dataclass
class ScriptArguments:
    """What to train on and how to score it (the trainer's own options live in its config)."""

    algorithm: str = field(default="grpo", metadata={"help": "grpo | rloo | filtered"})
    dataset_name: str = field(
        default="countdown",
        metadata={"help": "countdown | gsm8k | math500 | humaneval | mbpp, or any hub/local dataset"},
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
    verifier: str | None = field(default=None, metadata={"help": "math | code | countdown (custom datasets)"})
    gold_column: str | None = field(default=None, metadata={"help": "column holding the gold answer/tests"})
    system_prompt: str | None = field(
        default="auto",
        metadata={"help": "'auto' (boxed answer for math, code block for code), text, or null"},
    )
    conversational: bool | None = field(
        default=None,
        metadata={"help": "chat-formatted prompts (default: true for math/code, false for countdown)"},
    )
    countdown_train_prompts: int = field(
        default=2000, metadata={"help": "generated countdown training prompts"}
    )


@dataclass
class ControllerArguments:
    """grpo/rloo only: the β-from-μ controller (FilteredGRPOConfig has its own `target_validity`)."""

    target_validity: float | None = field(
        default=None,
        metadata={
            "help": "μ: set the KL coefficient each step so that KL-control's optimum has this validity "
            "(the config's beta must be > 0); unset: fixed beta"
        },
    )
    controller_closed_loop: bool = field(default=False, metadata={"help": "add the bounded PI correction"})
    controller_estimator: str = field(default="importance", metadata={"help": "importance | policy | column"})


def resolve_config(argv: list[str]) -> tuple[str, list[str]]:
    """Pick the algorithm and flatten its YAML section; returns (algorithm, argv for TrlParser).

    A YAML config may hold sections named after the algorithms (`grpo:`, `rloo:`, `filtered:`); the
    section of the chosen algorithm is merged into the top level (section keys win) and the others are
    dropped, so that one file serves every algorithm. `--algorithm` on the command line beats the
    YAML's `algorithm`; other flags beat the YAML as usual.
    """
    argv = list(argv)
    algorithm = _flag_value(argv, "--algorithm")
    config_path = _flag_value(argv, "--config")
    config = yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {}
    algorithm = algorithm or config.get("algorithm") or "grpo"
    if algorithm not in ALGORITHMS:
        raise SystemExit(
            f"algorithm={algorithm!r} is not supported; choose one of {ALGORITHMS} (YAML key `algorithm`)"
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
    """Hub name or path as given; `filtered-rl:<size>` builds (once, cached) the project's base model."""
    if not name_or_path.startswith(OWN_MODEL_PREFIX):
        return name_or_path
    from filtered_rl.synthetic.base_model import load_or_pretrain

    return str(load_or_pretrain(size=name_or_path[len(OWN_MODEL_PREFIX) :], seed=0))


def parse_recipe_args(argv: list[str]) -> tuple[str, tuple]:
    """(algorithm, (script_args, training_args, model_args[, controller_args])) from flags + YAML."""
    algorithm, argv = resolve_config(argv)
    from trl import ModelConfig, TrlParser

    dataclasses = (ScriptArguments, config_class(algorithm), ModelConfig)
    if algorithm != "filtered":
        dataclasses += (ControllerArguments,)
    return algorithm, TrlParser(dataclasses).parse_args_and_config(args=argv)


def config_class(algorithm: str) -> type:
    from trl import GRPOConfig, RLOOConfig

    from filtered_rl.trainer import FilteredGRPOConfig

    return {"grpo": GRPOConfig, "rloo": RLOOConfig, "filtered": FilteredGRPOConfig}[algorithm]


def main(argv: list[str] | None = None) -> None:
    algorithm, (script_args, training_args, model_args, *controller) = parse_recipe_args(
        list(sys.argv[1:] if argv is None else argv)
    )
    from trl import GRPOTrainer, RLOOTrainer, get_peft_config, get_quantization_config

    from filtered_rl.callbacks import BetaFromValidityCallback
    from filtered_rl.data import load_task
    from filtered_rl.trainer import FilteredGRPOTrainer, end_run

    trainer_class = {"grpo": GRPOTrainer, "rloo": RLOOTrainer, "filtered": FilteredGRPOTrainer}[algorithm]
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


if __name__ == "__main__":
    main()
