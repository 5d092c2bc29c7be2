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
family's frontier and the families compared at matched pass@1 (`filtered_rl.study.report`).

This module holds the synthetic presets (study configs: `Preset` is `filtered_rl.study.StudyConfig`) and
their arms; the machinery (training an arm, the sampled and exact evaluations, the tables, the report)
is the product's study (`filtered_rl.study`, `filtered-rl study`), imported here under its old names.
Runs are resumable: a finished training run (its `final/` model) or evaluation (`summary.json`) is
reused, a killed one restarts from its last checkpoint / last finished prompt batch.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

from filtered_rl.study.runner import (  # noqa: F401  (the frontier's names before the study moved)
    EXACT_FILE,
    EXACT_TRAIN_FILE,
    REHEARSAL_ALGORITHMS,
    distill_run,
    enumerated_answers,
    evaluate_model,
    exact_base_validity,
    exact_curve_callback,
    exact_metrics,
    exact_train_metrics,
    run_seed,
    train_run,
    train_task,
    write_results,
)
from filtered_rl.study.runner import prepare_rehearsal as _prepare_rehearsal
from filtered_rl.study.spec import RunSpec, slug
from filtered_rl.study.spec import StudyConfig as Preset
from filtered_rl.study.tables import aggregate, format_table, plot_frontier, row_from_summary  # noqa: F401

# Method families: the runs whose points make one frontier in the study (filtered_rl.study.report).
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
GRPO_BETA_005 = RunSpec("grpo β=0.05", "grpo", {"beta": 0.05}, family=KL_GRPO)
REMEDIES_2025 = (
    RunSpec("nsr", "nsr", family="NSR / W-REINFORCE"),  # λ = 0: push down invalid samples only
    RunSpec("w-reinforce λ=0.1", "nsr", {"nsr_positive_weight": 0.1}, family="NSR / W-REINFORCE"),
    RunSpec("f-grpo γ=1", "f_grpo", family="F-GRPO"),
    RunSpec("f-grpo γ=2", "f_grpo", {"f_grpo_gamma": 2.0}, family="F-GRPO"),
    RunSpec("rs-grpo β=2", "rs_grpo", family="RS-GRPO"),
    RunSpec("rs-grpo β=8", "rs_grpo", {"rs_grpo_beta": 8.0}, family="RS-GRPO"),  # nearer max reward
    RunSpec("pkpo k=4", "pkpo", family="PKPO"),
    RunSpec("pkpo k=4→1", "pkpo", {"pkpo_k_end": 1}, family="PKPO"),  # the paper's anneal, at half the run
    RunSpec("clip-cov r=2e-4", "clip_cov", family="Clip-Cov"),
    # At ≈ 8 tokens a completion, a 32-completion micro-batch has ≈ 256 tokens: 2e-4 (and 2e-3) pick the minimum,
    # one token; 2e-2 picks ≈ 5.
    RunSpec("clip-cov r=2e-2", "clip_cov", {"clip_cov_ratio": 2e-2}, family="Clip-Cov"),
    # KL-Cov's penalty |log π − log π_old| is zero on-policy: 4 optimizer steps a generation batch, as RAFT++'s.
    RunSpec("kl-cov r=2e-4", "kl_cov", {"steps_per_generation": 4}, family="KL-Cov"),
    RunSpec("kl-cov r=2e-2", "kl_cov", {"steps_per_generation": 4, "kl_cov_ratio": 2e-2}, family="KL-Cov"),
    RunSpec("sage branch", "sage", family="SAGE"),  # β = 0.05, the authors'
    RunSpec("sage token", "sage", {"sage_guide": "token"}, family="SAGE"),
)
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
    # The 2025-26 remedies (issue 25), each at its authors' default and one other setting of its own knob, with
    # the GRPO arms' budget (one optimizer step a generation batch) unless the method needs otherwise, and the
    # authors' KL (none but SAGE's β = 0.05, whose control is GRPO at that β with the anchor unshaped).
    *REMEDIES_2025, GRPO_BETA_005,
)  # fmt: skip

COUNTDOWN_HARD_ARMS = (
    "grpo β=0", "grpo β=0.2", "rloo μ=0.8", "tilted reverse KL μ=0.8", "filtered forward KL", "filtered α=0.5",
    "filtered forward KL, exact A(x)", "mara β=0.1", "filtered forward KL + p* samples",
    "filtered forward KL + p* samples c=0.3", "filtered forward KL + p* samples c=3", "p* distilled",
    "p* distilled, 10x steps", "unlikeliness c=0.25", "pass@k training k=4", "inverse success α=1", "dph forward KL",
    "rft k=8", "rft k=32", "raft++", "reinforce-rej", *(arm.name for arm in REMEDIES_2025),
    GRPO_BETA_005.name,
)  # fmt: skip

COUNTDOWN_HARD_LONG_ARMS = (
    "grpo β=0",
    "grpo β=0.2",
    "filtered forward KL, exact A(x)",
    "filtered forward KL + p* samples",
)

# The capacity check (docs/results.md §4f): the plateau arms and the representability check on one size, run at
# nano and at a larger size (`--size micro`) with everything else the same. The exact curve shows whether an arm
# has plateaued. 300 steps (§4a's budget), not §4c's 1,200, so that both sizes fit a shared 2-core CPU in about an
# hour; at nano the RL arms are then the countdown-hard-cpu preset's, run for run.
COUNTDOWN_HARD_CAPACITY_ARMS = (
    "p* distilled",
    "filtered forward KL + p* samples",
    "grpo β=0.2",
    "grpo β=0",
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
    # Does the filtered plateau rise with capacity? The same arms at each size: `--size nano`, `--size micro`.
    "countdown-hard-capacity": replace(_CPU, runs=tuple(next(a for a in STUDY_ARMS if a.name == name)
                                                        for name in COUNTDOWN_HARD_CAPACITY_ARMS),
                                       task="countdown_hard", max_completion_length=32, base_steps=2400, steps=300,
                                       curve_points=5),
    # The same to §4c's 1,200 steps, where the nano filtered arms had plateaued (run here: the p*-samples arm).
    "countdown-hard-capacity-long": replace(_CPU, runs=tuple(next(a for a in STUDY_ARMS if a.name == name)
                                                             for name in COUNTDOWN_HARD_CAPACITY_ARMS),
                                            task="countdown_hard", max_completion_length=32, base_steps=2400,
                                            steps=1200, curve_points=6),
    "gpu": Preset("small", SWEEP, steps=200, train_prompts=20000, num_generations=16, batch_size=256,
                  learning_rate=5e-5, eval_prompts=200, eval_samples=64, max_completion_length=32),
}  # fmt: skip


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


def select_size(preset: Preset, size: str | None) -> Preset:
    """The preset on another size of the task's base model (None keeps its own), pretrained with that size's
    recipe for the preset's `base_steps`; an unknown size lists the known ones."""
    if size is None:
        return preset
    from filtered_rl.synthetic.base_model import SIZES

    if size not in SIZES:
        raise ValueError(f"--size {size}: unknown; choose from {', '.join(sorted(SIZES))}")
    return replace(preset, base_size=size)


def prepare_rehearsal(
    spec: RunSpec, base_model: Path, output_dir: Path, preset: Preset, seed: int
) -> RunSpec:
    """`dph`/`filtered_pstar`/`rft` runs: draw (once, resumably) the base model's samples of the training
    prompts; else unchanged (`filtered_rl.study.runner.prepare_rehearsal`)."""
    if spec.algorithm not in REHEARSAL_ALGORITHMS or "rehearsal_path" in spec.options:
        return spec
    prompts = len(train_task(preset, seed).dataset)  # the training prompts (a task's pool may be smaller)
    return _prepare_rehearsal(spec, base_model, output_dir, preset, seed, prompts)


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
    size: str | None = None,
) -> list[dict]:
    """Pretrain (cached) the base model, train every run for every seed, evaluate all; write results.

    `report_only` trains nothing: the runs already finished under `output_dir` are evaluated (if not yet)
    and summarised, the others left out, e.g. to read a study while its seeds still run elsewhere.

    `preset` is a name in PRESETS or a Preset; `base_model` overrides the preset's pretrained base; `arms`
    (names in ARMS) replaces the preset's runs, keeping its sizes; `task` (a registered synthetic task)
    replaces the preset's task, with completions long enough for it; `size` (a name in
    `filtered_rl.synthetic.base_model.SIZES`) the size of its base model. `compare` lists (A, B) pairs of
    names in ARMS (or "base") whose paired differences `study.md` tables; both must be runs of the preset.
    """
    import torch

    from filtered_rl.synthetic.base_model import load_or_pretrain

    if threads:
        torch.set_num_threads(threads)
    preset = select_task(select_arms(PRESETS[preset] if isinstance(preset, str) else preset, arms), task)
    preset = select_size(preset, size)
    compare_names = compared_runs(preset, compare)  # before anything is trained or loaded
    output_dir.mkdir(parents=True, exist_ok=True)
    base = base_model or load_or_pretrain(
        size=preset.base_size, seed=0, task=preset.task, steps=preset.base_steps
    )
    rows = []
    for seed in seeds:
        rows += run_seed(
            preset, base, output_dir, seed, report_only=report_only,
            prepare=lambda spec, s: prepare_rehearsal(spec, base, output_dir, preset, s),
        )  # fmt: skip
    write_results(preset, output_dir, rows, seeds, reference=KL_GRPO, compare=compare_names)
    return rows


def compared_runs(preset: Preset, compare: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`--compare` pairs as run names (the study's BASE for "base"); an arm outside the preset fails, naming it."""
    from filtered_rl.study.report import BASE

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
    from filtered_rl.synthetic.base_model import SIZES

    parser.add_argument(
        "--size",
        default=None,
        choices=sorted(SIZES),
        help="size of the task's base model (a filtered-rl pretrain --size: nano, micro, small; default: the "
        "preset's, nano), pretrained with that size's recipe for the preset's steps and cached",
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
        size=getattr(args, "size", None),
    )
    print(format_table(aggregate(rows)))
    print(
        f"\nwrote {args.output_dir}/results.md, passk.png, frontier.png in {(time.perf_counter() - start) / 60:.1f} min"
    )
    return 0 if all(math.isfinite(r["validity"]) for r in rows) else 1
