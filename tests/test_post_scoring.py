"""The post-scoring base trainer: bad settings fail early, odd rewards and dead steps warn, and the
per-prompt state is written atomically into checkpoints and refused loudly when missing or corrupt."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from _common import CPU

pytest.importorskip("trl")

from filtered_rl.trainers._base import STATE_FILE, PostScoringConfig, write_json_atomic  # noqa: E402
from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def make_args(tmp_path: Path, **overrides) -> FilteredGRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_completion_length=6,
        num_generations=4,
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=1e-2,
        seed=0,
        **CPU,
    )
    values.update(overrides)
    return FilteredGRPOConfig(**values)


def rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}:", "answer": str(i)} for i in range(n)]


def trainer_for(tiny_model_dir: Path, args: FilteredGRPOConfig, reward) -> FilteredGRPOTrainer:
    from datasets import Dataset

    return FilteredGRPOTrainer(
        model=str(tiny_model_dir), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows(2))
    )


@pytest.mark.parametrize("threshold", [math.nan, 1.5, -0.1, 1.0, math.inf])
def test_validity_threshold_outside_0_1_is_refused(tmp_path, threshold):
    with pytest.raises(ValueError, match="validity_threshold"):
        make_args(tmp_path, validity_threshold=threshold)


def test_negative_patience_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no_valid_patience"):
        PostScoringConfig(output_dir=str(tmp_path), no_valid_patience=-1, **CPU)


def test_non_binary_rewards_warn_once_naming_the_function(tiny_model_dir, tmp_path):
    def graded(completions, **kwargs):
        return [0.7 for _ in completions]

    trainer = trainer_for(tiny_model_dir, make_args(tmp_path, max_steps=2), graded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "not only 0/1/None" in str(w.message)]
    assert len(messages) == 1 and "'graded'" in messages[0] and "0.7" in messages[0]


def test_steps_without_any_valid_completion_warn(tiny_model_dir, tmp_path):
    def never(completions, **kwargs):
        return [0.0 for _ in completions]

    trainer = trainer_for(tiny_model_dir, make_args(tmp_path, max_steps=3, no_valid_patience=3), never)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("no group had a valid completion for 3" in str(w.message) for w in caught)
    # Toward the tilted target every A(x) = 0 maps to β = inf: no `inf` is logged for target_beta.
    args = make_args(tmp_path / "t", max_steps=1, target="tilted", target_validity=0.5)
    tilted = trainer_for(tiny_model_dir, args, never)
    tilted.train()
    logged = [h["filtered/target_beta"] for h in tilted.state.log_history if "filtered/target_beta" in h]
    assert all(math.isfinite(value) for value in logged)


def test_state_is_in_the_checkpoint_before_trainer_state_and_load_errors_name_the_file(
    tiny_model_dir, tmp_path
):
    def half(completions, **kwargs):
        return [float(i % 2) for i, _ in enumerate(completions)]

    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer_for(tiny_model_dir, args, half).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    state_file, trainer_state = checkpoint / STATE_FILE, checkpoint / "trainer_state.json"
    assert state_file.stat().st_mtime_ns <= trainer_state.stat().st_mtime_ns
    assert json.loads(state_file.read_text())["states"]["validity_tracker"]["values"]
    assert not list(checkpoint.glob(".tmp-*")), "no temporary file is left behind"

    resume_args = make_args(tmp_path, max_steps=2, save_strategy="no")
    good = state_file.read_text()
    state_file.write_text(good[: len(good) // 2])  # a kill mid-write of a non-atomic writer
    with pytest.raises(ValueError, match=f"{STATE_FILE}.*corrupt or truncated.*earlier checkpoint"):
        trainer_for(tiny_model_dir, resume_args, half).train(resume_from_checkpoint=str(checkpoint))
    state_file.unlink()
    with pytest.raises(FileNotFoundError, match=f"{STATE_FILE} is missing.*validity_tracker"):
        trainer_for(tiny_model_dir, resume_args, half).train(resume_from_checkpoint=str(checkpoint))

    # A filtered-rl 0.1 checkpoint (one tracker file) still resumes.
    legacy = json.loads(good)["states"]["validity_tracker"]
    (checkpoint / "filtered_validity_tracker.json").write_text(json.dumps(legacy))
    resumed = trainer_for(tiny_model_dir, resume_args, half)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(count for _, count in resumed.validity_tracker.values.values()) == [2, 2]


def test_atomic_json_write_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"a": torch.tensor(1)})  # not JSON-serialisable
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
