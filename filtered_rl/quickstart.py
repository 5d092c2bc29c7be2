"""`filtered-rl quickstart`: the whole story on a laptop CPU, in minutes.

Version 1: pretrain (or load from the cache) the nano countdown base model and show its validity
spread on held-out prompts: the validity rate, the distinct valid answers per prompt, and the
histogram of per-prompt validity. Later steps (GRPO+KL vs the filtered objective, pass@k) build on it.
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
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts to evaluate")
    parser.add_argument("--num-samples", type=int, default=32, help="samples per prompt (temperature 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from filtered_rl.base_model import load_or_pretrain
    from filtered_rl.base_model_report import format_report, validity_report
    from filtered_rl.countdown import make_countdown_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    print("[1] base model: nano, pretrained on the countdown train split (cached after the first run)")
    model_dir = load_or_pretrain("nano", seed=args.seed)
    print(f"    {model_dir}  ({time.time() - started:.0f} s)")

    print(f"[2] sampling {args.num_samples} completions for each of {args.num_prompts} held-out prompts")
    test = make_countdown_dataset(0, args.num_prompts, seed=args.seed)["test"]
    report = validity_report(model_dir, test, num_samples=args.num_samples, seed=args.seed)
    print(format_report(report, max_rows=12))
    (output_dir / "base_validity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {output_dir / 'base_validity.json'}   total time: {time.time() - started:.0f} s")
    return 0
