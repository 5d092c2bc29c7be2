"""The synthetic *subset sum* task: pick some of the given numbers so that they add up to the target.

A prompt lists distinct numbers in decreasing order and a target, e.g.
``24 21 19 17 15 14 12 11 8 7 5 3 -> 75:``; an answer is a subset written in decreasing order and
joined by ``+``, e.g. ``24+21+19+11``. Built for the diversity study:

- many valid answers per prompt (~40 on average at the defaults), all of them enumerable, and each
  answer has exactly one spelling (the order is fixed), so the enumerated set *is* the set of valid
  completions: exact evaluation (`filtered_rl.evaluation.exact`) misses no valid mass;
- a base model that learns the format fully and the arithmetic partly, so its per-prompt validity
  A(x) spreads over orders of magnitude and some held-out prompts stay rarely solved even with
  hundreds of samples;
- a skewed base distribution over the valid answers: the pretraining corpus draws valid answers with
  weight ``exp(-skew * rank)``, where rank orders a prompt's answers greedily (largest numbers first),
  so p* = a·v / A favours a few "greedy" answers and has a long tail of others.

Rules, decided once here and shared by the verifier: the completion, stripped, must be numbers from
the prompt, each at most once, in strictly decreasing order, joined by ``+`` with nothing else (no
spaces, no other operators, no leading zeros), adding up to the target. Whether a prompt is a test
prompt is a fixed function of its text (a hash), so no test prompt ever appears in any train split
(the pretraining corpus) whatever the sizes and seeds.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from filtered_rl.synthetic.tasks import SyntheticTask, register_task
from filtered_rl.verifiers.base import BinaryVerifier

# Defaults: 12 distinct numbers from 1..M, M drawn per prompt from MAX_NUMBERS, and a target in
# (max number, total/2] with at least 10 answers. Dense sets of small numbers (M = 16) have ~60
# answers and are easy; sparse sets of two-digit numbers (M = 99) have ~14 and are hard: the mix is
# what spreads the base model's per-prompt validity over orders of magnitude.
NUM_NUMBERS = 12
MAX_NUMBERS = (16, 20, 32, 64, 99)
MIN_SOLUTIONS = 10
SKEW = 0.3
TEST_FRACTION = 0.2
MAX_ANSWER_CHARS = 64  # longer text is rejected before parsing
_ANSWER = re.compile(r"[1-9][0-9]*(?:\+[1-9][0-9]*)*")


# --- Answers ----------------------------------------------------------------------------------------


def format_answer(subset: Sequence[int]) -> str:
    """The one spelling of a subset: decreasing order, joined by ``+``."""
    return "+".join(str(n) for n in sorted(subset, reverse=True))


def parse_answer(completion: str, numbers: Sequence[int]) -> tuple[int, ...] | None:
    """The subset a completion names (decreasing), or None if it is not a well-formed answer over `numbers`.

    Never raises on text; bounded work (the length is capped before the regular expression runs).
    """
    if not isinstance(completion, str) or len(completion) > MAX_ANSWER_CHARS:
        return None
    text = completion.strip()
    if not _ANSWER.fullmatch(text):
        return None
    parts = tuple(int(p) for p in text.split("+"))
    if any(a <= b for a, b in zip(parts, parts[1:])):  # strictly decreasing: one spelling per answer
        return None
    available = set(int(n) for n in numbers)
    if any(p not in available for p in parts):
        return None
    return parts


def verify_subset_sum(completion: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `completion` is a subset of `numbers` in decreasing order joined by ``+`` summing to `target`."""
    parts = parse_answer(completion, numbers)
    return parts is not None and sum(parts) == int(target)


@lru_cache(maxsize=65536)
def _solutions(numbers: tuple[int, ...], target: int) -> tuple[tuple[int, ...], ...]:
    """Every subset of `numbers` (distinct, decreasing) summing to `target`, greedy order first.

    Depth-first over the numbers from the largest, taking a number before skipping it: the first
    solution found is the greedy one, and the order is lexicographic on the decreasing tuples, largest
    first. Branches that cannot reach the target with the numbers left are cut.
    """
    suffix = [0] * (len(numbers) + 1)
    for i in range(len(numbers) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + numbers[i]
    out: list[tuple[int, ...]] = []

    def walk(i: int, remaining: int, chosen: list[int]) -> None:
        if remaining == 0:
            out.append(tuple(chosen))
            return
        if i == len(numbers) or suffix[i] < remaining:
            return
        if numbers[i] <= remaining:
            chosen.append(numbers[i])
            walk(i + 1, remaining - numbers[i], chosen)
            chosen.pop()
        walk(i + 1, remaining, chosen)

    walk(0, target, [])
    return tuple(out)


def enumerate_solutions(numbers: Sequence[int], target: int) -> list[str]:
    """Every valid answer, as its one spelling, greedy order first (the order the corpus skew uses)."""
    key = tuple(sorted((int(n) for n in numbers), reverse=True))
    return [format_answer(s) for s in _solutions(key, int(target))]


def _sum_counts(numbers: tuple[int, ...]) -> list[int]:
    """counts[s] = number of subsets of `numbers` summing to s (dynamic programming over the sums)."""
    counts = [1] + [0] * sum(numbers)
    for n in numbers:
        for s in range(len(counts) - 1, n - 1, -1):
            counts[s] += counts[s - n]
    return counts


# --- Prompts and datasets ---------------------------------------------------------------------------


def format_prompt(numbers: Sequence[int], target: int) -> str:
    """Plain-text prompt, e.g. ``24 21 19 8 5 -> 45:``: numbers in decreasing order, as answers list them."""
    return f"{' '.join(str(n) for n in sorted(numbers, reverse=True))} -> {target}:"


def prompt_id(numbers: Sequence[int], target: int) -> str:
    return f"subset_sum-{'-'.join(str(n) for n in sorted(numbers))}-to-{target}"


def is_test_prompt(pid: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Fixed train/test partition of all prompts, independent of any call's sizes or seed."""
    digest = int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "big")
    return digest < test_fraction * 2**64


def eligible_targets(numbers: Sequence[int], min_solutions: int = MIN_SOLUTIONS) -> list[int]:
    """Targets in (max(numbers), sum(numbers) // 2] with at least `min_solutions` answers.

    Above the half sum, the complements of the answers are the answers of sum − target: no new prompt.
    Above the largest number, no answer is a single number.
    """
    numbers = tuple(sorted(numbers, reverse=True))
    counts = _sum_counts(numbers)
    return [t for t in range(numbers[0] + 1, sum(numbers) // 2 + 1) if counts[t] >= min_solutions]


def make_subset_sum_dataset(
    num_train: int,
    num_test: int,
    *,
    num_numbers: int = NUM_NUMBERS,
    max_numbers: Sequence[int] = MAX_NUMBERS,
    min_solutions: int = MIN_SOLUTIONS,
    seed: int = 0,
    with_solutions: bool = False,
) -> Any:
    """Subset-sum prompts as a `datasets.DatasetDict` with splits ``train`` and ``test``.

    Columns: ``prompt``, ``numbers`` (list[int], decreasing), ``target``, ``prompt_id``,
    ``num_solutions``; with ``with_solutions=True`` also ``solutions`` (every valid answer, greedy
    order first). Each prompt: M drawn uniformly from `max_numbers`, `num_numbers` distinct numbers
    drawn uniformly from 1..M, then a target uniformly among `eligible_targets`. Every prompt appears
    at most once.
    """
    from datasets import Dataset, DatasetDict

    for name, value, low in (
        ("num_train", num_train, 0),
        ("num_test", num_test, 0),
        ("num_numbers", num_numbers, 2),
        ("min_solutions", min_solutions, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_subset_sum_dataset: {name} must be an integer >= {low}, got {value!r}")
    max_numbers = [max_numbers] if isinstance(max_numbers, int) else list(max_numbers)
    if not max_numbers or not all(isinstance(m, int) and m >= num_numbers for m in max_numbers):
        raise ValueError(
            f"make_subset_sum_dataset: max_numbers must be integers >= num_numbers={num_numbers} "
            f"(distinct numbers from 1..M), got {max_numbers!r}"
        )
    if num_numbers > 20:
        raise ValueError(
            f"make_subset_sum_dataset: num_numbers={num_numbers} is too many to enumerate; use <= 20"
        )

    rng = random.Random(f"subset_sum:{seed}")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    need = {"train": num_train, "test": num_test}
    seen: set[str] = set()
    attempts, max_attempts = 0, 50 * (num_train + num_test) + 1000
    while (need["train"] or need["test"]) and attempts < max_attempts:
        attempts += 1
        largest = rng.choice(max_numbers)
        numbers = tuple(sorted(rng.sample(range(1, largest + 1), num_numbers), reverse=True))
        targets = eligible_targets(numbers, min_solutions)
        if not targets:
            continue
        target = rng.choice(targets)
        pid = prompt_id(numbers, target)
        split = "test" if is_test_prompt(pid) else "train"
        if pid in seen or not need[split]:
            continue
        seen.add(pid)
        need[split] -= 1
        solutions = enumerate_solutions(numbers, target)
        row = {
            "prompt": format_prompt(numbers, target),
            "numbers": list(numbers),
            "target": target,
            "prompt_id": pid,
            "num_solutions": len(solutions),
        }
        if with_solutions:
            row["solutions"] = solutions
        rows[split].append(row)
    if need["train"] or need["test"]:
        raise ValueError(
            f"make_subset_sum_dataset: found only {num_train - need['train']} train / "
            f"{num_test - need['test']} test prompts with >= {min_solutions} answers in {attempts} draws; "
            f"lower min_solutions or raise num_numbers, or lower max_numbers"
        )
    columns = ["prompt", "numbers", "target", "prompt_id", "num_solutions"] + (
        ["solutions"] if with_solutions else []
    )
    return DatasetDict(
        {
            split: Dataset.from_list(split_rows)
            if split_rows
            else Dataset.from_dict({c: [] for c in columns})
            for split, split_rows in rows.items()
        }
    )


# --- Verifier ---------------------------------------------------------------------------------------


class SubsetSumVerifier(BinaryVerifier):
    """TRL reward function for subset-sum datasets (columns ``numbers`` and ``target``).

    An answer has one spelling, so `answer_key` is the stripped completion of a well-formed answer.
    """

    __name__ = "subset_sum"
    gold_column = "target"
    numbers_column = "numbers"

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        if gold is None:
            return None
        return 1.0 if verify_subset_sum(text, self._numbers(row), int(gold)) else 0.0

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        parts = parse_answer(text, self._numbers(row))
        return None if parts is None else format_answer(parts)

    def _numbers(self, row: dict[str, Any]) -> Sequence[int]:
        if self.numbers_column not in row:
            raise KeyError(
                f"{self.__name__}: the dataset has no column {self.numbers_column!r} listing the numbers; "
                f"build it with filtered_rl.synthetic.tasks.subset_sum.make_subset_sum_dataset "
                f"(columns seen: {sorted(row)})"
            )
        return row[self.numbers_column]


# --- The registered task ----------------------------------------------------------------------------


@register_task
class SubsetSumTask(SyntheticTask):
    """Subset sum: choose numbers from a list that add up to the target (many answers, all enumerable)."""

    name = "subset_sum"
    default_options = {"num_numbers": NUM_NUMBERS, "max_numbers": MAX_NUMBERS, "min_solutions": MIN_SOLUTIONS}
    max_completion_length = 32  # 12 numbers up to 99 summing to at most half their total: <= ~25 characters
    verifier_class = SubsetSumVerifier
    # Corpus skew: valid answers drawn with weight exp(-SKEW * greedy rank).
    skew = SKEW

    def make_dataset(
        self, num_train: int, num_test: int, *, seed: int = 0, with_solutions: bool = False, **options: Any
    ) -> Any:
        return make_subset_sum_dataset(
            num_train, num_test, seed=seed, with_solutions=with_solutions, **self.resolve_options(options)
        )

    def example(self) -> tuple[str, str]:
        numbers, target = [24, 21, 19, 17, 15, 14, 12, 11, 8, 7, 5, 3], 75
        return format_prompt(numbers, target), enumerate_solutions(numbers, target)[0]

    def corpus_completion(self, row: dict[str, Any], rng: random.Random, valid: bool) -> str:
        """A valid answer drawn with weight exp(-skew·rank) (greedy answers first); otherwise that
        answer with one number dropped, added or swapped for another of the prompt: well-formed, a
        near miss of the target."""
        solutions = row["solutions"]
        weights = _rank_weights(len(solutions), self.skew)
        answer = rng.choices(solutions, weights=weights)[0]
        if valid:
            return answer
        chosen = [int(p) for p in answer.split("+")]
        unused = [n for n in row["numbers"] if n not in chosen]
        while True:
            attempt = list(chosen)
            move = rng.randrange(3)
            if move == 0 and len(attempt) > 1:
                attempt.remove(rng.choice(attempt))
            elif move == 1 and unused:
                attempt.append(rng.choice(unused))
            elif unused:
                attempt.remove(rng.choice(attempt))
                attempt.append(rng.choice(unused))
            if sum(attempt) != row["target"]:
                return format_answer(attempt)

    def enumerate_valid(self, row: dict[str, Any]) -> set[str]:
        return set(enumerate_solutions(row["numbers"], row["target"]))


@lru_cache(maxsize=1024)
def _rank_weights(n: int, skew: float) -> tuple[float, ...]:
    return tuple(math.exp(-skew * rank) for rank in range(n))
