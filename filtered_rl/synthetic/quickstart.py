"""`filtered-rl quickstart`: the whole story on a laptop CPU, in minutes, with no network.

1. pretrain (or load from the cache) the nano countdown base model and show its validity spread on
   held-out prompts (validity, distinct valid answers per prompt, histogram of per-prompt validity);
2. train TRL's GRPO with a small KL coefficient and FilteredGRPOTrainer (forward KL toward the
   filtered model) from it, with the same budget and seed;
3. evaluate the base model and both runs: pass@k for k up to n, distinct valid answers, coverage of
   the filtered model's support, KL(p*‖π); print the table and write the pass@k and
   coverage–precision plots.

Everything lands in `--output-dir` and is resumable (the frontier driver reuses finished runs). The
console shows one progress bar per phase and the numbers that matter; library logging and
dependency warnings go to `<output-dir>/library.log` instead (`filtered_rl.synthetic.console`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", default="runs/quickstart", help="where reports go (default: runs/quickstart)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts for the base report")
    parser.add_argument("--num-samples", type=int, default=32, help="samples per prompt (temperature 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, fastest here)")
    parser.add_argument("--skip-training", action="store_true", help="only the base-model report (step 1)")


def run(args: argparse.Namespace) -> int:
    import torch

    from filtered_rl.synthetic.console import quiet_libraries

    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries(output_dir / "library.log"):
        return _run(args, output_dir)


def _run(args: argparse.Namespace, output_dir: Path) -> int:
    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.frontier import PRESETS, aggregate, format_table, run_frontier
    from filtered_rl.synthetic.report import format_report, validity_report
    from filtered_rl.synthetic.tasks import get_task

    task = get_task("countdown")
    started = time.time()
    print("[1] base model: nano, pretrained on the countdown train split (cached after the first run)")
    model_dir = load_or_pretrain("nano", seed=0, task=task.name)
    print(f"    {model_dir}  ({time.time() - started:.0f} s)")
    print(f"    sampling {args.num_samples} completions for each of {args.num_prompts} held-out prompts")
    test = task.make_dataset(0, args.num_prompts, seed=args.seed)["test"]
    report = validity_report(
        model_dir, test, num_samples=args.num_samples, task=task, seed=args.seed, progress=True
    )
    print(format_report(report, max_rows=12))
    (output_dir / "base_validity.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.skip_training:
        print(f"\nreport: {output_dir / 'base_validity.json'}   total time: {time.time() - started:.0f} s")
        return 0

    preset = PRESETS["quick"]
    print(
        f"\n[2] training from the base model, {preset.steps} steps each, same prompts and seed: "
        + ", ".join(spec.name for spec in preset.runs)
    )
    print(
        f"[3] evaluating base and trained models: {preset.eval_prompts} held-out prompts × {preset.eval_samples} samples"
    )
    rows = run_frontier("quick", output_dir, [args.seed], threads=args.threads)
    print("\n" + format_table(aggregate(rows)))
    print(
        "\nvalidity = pass@1 = mean verdict; distinct_valid = distinct valid answers per prompt; support_hit = share"
        "\nof all valid answers found; pstar_mass_hit = p*-mass of the answers found; kl_pstar_policy = KL(p*‖π)"
    )
    print(
        f"\nwrote {output_dir}/results.md, {output_dir}/passk.png, {output_dir}/frontier.png"
        f"   total time: {(time.time() - started) / 60:.1f} min"
    )
    return 0
