"""The code verifier as a TRL reward function, its program assembly, and canonical solutions on real data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from filtered_rl.verifiers.code import CodeVerifier, build_program, extract_code, normalise_program
from filtered_rl.verifiers.sandbox import ExecutionResult, SandboxLimits, SandboxPool, run_code

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the sandbox relies on Linux process controls"
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Canonical solutions must pass even on a loaded 2-core machine (MBPP/123 needs ~4 CPU-seconds).
GENEROUS = SandboxLimits(timeout=60.0)


@pytest.fixture(scope="module")
def verifier():
    verifier = CodeVerifier(workers=2, limits=SandboxLimits(timeout=10.0))
    yield verifier
    verifier.pool.close()


def humaneval() -> list[dict]:
    path = DATA / "humaneval" / "HumanEval.jsonl"
    if not path.exists():
        pytest.skip(f"HumanEval data not found at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mbpp() -> list[dict]:
    path = DATA / "mbpp" / "sanitized-mbpp.json"
    if not path.exists():
        pytest.skip(f"MBPP data not found at {path}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ program assembly


def test_extract_code_picks_the_fenced_block_defining_the_tested_function():
    text = (
        "Here is my solution:\n```python\ndef helper(x):\n    return x\n```\nand\n"
        "```python\ndef add(a, b):\n    return a + b\n```\nExample:\n```python\nprint(add(1, 2))\n```"
    )
    assert extract_code(text, tests="assert add(1, 2) == 3").strip().startswith("def add(a, b):")
    assert extract_code(text, entry_point="helper").strip().startswith("def helper(x):")
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # no fence: raw text
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated fence
    assert extract_code("```bash\nls\n```") == "```bash\nls\n```"  # non-Python fences are not code


def test_build_program_for_each_dataset_format():
    prompt = 'from typing import List\n\ndef inc(xs: List[int]) -> List[int]:\n    """Add one."""\n'
    row = {"test": "def check(candidate):\n    assert candidate([1]) == [2]\n", "entry_point": "inc"}
    body = "    return [x + 1 for x in xs]\n"
    program, tests = build_program(body, row, prompt)
    assert program == prompt + body and tests.rstrip().endswith("check(inc)")
    full = "```python\ndef inc(xs):\n    return [x + 1 for x in xs]\n```"
    program, _ = build_program(full, row, prompt)
    assert program.startswith(prompt) and program.rstrip().endswith("return [x + 1 for x in xs]")

    mbpp_row = {"test_list": ["assert sq(3) == 9"], "test_imports": ["import math"]}
    assert build_program("def sq(x):\n    return x * x", mbpp_row) == (
        "def sq(x):\n    return x * x",
        "import math\nassert sq(3) == 9",
    )
    assert build_program("x", {"tests": ["assert 1", "assert 2"]}) == ("x", "assert 1\nassert 2")
    assert build_program("x", {"tests": ""}) is None
    assert build_program("x", {"test_list": []}) is None
    with pytest.raises(KeyError, match="tests_column"):
        build_program("x", {"answer": "4"})


def test_answer_key_ignores_formatting_comments_and_docstrings():
    verifier = CodeVerifier()
    row = {"tests": "assert f(1) == 2"}
    a = verifier.answer_key("def f(x):\n    '''Doc.'''\n    return x+1  # add\n", row)
    b = verifier.answer_key("```python\ndef f( x ):\n    return (x + 1)\n```", row)
    c = verifier.answer_key("def f(x):\n    return 1 + x\n", row)
    assert a == b and a != c
    assert normalise_program("def broken(:\n   pass") == "def broken(:\n   pass"


# ------------------------------------------------------------------ execution


def test_run_code_statuses():
    pool = SandboxPool(1)
    try:
        limits = SandboxLimits(timeout=2.0)
        ok = run_code("def f(x):\n    return 2 * x", "assert f(2) == 4", limits=limits, pool=pool)
        assert isinstance(ok, ExecutionResult) and ok.status == "passed" and ok.passed and ok.duration > 0
        wrong = run_code("def f(x):\n    return x", "assert f(2) == 4", limits=limits, pool=pool)
        assert wrong.status == "failed" and "AssertionError" in wrong.reason
        assert run_code("def f(:", "assert True", limits=limits, pool=pool).status == "error"
        assert run_code("while True:\n    pass", "", limits=limits, pool=pool).status == "timeout"
        assert run_code(
            "def f():\n    return 1", "assert g() == 1", limits=limits, pool=pool
        ).reason.startswith("NameError")
    finally:
        pool.close()


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=-1)


def test_reward_function_contract(verifier):
    assert verifier.__name__ == "code"
    logged = {}
    completions = [
        "def sq(x):\n    return x * x",
        [{"role": "assistant", "content": "Sure:\n```python\ndef sq(x):\n    return x ** 2\n```"}],
        "def sq(x):\n    return x + x",
        "def sq(x):\n    return x * x",
    ]
    rewards = verifier(
        prompts=["Square a number."] * 4,
        completions=completions,
        completion_ids=[[0]] * 4,
        tests=["assert sq(3) == 9\nassert sq(-2) == 4"] * 3 + [""],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda k, v: logged.setdefault(k, v),
    )
    assert rewards == [1.0, 1.0, 0.0, None]
    assert logged == {"code/timeout_frac": 0.0, "code/error_frac": 0.0}
    with pytest.raises(KeyError, match="tests_column"):
        verifier(prompts=["p"], completions=["x"], answer=["1"])


def test_custom_tests_column_and_batch_order():
    custom = CodeVerifier(tests_column="unit_tests", workers=2, limits=SandboxLimits(timeout=2.0))
    try:
        completions = [f"def f():\n    return {i}" for i in range(12)]
        rewards = custom(prompts=None, completions=completions, unit_tests=["assert f() % 3 == 0"] * 12)
        assert rewards == [1.0 if i % 3 == 0 else 0.0 for i in range(12)]
    finally:
        custom.pool.close()


def test_humaneval_reward_with_body_and_full_function_completions(verifier):
    task = next(t for t in humaneval() if t["task_id"] == "HumanEval/0")
    body = task["canonical_solution"]
    full = (
        task["prompt"].split("def ")[0]
        + "```python\ndef has_close_elements(numbers, threshold):\n"
        + body
        + "```"
    )
    wrong = "    return False\n"
    columns = {"test": [task["test"]] * 3, "entry_point": [task["entry_point"]] * 3}
    assert verifier([task["prompt"]] * 3, [body, full, wrong], **columns) == [1.0, 1.0, 0.0]


def test_canonical_solutions_sample(verifier):
    """Every 4th HumanEval and every 8th MBPP canonical solution passes (all of them: the slow test)."""
    he, mb = humaneval()[::4], mbpp()[::8]
    check_canonical(he, mb)


@pytest.mark.slow
def test_all_canonical_solutions():
    check_canonical(humaneval(), mbpp())


def check_canonical(he: list[dict], mb: list[dict]) -> None:
    verifier = CodeVerifier(limits=GENEROUS)
    results = verifier.run(
        [t["prompt"] for t in he],
        [t["canonical_solution"] for t in he],
        test=[t["test"] for t in he],
        entry_point=[t["entry_point"] for t in he],
    )
    failures = [(t["task_id"], r) for t, r in zip(he, results) if not r.passed]
    results = verifier.run(
        None,
        [t["code"] for t in mb],
        test_list=[t["test_list"] for t in mb],
        test_imports=[t["test_imports"] for t in mb],
    )
    failures += [(f"MBPP/{t['task_id']}", r) for t, r in zip(mb, results) if not r.passed]
    print(f"canonical solutions: {len(he) + len(mb) - len(failures)}/{len(he) + len(mb)} passed")
    assert failures == []
