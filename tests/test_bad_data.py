"""Bad data and bad inputs get clear errors naming the file, line, row or flag (issue #22, item 10)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest


def test_run_code_accepts_tests_as_a_list_of_statements() -> None:
    from filtered_rl.verifiers.sandbox import SandboxPool, run_code

    pool = SandboxPool(workers=1)
    try:
        program = "def add(a, b):\n    return a + b\n"
        assert run_code(program, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], pool=pool).passed
        assert not run_code(program, ("assert add(1, 2) == 3", "assert add(1, 1) == 3"), pool=pool).passed
        results = pool.run_many([(program, ["assert add(2, 2) == 4"]), (program, "assert add(2, 2) == 5")])
        assert [r.passed for r in results] == [True, False]
    finally:
        pool.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_new_tokens=8)


def _rows(path: Path, rows: list[dict], corrupt_line: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if corrupt_line is not None:
        lines[corrupt_line - 1] = lines[corrupt_line - 1][:-3]
    path.write_text("\n".join(lines) + "\n")
    return path


ROWS = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)]
CUSTOM = dict(prompt_column="question", verifier="math")


def test_corrupt_jsonl_names_the_file_and_line(tmp_path: Path) -> None:
    from filtered_rl.data import DataError, load_task

    path = _rows(tmp_path / "data.jsonl", ROWS, corrupt_line=4)
    with pytest.raises(DataError, match=rf"{path}: line 4, column \d+: not valid JSON"):
        load_task(str(path), **CUSTOM)


def test_binary_file_names_the_file(tmp_path: Path) -> None:
    from filtered_rl.data import DataError, load_task

    path = tmp_path / "data.jsonl"
    path.write_bytes(os.urandom(64) + b"\xff\xfe\x00")
    with pytest.raises(DataError, match=rf"{path}: (not a UTF-8 text file|holds NUL bytes)"):
        load_task(str(path), **CUSTOM)


def test_lone_surrogate_names_the_line_and_field(tmp_path: Path) -> None:
    from filtered_rl.data import DataError, load_task

    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "ok", "answer": "1"}\n{"question": "bad \\ud800 text", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"line 2, field 'question'.*lone surrogate \(U\+D800\)"):
        load_task(str(path), **CUSTOM)


def test_train_reports_bad_data_without_a_traceback(tiny: Path, tmp_path: Path) -> None:
    from filtered_rl.train import main

    path = _rows(tmp_path / "data.jsonl", ROWS, corrupt_line=2)
    flags = ["--model_name_or_path", str(tiny), "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
             "--bf16", "false", "--prompt_column", "question", "--verifier", "math"]  # fmt: skip
    with pytest.raises(SystemExit, match=rf"{path}: line 2"):
        main(["--dataset_name", str(path), *flags])


def _eval(*args: str) -> int:
    from filtered_rl.cli import main

    return main(["eval", "--num-samples", "2", "--no-progress", *args])


def _no_sampling(monkeypatch) -> None:
    from filtered_rl.evaluation import runner

    def fail(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_model", fail)


def test_eval_corrupt_data_files_names_file_and_line(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _no_sampling(monkeypatch)
    path = _rows(tmp_path / "data.jsonl", ROWS, corrupt_line=3)
    code = _eval("--model", str(tiny), "--dataset", "custom", "--data-files", str(path),
                 "--prompt-column", "question", "--verifier", "math", "--output-dir", str(tmp_path / "e"))  # fmt: skip
    assert code == 1 and f"{path}: line 3" in capsys.readouterr().err


def test_eval_missing_gold_column_fails_before_sampling(
    tiny: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    _no_sampling(monkeypatch)
    path = _rows(tmp_path / "data.jsonl", [{"question": "1+1?"}, {"question": "2+2?"}])
    code = _eval("--model", str(tiny), "--dataset", "custom", "--data-files", str(path),
                 "--prompt-column", "question", "--verifier", "math", "--output-dir", str(tmp_path / "e"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "lacks a column its verifier reads" in err and "'answer'" in err


def test_unknown_local_model_path_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from filtered_rl.train import main

    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(SystemExit) as exit_info:
        _eval("--model", missing, "--output-dir", str(tmp_path / "e"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no such model directory" in err and "Repo id" not in err
    with pytest.raises(SystemExit, match="no such model directory"):
        main(["--model_name_or_path", missing, "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"])


def test_a_200k_character_prompt_is_refused_before_the_model_loads(
    tiny: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import transformers

    from filtered_rl.train import main

    rows = [*ROWS[:2], {"question": "x" * 200_000, "answer": "1", "prompt_id": "huge"}]
    path = _rows(tmp_path / "data.jsonl", rows)
    _no_sampling(monkeypatch)
    code = _eval("--model", str(tiny), "--dataset", "custom", "--data-files", str(path),
                 "--prompt-column", "question", "--verifier", "math", "--output-dir", str(tmp_path / "e"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and re.search(r"'(huge|custom-test-2)' \(200\d\d\d tokens\)", err)
    assert "prompt-length limit of 120 tokens" in err
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit, match=r"limit of 120 tokens: '(huge|[\w-]+)' \(200\d\d\d tokens\)"):
        main(["--model_name_or_path", str(tiny), "--dataset_name", str(path), "--prompt_column", "question",
              "--verifier", "math", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false",
              "--max_completion_length", "8"])  # fmt: skip


def test_eval_negative_seed_is_a_usage_error(tiny: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _eval("--model", str(tiny), "--seed", "-1", "--output-dir", str(tmp_path / "e"))
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err
    from filtered_rl.evaluation.runner import EvalConfig, EvalConfigError

    with pytest.raises(EvalConfigError, match="--seed"):
        EvalConfig(model=str(tiny), output_dir=str(tmp_path / "e"), seed=-1)
