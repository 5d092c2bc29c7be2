"""`filtered-rl study`: the side-by-side study on any model and task.

    filtered-rl study --model filtered-rl:nano --task countdown --config arms.yaml --seeds 0 1 --jobs 2
    filtered-rl study --model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k --data-files data/gsm8k --config arms.yaml
    filtered-rl study --preset countdown-hard-cpu --seeds 0 1 2      # a synthetic preset as the study config
    filtered-rl study --config arms.yaml --report-only --compare filtered-divergence-forward-kl:grpo-beta-0

Every arm trains from the model through `filtered-rl train`'s code path (`filtered_rl.study.runner`) for the
same steps on the same prompts and seeds, and is evaluated on held-out prompts: pass@k for every k ≤ n,
distinct valid answers, answer entropy among valid samples, distinct answers among m valid samples, and
the exact metrics where the task enumerates its valid answers. `study.md` compares the method families at
matched pass@1 with paired bootstrap standard errors (`filtered_rl.study.report`).

Before any model loads, the study YAML, the arms (their algorithms and every setting, by `filtered-rl
train`'s parser), the `--compare` names, the model and the task are checked; a refusal names the choices.
Resumable: a finished arm or evaluation is reused, a killed arm resumes from its newest complete checkpoint.
`--jobs N` runs the seeds as N parallel processes into one output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from filtered_rl.study.config import StudyConfigError
from filtered_rl.study.runner import StudyError
from filtered_rl.study.spec import StudyConfig, slug

RESOLVED_CONFIG = "study_config.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="a study YAML: arms (and sizes, model, task, settings)"
    )
    parser.add_argument("--model", default=None, help="base model: hub id, directory or filtered-rl:<name>")
    parser.add_argument(
        "--task", default=None, help="gsm8k, math500, humaneval, mbpp, a synthetic task, a dataset"
    )
    parser.add_argument("--preset", default=None, help="a synthetic preset as the study config (frontier's)")
    parser.add_argument("--data-files", default=None, help="local copy of the task's files (no hub)")
    parser.add_argument("--verifier", default=None, help="verifier of a custom dataset: math | code | a task")
    parser.add_argument("--prompt-column", default=None, help="prompt column of a custom dataset")
    parser.add_argument("--gold-column", default=None, help="gold answer/tests column of a custom dataset")
    for flag, kind, text in (
        ("--steps", int, "training steps of every arm"),
        ("--train-prompts", int, "training prompts"),
        ("--eval-prompts", int, "held-out prompts"),
        ("--eval-samples", int, "samples per held-out prompt (n: pass@k for every k ≤ n)"),
        ("--num-generations", int, "completions per prompt in training (the group)"),
        ("--batch-size", int, "completions per training step (per device)"),
        ("--learning-rate", float, "learning rate of every arm"),
        ("--max-completion-length", int, "tokens per completion (training and evaluation)"),
        ("--distinct-m", int, "m of 'distinct answers among m valid samples' (default 4)"),
    ):
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key for every arm (repeatable)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default: the YAML's, else 0)"
    )
    parser.add_argument("--output-dir", default="runs/study", help="runs, evaluations, study.md, figures")
    parser.add_argument("--jobs", type=int, default=1, help="seeds as this many parallel processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: summarise the arms finished in --output-dir",
    )
    parser.add_argument(
        "--compare", action="append", default=[], metavar="A:B",
        help="arm A − arm B in every metric ± paired bootstrap SE (arm names, their directory names, or base)",
    )  # fmt: skip
    parser.add_argument("--resolved-config", default=None, help=argparse.SUPPRESS)  # a --jobs worker
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)


def _setting(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StudyConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set beta=0.04")
    return key.strip(), yaml.safe_load(value)


def load_study(args: argparse.Namespace) -> tuple[StudyConfig, list[int]]:
    """The study's config and seeds from --preset, --config and the flags (later win); names checked."""
    from filtered_rl.study.config import build_config, read_yaml

    base = None
    if args.preset:
        from filtered_rl.synthetic.frontier import PRESETS

        if args.preset not in PRESETS:
            raise StudyConfigError(f"--preset {args.preset!r}: choose from {', '.join(sorted(PRESETS))}")
        base = PRESETS[args.preset]
    if not args.config and base is None:
        raise StudyConfigError(
            "give --config ARMS.yaml (arms: {grpo: {beta: [0, 0.2]}, filtered: {}}) or --preset"
        )
    data = read_yaml(args.config) if args.config else {}
    overrides = {
        "model": args.model, "task": args.task, "data_files": args.data_files, "verifier": args.verifier,
        "prompt_column": args.prompt_column, "gold_column": args.gold_column, "steps": args.steps,
        "train_prompts": args.train_prompts, "eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
        "num_generations": args.num_generations, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "max_completion_length": args.max_completion_length, "distinct_m": args.distinct_m,
        "settings": dict(_setting(text) for text in args.set),
    }  # fmt: skip
    config = build_config(data, base, overrides)
    if args.task is None and "task" not in data and base is None:
        raise StudyConfigError(
            "no task: give --task (gsm8k, math500, humaneval, mbpp, a synthetic task, a dataset)"
        )
    config = _task_defaults(config, explicit="max_completion_length" in data or args.max_completion_length)
    seeds = args.seeds or data.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise StudyConfigError(f"seeds: expected integers, got {seeds!r}")
    return config, [int(s) for s in seeds]


def _task_defaults(config: StudyConfig, explicit: Any) -> StudyConfig:
    """Completions long enough for a synthetic task (its own length), 256 tokens for any other, unless set."""
    from filtered_rl.data import synthetic_task

    task = synthetic_task(config.task)
    if task is not None:
        return replace(
            config, max_completion_length=max(config.max_completion_length, task.max_completion_length)
        )
    return config if explicit else replace(config, max_completion_length=256)


def compare_pairs(config: StudyConfig, compare: list[str]) -> list[tuple[str, str]]:
    """`--compare A:B` as run names (the report's base name for `base`); a name outside the arms is refused."""
    from filtered_rl.study.report import BASE

    by_name = {
        **{spec.name: spec.name for spec in config.runs},
        **{slug(s.name): s.name for s in config.runs},
    }
    out = []
    for text in compare:
        parts = [p.strip() for p in text.split(":")]
        if len(parts) != 2 or not all(parts):
            raise StudyConfigError(
                f"--compare {text!r}: expected A:B, two arm names, e.g. {slug(config.runs[0].name)}:base"
            )
        for arm in parts:
            if arm != "base" and arm not in by_name:
                choices = ", ".join(["base", *(slug(s.name) for s in config.runs)])
                raise StudyConfigError(
                    f"--compare {text}: {arm!r} is not an arm of this study; choose from {choices}"
                )
        out.append(tuple(BASE if arm == "base" else by_name[arm] for arm in parts))
    return out


def check_model(name: str | None) -> None:
    """Refuse a model that cannot load here, before anything loads: an unknown filtered-rl:<name>, a
    directory without config.json, a hub id with the hub offline and no cached copy."""
    from filtered_rl import run_dir
    from filtered_rl.models import NAMED_MODELS, OWN_MODEL_PREFIX, is_named_model, model_names

    if name is None:
        return
    if is_named_model(name):
        if name[len(OWN_MODEL_PREFIX) :] not in NAMED_MODELS:
            known = ", ".join(OWN_MODEL_PREFIX + n for n in model_names())
            raise StudyError(f"--model {name!r}: unknown; the named models are {known}")
        return
    try:
        run_dir.check_model_path(name, "--model")
    except ValueError as error:
        raise StudyError(str(error)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StudyError(f"--model {name!r}: a directory without config.json, not a model")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise StudyError(
            f"--model {name!r}: a hub id, but the hub is offline here (HF_HUB_OFFLINE=1) and the hub cache has no "
            f"copy of it; download it where the hub is reachable (`huggingface-cli download {name}`) or give a "
            "model directory, e.g. --model filtered-rl:smollm2-135m or --model path/to/model"
        )


def check_task(config: StudyConfig) -> None:
    """Load the training and held-out prompts once (no model): an unknown task, a missing local file, an
    unreachable hub or a bad column is refused here; an exact-only arm on a task without an enumerable
    valid set too."""
    from filtered_rl.evaluation.runner import load_config_task
    from filtered_rl.study.runner import enumerated_answers, eval_config, train_task

    try:
        train = train_task(config, 0)
        held_out = load_config_task(eval_config("model", "model", Path("."), config, 0))
    except Exception as error:  # noqa: BLE001 — whatever the data layer raises, said in one line
        hint = (
            ""
            if config.data_files
            else "; with no hub, give --data-files with a local copy of the task's files"
        )
        raise StudyError(f"--task {config.task!r}: {type(error).__name__}: {error}{hint}") from None
    for name, task in (("training", train), ("held-out", held_out)):
        if len(task.dataset) == 0:
            raise StudyError(f"--task {config.task!r}: no {name} prompts")
    distilled = [spec.name for spec in config.runs if spec.algorithm == "pstar_distill"]
    if distilled and enumerated_answers(train) is None:
        raise StudyError(
            f"arms {distilled} distil p* exactly and need every training prompt's valid answers; task "
            f"{config.task!r} cannot enumerate them (drop these arms)"
        )


def check_arms(config: StudyConfig) -> None:
    """Every arm's `filtered-rl train` config through its parser and checks (no data, no model)."""
    from filtered_rl.study.runner import arm_train_config, parse_arm

    with tempfile.TemporaryDirectory(prefix="filtered-rl-study-") as folder:
        for spec in config.runs:
            if spec.algorithm == "pstar_distill":
                continue
            options = dict(spec.options)
            if spec.algorithm in ("dph", "filtered_pstar", "rft"):
                options.setdefault("rehearsal_path", folder)  # drawn later; its path only has to parse
            arm = replace(spec, options=options)
            model = config.model or "filtered-rl:nano"
            parse_arm(
                arm_train_config(arm, model, Path(folder) / "run", config, 0),
                Path(folder) / "a.yaml",
                spec.name,
            )


def resolve_base(config: StudyConfig) -> str:
    """The base model's directory (a named model materialised, the synthetic task's own pretrained), or the
    hub id as given."""
    from filtered_rl.models import resolve_model

    if config.model is not None:
        return resolve_model(config.model)
    from filtered_rl.synthetic.base_model import load_or_pretrain

    return str(load_or_pretrain(size=config.base_size, seed=0, task=config.task, steps=config.base_steps))


def preamble(config: StudyConfig) -> list[str]:
    settings = ", ".join(f"{k}={v}" for k, v in config.settings.items()) or "none"
    lines = [
        f"Model: `{config.model or f'the {config.base_size} base model of {config.task}'}`. Task: `{config.task}` "
        f"({config.train_prompts} training prompts; {config.eval_prompts} held-out prompts of split "
        f"`{config.eval_split}` × {config.eval_samples} samples). {config.steps} steps per arm, "
        f"{config.num_generations} completions per prompt, {config.batch_size} per step, learning rate "
        f"{config.learning_rate:g}; settings for every arm: {settings}.",
        "| arm | algorithm | family | settings |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {s.name} | {s.algorithm} | {s.family_name} | "
            + (", ".join(f"{k}={v}" for k, v in s.options.items() if k != "rehearsal_path") or "–")
            + (f", target_validity={s.target_validity}" if s.target_validity is not None else "")
            + " |"
            for s in config.runs
        ),
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (StudyError, StudyConfigError) as error:
        print(f"filtered-rl study: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from filtered_rl.study.config import from_dict, to_dict

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    if args.jobs < 1:
        raise StudyConfigError(f"--jobs {args.jobs}: must be ≥ 1")
    if args.resolved_config:  # a --jobs worker: the parent checked everything and resolved the model
        config = from_dict(json.loads(Path(args.resolved_config).read_text()))
        _threads(args.threads)
        for seed in args.seeds:
            _seed_rows(config, config.model, output_dir, seed, False)
        return 0
    config, seeds = load_study(args)
    compare = compare_pairs(config, args.compare)
    check_model(config.model)
    check_task(config)
    check_arms(config)
    _threads(args.threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_base(config)
    resolved = replace(config, model=base)
    if args.jobs > 1 and len(seeds) > 1 and not args.report_only:
        _run_workers(resolved, seeds, output_dir, args)
    rows = []
    for seed in seeds:
        rows += _seed_rows(
            resolved, base, output_dir, seed, args.report_only or args.jobs > 1 and len(seeds) > 1
        )
    from filtered_rl.study.runner import write_results
    from filtered_rl.study.tables import aggregate, format_table

    (output_dir / RESOLVED_CONFIG).write_text(json.dumps(to_dict(resolved), indent=1, default=str))
    if not args.no_report:
        write_results(
            resolved, output_dir, rows, seeds, compare=compare, sampled=True, preamble=preamble(config)
        )
    print(format_table(aggregate(rows)))
    print(
        f"\nwrote {output_dir}/study.md, results.md and figures in {(time.perf_counter() - start) / 60:.1f} min"
    )
    return 0


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _seed_rows(config: StudyConfig, base: str, output_dir: Path, seed: int, report_only: bool) -> list[dict]:
    from filtered_rl.study.runner import run_seed

    return run_seed(config, base, output_dir, seed, report_only=report_only, sampled=True)


def _run_workers(config: StudyConfig, seeds: list[int], output_dir: Path, args: argparse.Namespace) -> None:
    """Each seed in a process of its own, `args.jobs` at a time; a failed one is named with its log."""
    from filtered_rl.study.config import to_dict

    resolved = output_dir / RESOLVED_CONFIG
    resolved.write_text(json.dumps(to_dict(config), indent=1, default=str))
    logs = output_dir / "logs"
    logs.mkdir(exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running, failed = list(seeds), [], []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            log = (logs / f"seed{seed}.log").open("a")
            command = [sys.executable, "-m", "filtered_rl.cli", "study", "--resolved-config", str(resolved),
                       "--output-dir", str(output_dir), "--seeds", str(seed), "--threads", str(threads)]  # fmt: skip
            print(f"seed {seed}: a worker process (log: {log.name})", flush=True)
            running.append(
                (seed, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
            )
        time.sleep(0.5)
        for item in list(running):
            seed, log, process = item
            if process.poll() is not None:
                running.remove(item)
                log.close()
                if process.returncode != 0:
                    failed.append(f"seed {seed} (exit {process.returncode}, log {log.name})")
    if failed:
        raise StudyError("worker processes failed: " + "; ".join(failed))
