"""The countdown task: verifier soundness and safety, canonical answers, enumeration, datasets."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from filtered_rl.synthetic.tasks.countdown import (
    MAX_NUMBER,
    MAX_TARGET,
    MIN_SOLUTIONS,
    NUM_NUMBERS,
    CountdownVerifier,
    canonical_answer,
    enumerate_solutions,
    extract_expression,
    is_test_prompt,
    make_countdown_dataset,
    parse_answer,
    prompt_pool_size,
    random_expression,
    verify_countdown,
)

NUMBERS, TARGET = [3, 5, 7, 9], 24


@pytest.mark.parametrize(
    "answer",
    [
        "(7-5)*(9+3)",
        "9+7+5+3",
        "3 + 5 + 7 + 9",
        "9*(5-7/3)",
        "(9+3)*(7-5)",
        "((9+3))*(7-5)",
        "  9+5*3  ",
        "9+5*3\nthat is 24",
        "9+5*3<|im_end|>",
    ],
)
def test_valid_answers(answer):
    assert verify_countdown(answer, NUMBERS, TARGET)


@pytest.mark.parametrize(
    "answer",
    [
        "9+7",
        "9+7+5",  # wrong value
        "8*3",
        "24",
        "9+15",  # numbers that are not given
        "9+9+3+3",
        "3*(5+3)",  # a number used twice
        "9+7+5+3+0",  # 0 is not given either
    ],
)
def test_wrong_answers(answer):
    assert not verify_countdown(answer, NUMBERS, TARGET)


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "\n9+7+5+3x",
        "(9+7+5+3",
        "9+7+5+3)",
        "9 7",
        "9++7+5+3",
        "9+7+5+3+",
        "-3+9+7+5+6",
        "+9+7+5+3",
        "9+7+5+(-3)",
        "09+7+5+3",
        "9.0+7+5+3",
        "1e1+9+5",
        "0x18",
        "9+7+5+3=24",
        "9+7;5+3",
    ],
)
def test_malformed_answers(answer):
    assert not verify_countdown(answer, NUMBERS, TARGET)


@pytest.mark.parametrize(
    "answer",
    [
        "__import__('os').system('true')",
        "3**3-3",
        "9//3*8",
        "9%5*6",
        "[9+7+5+3][0]",
        "(9+7+5+3).real",
        "lambda: 24",
        "9 if 1 else 3",
        "not 0",
        "9+7+5+3 and 24",
        "int('24')",
        "x",
        "True*24",
        "9 << 1",
        "f'{24}'",
        "b'24'",
        "'24'",
        "24j",
    ],
)
def test_hostile_answers_are_rejected(answer):
    numbers = NUMBERS + [24, 1, 2, 3, 0]
    assert not verify_countdown(answer, numbers, TARGET)


def test_division_by_zero_is_invalid_not_an_error():
    assert not verify_countdown("9/(5-5)", [9, 5, 5], 0)
    assert not verify_countdown("(9-9)/(5-5)", [9, 9, 5, 5], 1)


def test_huge_and_deeply_nested_inputs_are_rejected_quickly():
    hostile = [
        "1+" * 1_000_000 + "1",
        "(" * 100_000 + "3" + ")" * 100_000,
        "(" * 300 + "9+7+5+3" + ")" * 300,  # beyond the length cap
        "9" * 100_000,
        "9+7+5+3" + "+" * 1_000_000,
    ]
    padded = [" " * 1_000_000 + "9+7+5+3", "9+7+5+3" + " " * 1_000_000 + "\nrest"]  # whitespace is fine
    started = time.perf_counter()
    for text in hostile:
        assert not verify_countdown(text, NUMBERS, TARGET)
    for text in padded:
        assert verify_countdown(text, NUMBERS, TARGET)
    # Not a speed benchmark: a safety bound (quadratic or exponential work would take minutes).
    assert time.perf_counter() - started < 2.0


def test_redundant_parentheses_within_the_length_cap_are_fine():
    assert verify_countdown("(" * 100 + "9+7+5+3" + ")" * 100, NUMBERS, TARGET)


def test_non_string_completions_are_invalid():
    assert not verify_countdown(None, NUMBERS, TARGET)
    assert not verify_countdown(24, NUMBERS, TARGET)


def test_extract_expression():
    assert extract_expression("  9+5*3 \n junk") == "9+5*3"
    assert extract_expression("\n\n9+5*3") == "9+5*3"
    assert extract_expression("9+5*3<|im_end|><|endoftext|>") == "9+5*3"


# --- Canonical answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, numbers",
    [
        ("3+4", "4+3", [3, 4]),
        ("2*(3*4)", "4*3*2", [2, 3, 4]),
        ("(2*3)*4", "2*(4*3)", [2, 3, 4]),
        ("9-(5-2)", "9+2-5", [9, 5, 2]),
        ("9-(5+2)", "9-2-5", [9, 5, 2]),
        ("8/(4/2)", "8*2/4", [8, 4, 2]),
        ("8/(4*2)", "8/2/4", [8, 4, 2]),
        ("(7-5)*(9+3)", "(3+9)*(7-5)", NUMBERS),
    ],
)
def test_commutative_associative_rewrites_are_the_same_answer(a, b, numbers):
    assert canonical_answer(a, numbers) == canonical_answer(b, numbers) is not None


@pytest.mark.parametrize(
    "a, b, numbers",
    [
        ("(2+3)*4", "2*4+3*4", [2, 3, 4, 4]),  # distributivity: a different computation
        ("9-5", "5-9", [9, 5]),
        ("8/4", "4/8", [8, 4]),
        ("7*1", "7/1", [7, 1]),
    ],
)
def test_different_computations_are_different_answers(a, b, numbers):
    assert canonical_answer(a, numbers) != canonical_answer(b, numbers)


def test_canonical_answer_is_idempotent_and_preserves_value():
    rng = random.Random(0)
    for _ in range(300):
        numbers = [rng.randint(1, 12) for _ in range(rng.randint(2, 5))]
        text = random_expression(numbers, rng)
        canon = canonical_answer(text, numbers)
        assert canon is not None
        assert canonical_answer(canon, numbers) == canon
        assert parse_answer(canon, numbers)[1] == parse_answer(text, numbers)[1]


def test_canonical_answer_rejects_non_answers():
    assert canonical_answer("3+3", [3, 4]) is None
    assert canonical_answer("3**4", [3, 4]) is None
    assert canonical_answer("hello", [3, 4]) is None


# --- Enumeration ----------------------------------------------------------------------------------------


def _all_trees(values: tuple[int, ...]):
    """Every fully parenthesised expression over `values` in this order, with its exact value."""
    if len(values) == 1:
        yield str(values[0]), Fraction(values[0])
        return
    for split in range(1, len(values)):
        for left, lv in _all_trees(values[:split]):
            for right, rv in _all_trees(values[split:]):
                yield f"({left}+{right})", lv + rv
                yield f"({left}-{right})", lv - rv
                yield f"({left}*{right})", lv * rv
                if rv != 0:
                    yield f"({left}/{right})", lv / rv


def _brute_force(numbers: list[int], target: int) -> set[str]:
    found = set()
    for size in range(1, len(numbers) + 1):
        for chosen in itertools.permutations(numbers, size):
            for text, value in _all_trees(chosen):
                if value == target:
                    found.add(canonical_answer(text, numbers))
    return found


@pytest.mark.parametrize(
    "numbers, target", [([1, 2, 3], 6), ([2, 3, 4], 2), ([2, 2, 5], 1), ([3, 4, 6, 8], 24)]
)
def test_enumeration_matches_brute_force(numbers, target):
    expected = _brute_force(numbers, target)
    assert enumerate_solutions(numbers, target) == expected
    assert len(expected) >= 2


def test_enumeration_tiny_instance_by_hand():
    assert enumerate_solutions([1, 2], 3) == {"2+1"}
    assert enumerate_solutions([1, 2], 2) == {"2", "2*1", "2/1"}
    assert enumerate_solutions([1, 2], 5) == set()


def test_every_enumerated_solution_verifies():
    rng = random.Random(1)
    for _ in range(10):
        numbers = [rng.randint(1, 9) for _ in range(4)]
        for target in (rng.randint(1, 40), 10, 24):
            for answer in enumerate_solutions(numbers, target):
                assert verify_countdown(answer, numbers, target), (answer, numbers, target)


def test_enumeration_of_a_four_number_instance_is_fast():
    numbers = [2, 3, 7, 11]  # not used elsewhere: no cache hit
    started = time.perf_counter()
    solutions = enumerate_solutions(numbers, 17)
    assert time.perf_counter() - started < 1.0  # a safety bound, not a speed benchmark
    assert "11+7+2-3" in solutions


# --- Datasets ---------------------------------------------------------------------------------------------


def test_dataset_columns_and_invariants(countdown_data):
    assert set(countdown_data) == {"train", "test"}
    assert (len(countdown_data["train"]), len(countdown_data["test"])) == (64, 32)
    for split in ("train", "test"):
        for row in countdown_data[split]:
            assert row["prompt"] == f"{' '.join(map(str, row['numbers']))} -> {row['target']}:"
            assert row["numbers"] == sorted(row["numbers"], reverse=True)
            assert len(row["numbers"]) == NUM_NUMBERS and all(1 <= n <= MAX_NUMBER for n in row["numbers"])
            assert row["target"] not in row["numbers"] and 1 <= row["target"] <= MAX_TARGET
            assert (
                row["num_solutions"]
                == len(enumerate_solutions(row["numbers"], row["target"]))
                >= MIN_SOLUTIONS
            )
            assert is_test_prompt(row["prompt_id"]) == (split == "test")
    train_ids = set(countdown_data["train"]["prompt_id"])
    assert len(train_ids) == 64 and not train_ids & set(countdown_data["test"]["prompt_id"])


def test_dataset_is_deterministic_and_seeded():
    a = make_countdown_dataset(20, 5, seed=3)
    b = make_countdown_dataset(20, 5, seed=3)
    c = make_countdown_dataset(20, 5, seed=4)
    assert a["train"]["prompt"] == b["train"]["prompt"] and a["test"]["prompt"] == b["test"]["prompt"]
    assert a["train"]["prompt"] != c["train"]["prompt"]


def test_test_prompts_never_appear_in_any_train_split():
    test_ids = set(make_countdown_dataset(0, 40, seed=0)["test"]["prompt_id"])
    train_ids = set(make_countdown_dataset(300, 0, seed=0)["train"]["prompt_id"])
    train_ids |= set(make_countdown_dataset(300, 0, seed=7)["train"]["prompt_id"])
    assert len(test_ids) == 40 and not test_ids & train_ids


def test_difficulty_knobs():
    data = make_countdown_dataset(
        10, 2, num_numbers=3, max_number=6, max_target=20, min_solutions=2, with_solutions=True, seed=0
    )
    for row in data["train"]:
        assert len(row["numbers"]) == 3 and max(row["numbers"]) <= 6 and row["target"] <= 20
        assert set(row["solutions"]) == enumerate_solutions(row["numbers"], row["target"])
        assert len(row["solutions"]) >= 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_train=-1, num_test=1), "num_train"),
        (dict(num_train=1, num_test=1, num_numbers=1), "num_numbers"),
        (dict(num_train=1, num_test=1, num_numbers=9), "num_numbers"),
    ],
)
def test_bad_dataset_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_countdown_dataset(**kwargs)


def test_whole_pool_can_be_requested_and_more_fails_clearly():
    sizes = prompt_pool_size()
    assert sizes == {"train": 638, "test": 168}  # the default task; docs quote these figures
    data = make_countdown_dataset(0, sizes["test"], seed=5)
    assert len(set(data["test"]["prompt_id"])) == sizes["test"]
    with pytest.raises(ValueError, match="only 168 distinct test prompts"):
        make_countdown_dataset(0, sizes["test"] + 1)
    with pytest.raises(ValueError, match="distinct train prompts"):
        make_countdown_dataset(500, 0, num_numbers=2, max_number=3, min_solutions=1)


# --- Verifier as a TRL reward function ---------------------------------------------------------------------


def test_countdown_verifier_reward_function():
    reward = CountdownVerifier()
    assert reward.__name__ == "countdown"
    prompts = ["9 7 5 3 -> 24:"] * 3 + ["3 2 1 -> 6:"]
    completions = ["9+7+5+3", "9+7", [{"role": "assistant", "content": "(7-5)*(9+3)"}], "3*2*1"]
    numbers = [NUMBERS] * 3 + [[1, 2, 3]]
    targets = [24, 24, 24, 6]
    assert reward(
        prompts=prompts, completions=completions, numbers=numbers, target=targets, trainer_state=None
    ) == [1.0, 0.0, 1.0, 1.0]
    assert reward(prompts=prompts[:1], completions=["9+7+5+3"], numbers=[NUMBERS], target=[None]) == [None]
    assert reward.answer_key("3+5+7+9", {"numbers": NUMBERS}) == reward.answer_key(
        "9+7+5+3", {"numbers": NUMBERS}
    )
    assert reward.answer_key("what", {"numbers": NUMBERS}) is None


def test_countdown_verifier_names_missing_columns():
    with pytest.raises(KeyError, match="numbers"):
        CountdownVerifier()(prompts=["p"], completions=["9+7+5+3"], target=[24])
    with pytest.raises(KeyError, match="target"):
        CountdownVerifier()(prompts=["p"], completions=["9+7+5+3"], numbers=[NUMBERS])


def test_verifiers_package_is_only_importable_as_filtered_rl_verifiers(tmp_path):
    """The tree matches the import path, and no top-level `verifiers` module of ours exists anywhere."""
    import filtered_rl.verifiers

    repo = Path(__file__).resolve().parents[1]
    ours = repo / "filtered_rl" / "verifiers"
    assert Path(filtered_rl.verifiers.__file__).resolve().parent == ours
    code = "import verifiers, os; print(os.path.dirname(os.path.abspath(verifiers.__file__)))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cwd in (tmp_path, repo, repo / "tests", repo.parent):
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
        )
        if result.returncode == 0:  # a PyPI package named `verifiers` may be installed: it must not be ours
            assert Path(result.stdout.strip()).resolve() != ours, cwd
            assert not Path(result.stdout.strip()).resolve().is_relative_to(repo), cwd
        else:
            assert "ModuleNotFoundError" in result.stderr, (cwd, result.stderr)
