"""The synthetic-task protocol and registry, the subset-sum task, and tasks as one file each."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from filtered_rl.synthetic.tasks import TASKS, SyntheticTask, UnknownNameError, get_task
from filtered_rl.synthetic.tasks.subset_sum import (
    SubsetSumVerifier,
    eligible_targets,
    enumerate_solutions,
    format_prompt,
    make_subset_sum_dataset,
    verify_subset_sum,
)

REPO = Path(__file__).resolve().parents[1]

# --- Registry --------------------------------------------------------------------------------------


def test_registry_finds_the_task_modules_and_names_them_on_a_miss():
    assert {"countdown", "countdown_hard", "subset_sum"} <= set(TASKS)
    assert isinstance(TASKS["subset_sum"], SyntheticTask) and get_task("subset_sum") is TASKS["subset_sum"]
    assert get_task(TASKS["countdown"]) is TASKS["countdown"]
    with pytest.raises(ValueError, match="countdown.*subset_sum|subset_sum.*countdown") as error:
        get_task("sudoku")
    assert isinstance(error.value, UnknownNameError) and "sudoku" in str(error.value)


# Tasks whose prompt pool takes about a minute to enumerate (countdown_hard: 715 number sets, every
# expression of each): their protocol check runs in the slow suite.
SLOW_TASKS = {"countdown_hard"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TASKS else n for n in TASKS]
)
def test_every_registered_task_keeps_the_protocol(name):
    """Each task's train/test prompts are disjoint, its verifier accepts the example and each listed
    answer, and `answer_key` of a valid answer is one of the enumerated answers."""
    task = get_task(name)
    prompt, completion = task.example()
    assert isinstance(prompt, str) and 0 < len(completion) <= task.max_completion_length
    splits = task.make_dataset(8, 4, seed=1, with_solutions=True)
    train, test = splits["train"], splits["test"]
    assert len(train) == 8 and len(test) == 4
    assert not set(train["prompt_id"]) & set(task.make_dataset(0, 20, seed=2)["test"]["prompt_id"])
    assert {"prompt", "prompt_id", "num_solutions", task.verifier().gold_column} <= set(train.column_names)
    for row in train.select(range(3)):
        valid = task.enumerate_valid(row)
        assert len(valid) == row["num_solutions"] > 0
        answer = sorted(valid)[0]
        assert task.is_valid(answer, row) and task.answer_key(answer, row) in valid
        assert not task.is_valid("no answer", row)
        rng = random.Random(0)
        assert task.is_valid(task.corpus_completion(row, rng, valid=True), row)


def test_unknown_task_options_are_named():
    with pytest.raises(ValueError, match="max_nmber"):
        get_task("subset_sum").make_dataset(1, 1, max_nmber=5)


# --- Subset sum -------------------------------------------------------------------------------------

NUMBERS, TARGET = [19, 15, 12, 8, 7, 5, 3], 27


def test_subset_sum_verifier_rules():
    for valid in ("19+8", "19+5+3", "15+12", "12+8+7", " 15+7+5\n"):  # surrounding whitespace only
        assert verify_subset_sum(valid, NUMBERS, TARGET), valid
    for wrong in (
        "19+7",  # well formed, wrong sum
        "8+19",  # not in decreasing order: each answer has one spelling
        "15+12+0",
        "12+12+3",  # a number twice
        "20+7",  # not in the list
        "19 + 8",
        "19+08",
        "19-8+8+8",
        "27",
        "",
        "+19+8",
        "19+8+",
        "1" * 100,
    ):
        assert not verify_subset_sum(wrong, NUMBERS, TARGET), wrong
    assert not verify_subset_sum(None, NUMBERS, TARGET)  # type: ignore[arg-type]
    row = {"numbers": NUMBERS, "target": TARGET}
    assert SubsetSumVerifier().answer_key(" 19+8 ", row) == "19+8"
    assert SubsetSumVerifier().answer_key("8+19", row) is None


def test_enumeration_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        numbers = sorted(rng.sample(range(1, 20), rng.randint(3, 9)), reverse=True)
        target = rng.randint(1, sum(numbers))
        brute = {
            "+".join(map(str, combo))
            for k in range(1, len(numbers) + 1)
            for combo in itertools.combinations(numbers, k)
            if sum(combo) == target
        }
        listed = enumerate_solutions(numbers, target)
        assert set(listed) == brute and len(listed) == len(brute)
        assert all(verify_subset_sum(answer, numbers, target) for answer in listed)


def test_enumeration_lists_greedy_answers_first():
    listed = enumerate_solutions(NUMBERS, TARGET)
    assert listed[0] == "19+8"  # largest numbers first
    keys = [tuple(-int(p) for p in answer.split("+")) for answer in listed]
    assert keys == sorted(keys)


def test_subset_sum_dataset_meets_the_study_requirements():
    """Defaults: >= 30 valid answers per prompt on average, short answers, fixed train/test split."""
    data = make_subset_sum_dataset(300, 80, seed=0, with_solutions=True)
    counts = list(data["train"]["num_solutions"]) + list(data["test"]["num_solutions"])
    assert min(counts) >= 10 and sum(counts) / len(counts) >= 30
    longest = max(len(a) for split in data.values() for answers in split["solutions"] for a in answers)
    assert longest <= get_task("subset_sum").max_completion_length
    assert not set(data["train"]["prompt_id"]) & set(data["test"]["prompt_id"])
    ids = list(data["train"]["prompt_id"])
    assert ids == list(make_subset_sum_dataset(300, 0, seed=0)["train"]["prompt_id"])
    assert ids != list(make_subset_sum_dataset(300, 0, seed=1)["train"]["prompt_id"])
    row = data["test"][0]
    assert row["prompt"] == format_prompt(row["numbers"], row["target"])
    assert row["numbers"] == sorted(row["numbers"], reverse=True) and len(set(row["numbers"])) == 12
    assert max(row["numbers"]) < row["target"] <= sum(row["numbers"]) // 2
    assert row["target"] in eligible_targets(row["numbers"])


def test_subset_sum_corpus_is_skewed_and_its_near_misses_are_well_formed():
    task = get_task("subset_sum")
    row = task.make_dataset(1, 0, seed=3, with_solutions=True)["train"][0]
    rng = random.Random(0)
    valid = [task.corpus_completion(row, rng, valid=True) for _ in range(2000)]
    first, last = row["solutions"][0], row["solutions"][-1]
    assert valid.count(first) > 10 * max(1, valid.count(last))  # greedy answers dominate
    assert len(set(valid)) >= 5  # but not only one answer
    verifier = SubsetSumVerifier()
    for _ in range(300):
        miss = task.corpus_completion(row, rng, valid=False)
        assert verifier.answer_key(miss, row) == miss  # a well-formed answer over the numbers...
        assert not task.is_valid(miss, row)  # ...with the wrong sum


def test_subset_sum_through_load_task():
    from filtered_rl.data import load_task

    task = load_task("subset_sum", limit=5, seed=0)
    assert task.kind == "subset_sum" and not task.conversational and len(task.dataset) == 5
    row = task.dataset[0]
    answers = task.valid_answers(row)
    assert len(answers) == row["num_solutions"]
    answer = sorted(answers)[0]
    columns = {k: [v] for k, v in row.items()}
    assert task.verifier([row["prompt"]], [answer], **columns) == [1.0]
    assert task.verifier([row["prompt"]], ["1+2+3+4+5+6"], **columns) == [0.0]
    train = load_task("subset_sum", split="train", task_options={"num_train": 7, "min_solutions": 20})
    assert len(train.dataset) == 7 and min(train.dataset["num_solutions"]) >= 20


def test_subset_sum_end_to_end_on_a_tiny_budget(tmp_path):
    """Pretrain a few steps, sample, verify, enumerate: every valid sample is an enumerated answer."""
    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.report import validity_report

    options = dict(steps=4, batch_size=8, corpus_prompts=16, warmup_steps=1)
    path = load_or_pretrain("nano", seed=0, cache_dir=tmp_path, task="subset_sum", progress=False, **options)
    assert path.name.startswith("subset_sum-nano-seed0-")
    task = get_task("subset_sum")
    test = task.make_dataset(0, 3, seed=0)["test"]
    report = validity_report(path, test, num_samples=4, task="subset_sum")
    assert report["task"] == "subset_sum" and report["num_prompts"] == 3
    for row, result in zip(test, report["per_prompt"]):
        assert set(result["valid_answers"]) <= task.enumerate_valid(row)
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(path).max_new_tokens == task.max_completion_length


# --- A task is one file ------------------------------------------------------------------------------

ONE_FILE_TASK = '''
"""A throwaway task: write two digits (first >= second) that add up to the prompt's number."""

import hashlib

from filtered_rl.synthetic.tasks import SyntheticTask, register_task
from filtered_rl.verifiers.base import BinaryVerifier


def answers(n):
    return {f"{a}+{n - a}" for a in range(1, 10) if 1 <= n - a <= a}


class PairVerifier(BinaryVerifier):
    __name__ = "pair"
    gold_column = "target"

    def score(self, text, gold, row):
        return float(text.strip() in answers(int(gold)))


@register_task
class PairTask(SyntheticTask):
    name = "pair"
    max_completion_length = 4
    verifier_class = PairVerifier

    def make_dataset(self, num_train, num_test, *, seed=0, with_solutions=False, **options):
        from datasets import Dataset, DatasetDict

        rows = {"train": [], "test": []}
        for n in range(2, 19):
            test = hashlib.sha256(str(n).encode()).digest()[0] < 64
            row = {"prompt": f"{n}=", "target": n, "prompt_id": f"pair-{n}", "num_solutions": len(answers(n))}
            if with_solutions:
                row["solutions"] = sorted(answers(n))
            rows["test" if test else "train"].append(row)
        return DatasetDict({"train": Dataset.from_list(rows["train"][:num_train] or rows["train"][:1]),
                            "test": Dataset.from_list(rows["test"][:num_test] or rows["test"][:1])})

    def example(self):
        return "5=", "4+1"

    def corpus_completion(self, row, rng, valid):
        return rng.choice(row["solutions"]) if valid else f"{rng.randint(1, 9)}+{rng.randint(1, 9)}"

    def enumerate_valid(self, row):
        return answers(row["target"])
'''

ONE_FILE_CHECK = """
import sys
import filtered_rl.synthetic.tasks as tasks

tasks.__path__.append(sys.argv[1])  # as if pair.py had been added to the package
from filtered_rl.cli import main
from filtered_rl.data import load_task
from filtered_rl.synthetic.base_model import make_config

assert "pair" in tasks.TASKS, list(tasks.TASKS)
task = load_task("pair", split="train", limit=3)
row = task.dataset[0]
assert task.kind == "pair" and task.valid_answers(row) == tasks.TASKS["pair"].enumerate_valid(row)
assert task.verifier([row["prompt"]], [sorted(task.valid_answers(row))[0]], target=[row["target"]]) == [1.0]
assert make_config(task="pair").cache_key().startswith("pair-nano-seed0-")
code = main(["pretrain", "--task", "pair", "--steps", "2", "--batch-size", "4", "--no-progress",
             "--output-dir", sys.argv[2]])
assert code == 0
print("one file is enough")
"""


def test_a_new_task_is_one_file(tmp_path):
    """Dropping one module into the tasks package registers the task everywhere: the registry,
    load_task (hence eval and recipes), the base-model factory and `filtered-rl pretrain --task`."""
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "pair.py").write_text(textwrap.dedent(ONE_FILE_TASK))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ONE_FILE_CHECK, str(tmp_path / "extra"), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "one file is enough" in result.stdout
    assert (tmp_path / "model" / "config.json").exists()


def test_countdown_hard_is_its_own_task_with_its_own_base_model():
    """The harder countdown shares countdown's grammar and verifier but not its options or its cache key
    (a base model of one is never taken for the other's)."""
    from filtered_rl.synthetic.base_model import make_config

    easy, hard = get_task("countdown"), get_task("countdown_hard")
    assert hard.default_options["max_number"] > easy.default_options["max_number"]
    assert hard.default_options["min_solutions"] >= 20 and hard.default_options["max_target"] == 64
    row = {"numbers": [5, 4, 3, 2], "target": 9}
    assert hard.is_valid("(3-2)*(5+4)", row) and not hard.is_valid("5+4+3", row)
    keys = {make_config("nano", 0, task=name).cache_key() for name in ("countdown", "countdown_hard")}
    assert len(keys) == 2 and any(key.startswith("countdown_hard-") for key in keys)
