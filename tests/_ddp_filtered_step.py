"""One FilteredGRPOTrainer step on a tiny model, run by tests/test_trainer.py in 1 or 2 CPU processes.

    python tests/_ddp_filtered_step.py --model DIR --out result.json --world-size 1
    torchrun --standalone --nproc_per_node=2 tests/_ddp_filtered_step.py --model DIR --out result.json --world-size 2

Completions come from a deterministic `rollout_func` (a function of the prompt and the row's place in
its group), so both launches train on the same data; 3 prompts × 4 completions over 2 processes of 6
rows puts the middle group on both processes. SGD (not Adam) so that the update is proportional to the
gradient. Rank 0 writes the gathered completions, advantages and the weight change.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from _tiny_model import has_digit

NUM_PROMPTS, GROUP = 3, 4


def deterministic_rollout(prompts, trainer):
    """Completion of global row r: a seeded random string for (prompt, r mod GROUP); digits in about half."""
    tokenizer = trainer.processing_class
    offset = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        rng = random.Random(f"{prompt}|{(offset + i) % GROUP}")
        text = "".join(rng.choice("abc+-*1") for _ in range(rng.randint(1, 6)))
        prompt_ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        completion_ids.append(
            tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        )
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()

    import torch
    from datasets import Dataset

    from filtered_rl.trainer import FilteredGRPOConfig, FilteredGRPOTrainer, end_run

    torch.set_num_threads(1)
    config = FilteredGRPOConfig(
        output_dir=str(Path(args.out).parent / f"run{args.world_size}"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        num_generations=GROUP,
        per_device_train_batch_size=NUM_PROMPTS * GROUP // args.world_size,
        max_steps=1,
        max_completion_length=8,
        optim="sgd",
        learning_rate=0.5,
        seed=0,
        divergence="js",
    )
    dataset = Dataset.from_list([{"prompt": f"q{i}:"} for i in range(NUM_PROMPTS)])
    trainer = FilteredGRPOTrainer(
        model=args.model,
        reward_funcs=has_digit,
        args=config,
        train_dataset=dataset,
        rollout_func=deterministic_rollout,
    )
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    if trainer.accelerator.is_main_process:
        logs = trainer._logs
        pairs = sorted(zip(logs["prompt"], logs["completion"], logs["advantages"]))
        result = {
            "world_size": trainer.accelerator.num_processes,
            "completions": [[p, c] for p, c, _ in pairs],
            "advantages": [a for _, _, a in pairs],
            "weight_delta": (after - before).tolist(),
        }
        Path(args.out).write_text(json.dumps(result))
    end_run(trainer)


if __name__ == "__main__":
    main()
