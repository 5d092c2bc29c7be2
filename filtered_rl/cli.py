"""`filtered-rl` console script.

Each subcommand lives in its own module, imported only when that subcommand runs (so
`filtered-rl --help` does not import torch). A subcommand module defines
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int | None`,
or (when it parses its own flags, as `train` does with TrlParser) `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "filtered_rl.synthetic.base_model",
        "build the tokenizer and pretrain the synthetic-task base model",
    ),
    "finetune": (
        "filtered_rl.models.task_sft",
        "fine-tune a real model (SmolLM2) on a synthetic task into a study base; its exact metrics",
    ),
    "sample": (
        "filtered_rl.synthetic.report",
        "sample a model on the synthetic task; print validity/diversity",
    ),
    "train": (
        "filtered_rl.train",
        "train with any registered algorithm from a recipe YAML (TrlParser flags)",
    ),
    "rehearsal-sample": (
        "filtered_rl.rehearsal",
        "sample the base model offline for DPH-RL rehearsal (resumable, sharded under accelerate)",
    ),
    "eval": ("filtered_rl.evaluation.cli", "pass@1/pass@k, coverage and diversity of a model on a dataset"),
    "plot": ("filtered_rl.evaluation.plots", "plot pass@k curves from one or more summary files"),
    "toy": ("filtered_rl.synthetic.toy", "the exact enumerable toy: KL-control vs filtered objectives"),
    "frontier": ("filtered_rl.synthetic.frontier", "GRPO+KL vs filtered objectives on the base model"),
    "study": (
        "filtered_rl.study.cli",
        "the side-by-side study on any model and task: arms from a YAML, frontiers, paired SEs",
    ),
    "quickstart": (
        "filtered_rl.synthetic.quickstart",
        "pretrain, train GRPO+KL and the filtered objective, evaluate",
    ),
}


def _top_level_help() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: filtered-rl <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "`filtered-rl <subcommand> --help` lists a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_top_level_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"filtered-rl: unknown subcommand {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if not hasattr(module, "add_arguments"):  # parses its own flags (train: TrlParser + YAML)
        return int(module.main(rest) or 0)
    parser = argparse.ArgumentParser(prog=f"filtered-rl {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    code = module.run(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
