"""A few optimizer steps of `filtered-rl train` in this process, on the tiny random model (seconds)."""

from __future__ import annotations

from pathlib import Path

FEW_STEPS = [
    "--dataset_name", "countdown", "--countdown_train_prompts", "16",
    "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
    "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1",
    "--gradient_checkpointing", "false", "--learning_rate", "0.01", "--lr_scheduler_type", "constant", "--seed", "0",
]  # fmt: skip


def train(model: Path, output_dir: Path, *args: str, monkeypatch=None) -> int:
    """`filtered-rl train` with FEW_STEPS; with `monkeypatch`, the countdown verifier is replaced by
    `has_digit` (a random model passes it often enough for the weights to move)."""
    from filtered_rl.train import main

    if monkeypatch is not None:
        from _tiny_model import has_digit

        import filtered_rl.data

        load_task = filtered_rl.data.load_task

        def with_digit_verifier(*a, **k):
            task = load_task(*a, **k)
            task.verifier = has_digit
            return task

        monkeypatch.setattr(filtered_rl.data, "load_task", with_digit_verifier)
    return main(["--model_name_or_path", str(model), "--output_dir", str(output_dir), *FEW_STEPS, *args])
