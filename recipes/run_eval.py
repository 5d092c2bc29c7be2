"""Evaluation recipe: `filtered-rl eval` with an optional YAML config (flags override it).

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/run_eval.py \
        --config recipes/configs/eval/gsm8k.yaml --model runs/gsm8k-qwen2.5-0.5b-lora

YAML keys are the flags' names without the dashes (`num_samples: 64` or `num-samples: 64`); lists
become repeated values (`k: [1, 8, 64]`), booleans become `--flag` / `--no-flag`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def yaml_to_flags(config: dict) -> list[str]:
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        config = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
        argv = yaml_to_flags(config) + argv[:i] + argv[i + 2 :]  # flags given after the YAML win
    from filtered_rl.cli import main as cli_main

    return cli_main(["eval", *argv])


if __name__ == "__main__":
    sys.exit(main())
