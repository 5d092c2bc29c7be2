"""`filtered-rl eval` refuses bad flags as usage errors (exit code 2, the flag named), before a model loads.

Every case passes a --model that does not exist: had the flag got through to model loading, the run
would fail with an OSError traceback instead of the usage error asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filtered_rl.cli import main
from filtered_rl.evaluation.runner import EvalConfig, EvalConfigError

MISSING_MODEL = "/nonexistent/model-that-must-not-be-loaded"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `filtered-rl eval ARGV`; assert argparse's exit (code 2, usage line); return the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", MISSING_MODEL, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: filtered-rl eval"), err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-samples", "0"], "argument --num-samples/-n: must be ≥ 1, got 0"),
        (["-n", "-3"], "argument --num-samples/-n: must be ≥ 1, got -3"),
        (["--num-samples", "many"], "argument --num-samples/-n: expected an integer, got 'many'"),
        (["--num-prompts", "0"], "argument --num-prompts: must be ≥ 1, got 0"),
        (["--k", "1", "0"], "argument --k: must be ≥ 1, got 0"),
        (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["--temperature", "-0.5"], "argument --temperature: must be ≥ 0, got -0.5"),
        (["--temperature", "nan"], "argument --temperature: must be ≥ 0, got nan"),
        (["--temperature", "inf"], "argument --temperature: must be ≥ 0, got inf"),
        (["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be ≥ 1, got 0"),
        (["--bootstrap", "0"], "argument --bootstrap: must be ≥ 1, got 0"),
        (["--threads", "0"], "argument --threads: must be ≥ 1, got 0"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ],
)
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(flags, message, capsys, tmp_path):
    line = _usage_error([*flags, "--output-dir", str(tmp_path / "out")], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_k_larger_than_num_samples_is_a_usage_error(capsys, tmp_path):
    line = _usage_error(["--num-samples", "4", "--k", "1", "8", "16", "--output-dir", str(tmp_path)], capsys)
    assert "--k 8 16: pass@k needs 1 ≤ k ≤ n = --num-samples 4" in line and "raise --num-samples" in line


def test_too_many_prompts_is_a_usage_error_before_the_model_loads(capsys, tmp_path):
    """The README promises a clear error: --num-prompts beyond the split must not shrink silently."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    flags = ["--dataset", str(data), "--prompt-column", "q", "--verifier", "countdown"]
    line = _usage_error([*flags, "--num-prompts", "6", "--output-dir", str(out)], capsys)
    assert "--num-prompts 6: " in line and "has only 5 prompts" in line and "--num-prompts 5 or less" in line
    assert not out.exists()  # refused before anything was written


def test_too_many_countdown_prompts_names_the_pool_size(capsys, tmp_path):
    """The case of the report: 100000 countdown prompts, of which the test split has 168."""
    line = _usage_error(
        ["--dataset", "countdown", "--num-prompts", "100000", "--output-dir", str(tmp_path / "out")], capsys
    )
    assert "--num-prompts 100000: countdown has only 168 prompts" in line


def test_the_eval_recipe_reports_bad_flags_the_same_way(capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    try:
        from run_eval import main as recipe_main
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(["--model", MISSING_MODEL, "--top-p", "0"])
    assert exit_info.value.code == 2
    assert "argument --top-p: must be in (0, 1], got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"num_samples": 0}, "--num-samples"),
        ({"num_prompts": 0}, "--num-prompts"),
        ({"temperature": -1.0}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"bootstrap": 0}, "--bootstrap"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"backend": "sglang"}, "--backend"),
        ({"num_samples": 4, "ks": [0, 2]}, "--k 0"),
        ({"ks": []}, "--k"),
    ],
)
def test_the_python_api_refuses_the_same_settings(settings, flag):
    """EvalConfig checks what the flags check (for callers that skip the CLI); still a ValueError."""
    with pytest.raises(EvalConfigError, match=flag):
        EvalConfig(model=MISSING_MODEL, output_dir="unused", **settings)
    assert issubclass(EvalConfigError, ValueError)
