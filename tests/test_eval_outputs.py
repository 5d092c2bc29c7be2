"""The evaluation's output files survive kills: atomic whole-file writes, torn JSONL lines dropped on
resume, and load errors that name the file and the fix instead of a bare JSONDecodeError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _tiny_model import save_tiny_model

from filtered_rl.cli import main
from filtered_rl.evaluation.outputs import EvalOutputError, atomic_write_text, read_json, read_jsonl
from filtered_rl.evaluation.plots import plot_passk
from filtered_rl.evaluation.runner import CONFIG_FILE, SAMPLES_FILE, SUMMARY_FILE, EvalConfig, run_eval

MISSING_MODEL = "/nonexistent/model-that-must-not-be-loaded"


# --- the file helpers ----------------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"old": true}\n')

    def killed(fd):
        raise KeyboardInterrupt  # a kill between writing the temp file and moving it into place

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"new": true, "long": "' + "x" * 100_000 + '"}\n')
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind
    monkeypatch.undo()
    atomic_write_text(path, "{}\n")
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_read_json_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "eval_config.json"
    path.write_text('{"model": "m", "temper')
    with pytest.raises(EvalOutputError, match=r"eval_config\.json is not valid JSON .*: delete it"):
        read_json(path, fix="delete it")
    assert str(path) in _message(lambda: read_json(path, fix="delete it"))


def test_read_jsonl_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "samples.rank0.jsonl"
    good = [{"prompt_id": "a", "sample_index": i} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(text + '{"prompt_id": "a", "sam')
    with pytest.warns(RuntimeWarning, match=r"samples\.rank0\.jsonl: dropped its last line"):
        assert read_jsonl(path, required=("prompt_id", "sample_index")) == good
    path.write_text(text.rstrip("\n"))  # a complete last record without its newline is kept
    assert read_jsonl(path) == good
    path.write_text(text + "{not json\n" + text)  # a bad line in the middle is not a kill's torn write
    with pytest.raises(
        EvalOutputError, match=r"samples\.rank0\.jsonl, line 4: not a JSON record.*delete that line"
    ):
        read_jsonl(path)
    path.write_text(text + '{"prompt_id": "a"}\n')
    with pytest.raises(EvalOutputError, match="line 4: a record without sample_index"):
        read_jsonl(path, required=("prompt_id", "sample_index"))


def _message(call) -> str:
    with pytest.raises(EvalOutputError) as info:
        call()
    return str(info.value)


# --- resume ------------------------------------------------------------------------------------------------


def _prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"q": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    return path


def test_truncated_eval_config_is_a_clear_error_naming_the_path(tmp_path, capsys):
    """The config check reads the file before anything is loaded: the message names it and the fix."""
    data, out = _prompts_file(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / CONFIG_FILE).write_text('{\n  "model": "m",\n  "base_mo')  # cut by a kill (an older version)
    config = EvalConfig(
        model=MISSING_MODEL, output_dir=str(out), dataset=str(data), prompt_column="q", verifier="countdown"
    )
    message = _message(lambda: run_eval(config))
    assert str(out / CONFIG_FILE) in message and "not valid JSON" in message
    assert f"delete {out / CONFIG_FILE} and rerun" in message and "new --output-dir" in message

    flags = ["--dataset", str(data), "--prompt-column", "q", "--verifier", "countdown"]
    code = main(["eval", "--model", MISSING_MODEL, *flags, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"filtered-rl eval: error: {out / CONFIG_FILE} is not valid JSON")
    )


def test_other_settings_in_the_output_dir_are_a_usage_error(tmp_path, capsys):
    data, out = _prompts_file(tmp_path), tmp_path / "out"
    out.mkdir()
    flags = [
        "--dataset",
        str(data),
        "--prompt-column",
        "q",
        "--verifier",
        "countdown",
        "--output-dir",
        str(out),
    ]
    settings = {k: None for k in ("base_model", "data_files", "split", "max_new_tokens", "chat_template")}
    settings |= {"model": MISSING_MODEL, "dataset": str(data), "temperature": 0.5, "top_p": 1.0}
    settings |= {"system_prompt": "auto", "prompt_column": "q", "verifier": "countdown", "gold_column": None}
    (out / CONFIG_FILE).write_text(json.dumps({**settings, "seed": 0, "backend": "hf"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", MISSING_MODEL, *flags])
    assert exit_info.value.code == 2
    assert "holds samples drawn with other settings (temperature: 0.5 → 1.0)" in capsys.readouterr().err


class _Counting:
    """Wraps a sampler and records which (prompts, samples) each call draws."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def sample(self, prompt_ids, prompt_seeds, sample_indices):
        self.calls.append((tuple(prompt_seeds), sample_indices))
        return self.sampler.sample(prompt_ids, prompt_seeds, sample_indices)


def test_a_torn_last_line_of_samples_jsonl_is_dropped_and_its_batch_redone(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.generate import HFSampler

    model_dir = save_tiny_model(tmp_path / "model", max_new_tokens=4)
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(model_dir).eval(),
        AutoTokenizer.from_pretrained(model_dir),
    )
    out = tmp_path / "out"
    config = EvalConfig(
        model=str(model_dir),
        output_dir=str(out),
        dataset="countdown",
        num_prompts=4,
        num_samples=2,
        batch_size=4,
        bootstrap=50,
        progress=False,
    )
    make = lambda: _Counting(HFSampler(model, tokenizer, temperature=1.0, max_new_tokens=4, seed=0))
    first = make()
    reference = run_eval(config, sampler=first)
    assert len(first.calls) == 2
    samples = out / SAMPLES_FILE
    complete = samples.read_text()
    lines = complete.splitlines(keepends=True)
    assert len(lines) == 8
    samples.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the kill's torn write
    (out / SUMMARY_FILE).unlink()

    second = make()
    with pytest.warns(RuntimeWarning, match=r"samples\.jsonl: dropped its last line"):
        resumed = run_eval(config, sampler=second)
    assert len(second.calls) == 1  # only the batch of the dropped sample is drawn again
    assert resumed["run"]["new_samples"] == 1
    redone = [json.loads(line) for line in samples.read_text().splitlines()]
    expected = [json.loads(line) for line in lines]
    key = lambda r: (r["prompt_id"], r["sample_index"], r["completion"], r["verdict"], r["num_tokens"])
    assert [key(r) for r in redone] == [key(r) for r in expected]
    assert resumed["pass_at_k"] == reference["pass_at_k"]  # from the same verdicts: no float recomputed
    assert json.loads((out / SUMMARY_FILE).read_text())["num_prompts"] == 4
    assert not list(out.glob(".*.tmp")) and not list(out.glob("samples.rank*"))


def test_a_corrupt_line_inside_samples_jsonl_stops_the_resume_naming_it(tmp_path):
    data, out = _prompts_file(tmp_path), tmp_path / "out"
    out.mkdir()
    record = {"prompt_id": "questions-test-0", "sample_index": 0}
    (out / SAMPLES_FILE).write_text(json.dumps(record) + "\n#garbage\n" + json.dumps(record) + "\n")
    config = EvalConfig(
        model=MISSING_MODEL, output_dir=str(out), dataset=str(data), prompt_column="q", verifier="countdown"
    )
    message = _message(lambda: run_eval(config))
    assert f"{out / SAMPLES_FILE}, line 2: not a JSON record" in message and "delete that line" in message


def test_plot_of_a_truncated_summary_names_the_file(tmp_path):
    summary = tmp_path / "run" / SUMMARY_FILE
    summary.parent.mkdir()
    summary.write_text('{"model": "m", "pass_at_k": {"1": {"mean": 0.')
    message = _message(lambda: plot_passk([summary.parent], tmp_path / "p.png"))
    assert str(summary) in message and "rerun `filtered-rl eval` with the same --output-dir" in message
    assert not (tmp_path / "p.png").exists()
