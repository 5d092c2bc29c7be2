"""Resume from the newest complete checkpoint; an incomplete one is refused before the model loads (issue #22, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny_model import save_tiny_model
from _train_run import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_new_tokens=8)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resume_true_skips_a_checkpoint_killed_while_saving_and_matches_an_uninterrupted_run(
    tiny: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import torch

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(tiny, whole, "--max_steps", "6", "--save_steps", "2", monkeypatch=monkeypatch) == 0
    assert train(tiny, cut, "--max_steps", "4", "--save_steps", "2", monkeypatch=monkeypatch) == 0
    # a kill while saving checkpoint-4: only part of its files were written
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (cut / "checkpoint-4" / name).unlink()
    capsys.readouterr()
    assert train(tiny, cut, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "True",
                 monkeypatch=monkeypatch) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-2" in err and "skipped newer checkpoint-4" in err
    assert "optimizer.pt is missing" in err
    start, end = _weights(tiny), _weights(whole)
    assert any(not torch.equal(start[k], end[k]) for k in end)  # the run did train
    resumed = _weights(cut)
    for key, value in end.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("optimizer.pt", "optimizer.pt is missing"),
        ("scheduler.pt", "scheduler.pt is missing"),
        ("rng_state.pth", "rng_state.pth is missing"),
        ("trainer_state.json", "trainer_state.json is missing"),
        ("model.safetensors", "model.safetensors is missing"),
        ("truncate:optimizer.pt", "optimizer.pt is"),
        ("truncate:model.safetensors", "model.safetensors is"),
    ],
)
def test_an_incomplete_checkpoint_is_refused_before_the_model_loads(
    tiny: Path, tmp_path: Path, monkeypatch, damage: str, named: str
) -> None:
    out = tmp_path / "run"
    assert train(tiny, out, "--max_steps", "4", "--save_steps", "2") == 0
    target = out / "checkpoint-4" / damage.removeprefix("truncate:")
    if damage.startswith("truncate:"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    with pytest.raises(SystemExit) as exit_info:
        train(
            tiny, out, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", str(target.parent)
        )
    message = str(exit_info.value)
    assert named in message and "checkpoint-2" in message and "resume_from_checkpoint=true" in message


def test_unmarked_checkpoints_are_checked_file_by_file(tiny: Path, tmp_path: Path) -> None:
    """A checkpoint written without the marker (older version, plain TRL): required files, readable."""
    from filtered_rl.run_dir import checkpoint_problems

    out = tmp_path / "run"
    assert train(tiny, out, "--max_steps", "2", "--save_steps", "2") == 0
    checkpoint = out / "checkpoint-2"
    (checkpoint / "filtered_rl_model.json").unlink()
    assert checkpoint_problems(checkpoint) == []
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    assert checkpoint_problems(checkpoint) == ["optimizer.pt is truncated or not a torch file"]
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "model.safetensors is truncated or not a safetensors file" in checkpoint_problems(checkpoint)


def test_resume_true_without_checkpoints_is_refused(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="holds no checkpoint-N folder"):
        train(tiny, tmp_path / "new", "--max_steps", "2", "--resume_from_checkpoint", "true")
