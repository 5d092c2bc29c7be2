"""`filtered-rl train` and `filtered-rl eval` never overwrite or delete a file they did not write (issue #22, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_model import save_tiny_model
from _train_run import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_new_tokens=8)


def _user_files(out: Path) -> dict[str, str]:
    files = {
        "notes.txt": "my notes",
        "results.json": '{"mine": 1}',
        "README.md": "# my readme",
        "config.json": '{"my": "config"}',
        "checkpoint-1/my_notes.txt": "keep me",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return files


def test_train_refuses_a_directory_it_did_not_write(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    files = _user_files(out)
    with pytest.raises(SystemExit) as exit_info:
        train(tiny, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "2")
    message = str(exit_info.value)
    assert str(out) in message and "'notes.txt'" in message and "--overwrite_output_dir" in message
    assert {n: (out / n).read_text() for n in files} == files
    assert sorted(p.name for p in out.iterdir()) == sorted({n.split("/")[0] for n in files})


def test_overwrite_flag_keeps_every_user_file_and_rotation_skips_the_users_checkpoint(
    tiny: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    files = _user_files(out)
    args = ["--save_steps", "2", "--save_total_limit", "2", "--overwrite_output_dir", "true"]
    assert train(tiny, out, "--max_steps", "6", *args) == 0
    assert {n: (out / n).read_text() for n in files} == files  # README.md, config.json untouched
    assert sorted(p.name for p in (out / "checkpoint-1").iterdir()) == ["my_notes.txt"]
    # rotation kept 2 of the run's own checkpoints; the final model went beside the user's config.json
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert (out / "final-model" / "model.safetensors").is_file()
    marker = json.loads((out / "filtered_rl_model.json").read_text())
    assert not set(marker["files"]) & set(files) and "checkpoint-1" not in marker["files"]


def test_a_run_of_ours_can_be_trained_into_again_but_a_user_file_added_later_is_refused(
    tiny: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert train(tiny, out, "--max_steps", "2", "--save_steps", "2") == 0
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert train(tiny, out, "--max_steps", "2", "--save_steps", "2") == 0  # all ours: allowed
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        train(tiny, out, "--max_steps", "2", "--save_steps", "2")


def test_eval_refuses_to_overwrite_a_users_summary(tiny: Path, tmp_path: Path, capsys) -> None:
    from filtered_rl.cli import main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    flags = [
        "eval",
        "--model",
        str(tiny),
        "--dataset",
        "countdown",
        "--num-prompts",
        "2",
        "--num-samples",
        "2",
    ]
    assert main([*flags, "--output-dir", str(out), "--no-progress"]) == 1
    assert (out / "summary.json").read_text() == '{"mine": true}'
    assert "summary.json" in capsys.readouterr().err
    fresh = tmp_path / "eval2"
    assert main([*flags, "--output-dir", str(fresh), "--no-progress"]) == 0
    assert main([*flags, "--output-dir", str(fresh), "--no-progress"]) == 0  # its own files: rerun/resume ok
