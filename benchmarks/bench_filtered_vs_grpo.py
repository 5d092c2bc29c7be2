"""Step time of FilteredGRPOTrainer vs GRPOTrainer with a KL penalty (beta > 0), same model and batch.

Both run the reference model every generation; the filtered objective adds one no-grad forward of the
policy (its log π_old, which TRL skips when π_old is the current policy) and a few tensor ops per group.
The learning rate is 0 so that both trainers sample exactly the same completions (same seed, same
weights): the ratio measures the objective's overhead, not a difference in completion lengths.
The two trainers alternate for `--rounds` rounds; the first step of each run (warm-up) is dropped and
the median step time (TRL's `step_time`: generation, scoring, forward and backward) is compared.

    python benchmarks/bench_filtered_vs_grpo.py                 # nano countdown model (pretrained if needed)
    python benchmarks/bench_filtered_vs_grpo.py --model DIR --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers.trainer_callback import PrinterCallback


def step_times(
    trainer_cls, config_cls, model: str, dataset, reward, steps: int, workdir: str, **extra
) -> tuple[list[float], list[float]]:
    args = config_cls(
        output_dir=workdir,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_steps=steps,
        learning_rate=0.0,
        seed=0,
        num_generations=8,
        per_device_train_batch_size=32,
        max_completion_length=24,
        **extra,
    )
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.remove_callback(PrinterCallback)  # keep the output to the figures below
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    return times[1:], lengths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: the pretrained nano countdown model)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each trainer")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--kl-beta", type=float, default=0.04, help="GRPO's KL coefficient (> 0: runs the reference)"
    )
    args = parser.parse_args()

    import torch
    from trl import GRPOConfig, GRPOTrainer

    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.countdown import make_countdown_dataset
    from filtered_rl.trainer import FilteredGRPOConfig, FilteredGRPOTrainer
    from filtered_rl.synthetic.countdown_verifier import CountdownVerifier

    torch.set_num_threads(args.threads)
    model = args.model or str(load_or_pretrain(size="nano", seed=0))
    dataset = make_countdown_dataset(64, 0, seed=0)["train"]
    reward = CountdownVerifier()
    runs = {
        "grpo": (GRPOTrainer, GRPOConfig, dict(beta=args.kl_beta)),
        "filtered": (FilteredGRPOTrainer, FilteredGRPOConfig, dict(divergence="forward_kl")),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    lengths: dict[str, list[float]] = {name: [] for name in runs}
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            for name, (trainer_cls, config_cls, extra) in runs.items():
                t, lens = step_times(
                    trainer_cls,
                    config_cls,
                    model,
                    dataset,
                    reward,
                    args.steps,
                    str(Path(workdir) / name),
                    **extra,
                )
                times[name] += t
                lengths[name] += lens
    grpo, filtered = statistics.median(times["grpo"]), statistics.median(times["filtered"])
    print(
        f"model: {model}  threads: {args.threads}  batch: 32 completions (4 prompts x 8), max 24 new tokens"
    )
    print(f"same completions in both: {lengths['grpo'] == lengths['filtered']}")
    print(f"GRPOTrainer(beta={args.kl_beta}) step: median {grpo:.3f} s over {len(times['grpo'])} steps")
    print(f"FilteredGRPOTrainer          step: median {filtered:.3f} s over {len(times['filtered'])} steps")
    print(f"ratio filtered / grpo: {filtered / grpo:.3f}   (total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
