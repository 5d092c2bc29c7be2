"""`filtered-rl pretrain --output-dir` never deletes what it did not write.

Before the fix, an existing output directory was removed with `shutil.rmtree` whatever it held:
`--output-dir runs` deleted an unrelated `runs/exp/results.json`, `--output-dir .` emptied the
working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filtered_rl.synthetic import base_model
from filtered_rl.synthetic.base_model import (
    MODEL_MARKER,
    OutputDirError,
    check_output_dir,
    pretrain_base_model,
)

FEW_STEPS = ["--steps", "2", "--batch-size", "4", "--no-progress"]
TINY = dict(steps=2, batch_size=4, progress=False)


def _pretrain_cli(*args: str) -> int:
    from filtered_rl.cli import main

    return main(["pretrain", *FEW_STEPS, *args])


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_a_directory_with_unrelated_files_is_refused_and_kept(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "exp").mkdir(parents=True)
    (runs / "exp" / "results.json").write_text('{"keep": true}')
    assert _pretrain_cli("--output-dir", str(runs)) == 2
    assert (runs / "exp" / "results.json").read_text() == '{"keep": true}'
    err = capsys.readouterr().err
    assert "--output-dir" in err and "'exp'" in err and "nothing was deleted" in err
    assert "new or empty directory" in err
    assert _siblings(runs) == []


def test_the_working_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for path in (".", "./", "..", str(work), str(tmp_path)):
        assert _pretrain_cli("--output-dir", path) == 2, path
    assert (work / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(OutputDirError, match="current directory"):  # even when empty: not a model's own
        check_output_dir(".")


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a directory")
    with pytest.raises(OutputDirError, match="not a directory"):
        pretrain_base_model(target, **TINY)
    assert target.read_text() == "not a directory"


def test_a_new_or_empty_directory_gets_a_model_with_the_marker(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new" / "model", empty):
        pretrain_base_model(target, **TINY)
        marker = json.loads((target / MODEL_MARKER).read_text())
        assert marker["task"] == "countdown" and "model.safetensors" in marker["files"]
        assert set(marker["files"]) | {MODEL_MARKER} == {p.name for p in target.iterdir()}
        assert _siblings(target) == []


def test_a_previous_model_of_ours_is_replaced(tmp_path):
    target = tmp_path / "model"
    pretrain_base_model(target, seed=1, **TINY)
    first = (target / "model.safetensors").read_bytes()
    pretrain_base_model(target, seed=2, **TINY)
    assert (target / "model.safetensors").read_bytes() != first
    assert json.loads((target / "pretrain_info.json").read_text())["config"]["seed"] == 2
    assert _siblings(target) == []  # no staging or old copy left beside it


def test_a_model_from_before_the_marker_is_replaced(tmp_path):
    target = tmp_path / "model"
    pretrain_base_model(target, **TINY)
    # as written by earlier versions: pretrain_info.json, no marker and no pretraining log
    (target / MODEL_MARKER).unlink()
    (target / "pretrain_log.jsonl").unlink()
    pretrain_base_model(target, seed=3, **TINY)
    assert (target / MODEL_MARKER).exists()


def test_a_model_of_ours_holding_a_user_file_is_refused(tmp_path):
    target = tmp_path / "model"
    pretrain_base_model(target, **TINY)
    (target / "my_eval.json").write_text("{}")
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(OutputDirError, match="my_eval.json"):
        pretrain_base_model(target, seed=5, **TINY)
    assert (target / "my_eval.json").exists() and (target / "model.safetensors").read_bytes() == before


def test_a_failed_write_leaves_the_previous_model_in_place(tmp_path):
    target = tmp_path / "model"
    pretrain_base_model(target, **TINY)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        base_model._install(target, fail, {"task": "countdown"})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _siblings(target) == []


def test_an_unrelated_directory_is_refused_before_any_pretraining(tmp_path, monkeypatch):
    target = tmp_path / "data"
    target.mkdir()
    (target / "train.jsonl").write_text("{}\n")
    monkeypatch.setattr(base_model, "_pretrain", lambda *a, **k: pytest.fail("pretrained before checking"))
    with pytest.raises(OutputDirError):
        pretrain_base_model(target, **TINY)
