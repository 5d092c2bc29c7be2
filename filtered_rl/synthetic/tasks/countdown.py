"""The synthetic *countdown* task: combine some of the given numbers with + - * / into the target.

A prompt lists a few numbers and a target, e.g. ``9 7 5 3 -> 24:``; an answer is an arithmetic
expression such as ``(7-5)*(9+3)`` that uses each number at most once and whose exact rational value
(`fractions.Fraction`, so ``7/2*2`` is fine) equals the target. Most prompts have many valid answers,
which is what makes the task a test bed for diversity: the filtered model must keep them all.

Rules, decided once here and shared by the verifier:
- Only non-negative integer literals, the binary operators ``+ - * /`` and parentheses. No unary minus
  (the game combines the *given* numbers; ``-3+10`` would smuggle in a number that is not there).
- Intermediate values may be fractions or negative; only the final value must equal the target.
- Two answers are *the same answer* when they differ only by commutativity/associativity of + and *,
  including the rules that move subtraction and division inside sums and products:
  ``3+4 = 4+3``, ``2*(3*4) = 4*3*2``, ``9-(5-2) = 9+2-5``, ``8/(4/2) = 8*2/4``. Distributivity is
  *not* applied: ``(2+3)*4`` and ``2*4+3*4`` are different answers (different computations).
  `canonical_answer` prints the representative of an answer's class: sums as positive terms then
  negative terms, products as numerator factors then denominator factors, numbers before compound
  terms (numbers in decreasing order), minimal parentheses.

Train/test disjointness does not depend on the call: whether a prompt is a test prompt is a fixed
function of its text (a hash), so a test prompt of any `make_countdown_dataset` call never appears in
the train split of another (e.g. the pretraining corpus), whatever the sizes and seeds.

The verifier (`CountdownVerifier`) and the registered task (`CountdownTask`, name ``countdown``) are at
the end. The pretraining corpus mixes valid answers drawn uniformly from all answers of the prompt
with random well-formed expressions over its numbers: the model learns the format fully and the
arithmetic partly, and how well depends on the prompt.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import random
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

from filtered_rl.synthetic.tasks import SyntheticTask, register_task
from filtered_rl.verifiers.base import BinaryVerifier

# Default difficulty: 4 numbers from 1..6 (repeats allowed), targets up to 24 with at least 8 distinct
# answers. About 800 prompts exist (~640 train, ~160 test); small numbers and answer-rich targets are
# what lets a CPU-sized model learn the task partly (see filtered_rl.synthetic.base_model).
NUM_NUMBERS = 4
MAX_NUMBER = 6
MAX_TARGET = 24
MIN_SOLUTIONS = 8
TEST_FRACTION = 0.2

# Answers longer than this are rejected before parsing (a 4-number answer is ~15 characters).
MAX_ANSWER_CHARS = 256
_ANSWER_CHARS = re.compile(r"[0-9+\-*/() \t]*")
_INTEGER = re.compile(r"[0-9]+")

# --- Canonical expression structure --------------------------------------------------------------
# A node is a tuple (sort_key, text, kind, first, second, text_as_factor):
#   kind "n": an integer literal (first = second = ())
#   kind "s": a flattened sum   p1+p2+...-n1-n2...   first = positive terms, second = negative terms
#   kind "p": a flattened product a*b*.../c/d...    first = numerator factors, second = denominators
# Terms of a sum are numbers or products, factors of a product are numbers or sums; term and factor
# tuples are sorted, so two answers are the same iff their canonical `text` is equal.
Node = tuple


def _leaf(value: int) -> Node:
    return ((0, -value, ""), str(value), "n", (), (), str(value))


def _node(kind: str, first: Sequence[Node], second: Sequence[Node]) -> Node:
    first, second = tuple(sorted(first)), tuple(sorted(second))
    if kind == "s":
        text = "+".join([t[1] for t in first]) + "".join(["-" + t[1] for t in second])
        return ((1, 0, text), text, kind, first, second, f"({text})")  # parenthesised as a factor
    text = "*".join([f[5] for f in first]) + "".join(["/" + f[5] for f in second])
    return ((1, 0, text), text, kind, first, second, text)


def _combine(op: str, x: Node, y: Node) -> Node:
    """The canonical node of `x op y`, flattening nested sums/products."""
    kind = "s" if op in "+-" else "p"
    xa, xb = (x[3], x[4]) if x[2] == kind else ((x,), ())
    ya, yb = (y[3], y[4]) if y[2] == kind else ((y,), ())
    if op in "+*":
        return _node(kind, xa + ya, xb + yb)
    return _node(kind, xa + yb, xb + ya)


def _to_str(node: Node) -> str:
    return node[1]


def _apply(op: str, a: Fraction | None, b: Fraction | None) -> Fraction | None:
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


# --- Parsing answers --------------------------------------------------------------------------------
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def extract_expression(completion: str) -> str:
    """The answer part of a completion: its first non-empty line, cut at any special-token marker.

    Models end an answer with EOS (removed by decoding) or a newline; anything after is ignored.
    """
    text = completion.lstrip()
    end = len(text)
    for stop in ("\n", "\r", "<|"):
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end].strip()


def parse_answer(expression: str, numbers: Sequence[int]) -> tuple[Node, Fraction | None] | None:
    """(canonical node, exact value) of an expression over `numbers`, or None if it is not one.

    None for anything but integer literals, binary + - * / and parentheses; for a literal that is not
    among `numbers` or is used more often than it occurs there; for overlong input. The value is None
    on division by zero. Never raises and never evaluates Python code (`ast` only parses).
    """
    if not isinstance(expression, str) or len(expression) > MAX_ANSWER_CHARS:
        return None
    if not _ANSWER_CHARS.fullmatch(expression):
        return None
    literals = _INTEGER.findall(expression)
    # At most len(numbers) literals bounds the tree to < len(numbers) operators: no deep recursion.
    if not literals or len(literals) > len(numbers):
        return None
    try:
        used = Counter(int(s) for s in literals)
    except ValueError:
        return None
    available = Counter(int(n) for n in numbers)
    if any(count > available[value] for value, count in used.items()):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return _from_ast(tree)


def _from_ast(node: ast.AST) -> tuple[Node, Fraction | None] | None:
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            return None
        return _leaf(node.value), Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _from_ast(node.left), _from_ast(node.right)
        if left is None or right is None:
            return None
        op = _AST_OPS[type(node.op)]
        return _combine(op, left[0], right[0]), _apply(op, left[1], right[1])
    return None  # unary minus, **, %, //, names, calls, attributes, comparisons, ...


def canonical_answer(text: str, numbers: Sequence[int]) -> str | None:
    """Canonical string of an answer (see the module docstring for when two answers are the same).

    `text` may be a whole completion (the answer is extracted with `extract_expression`). None when it
    is not a well-formed expression over `numbers` (its value is not checked: see `verify_answer`).
    """
    parsed = parse_answer(extract_expression(text), numbers)
    return None if parsed is None else _to_str(parsed[0])


def verify_answer(text: str, numbers: Sequence[int], target: int) -> bool:
    """True iff the completion's answer is a well-formed expression over `numbers` equal to `target`."""
    parsed = parse_answer(extract_expression(text), numbers)
    return parsed is not None and parsed[1] is not None and parsed[1] == target


# --- Enumerating all answers ------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _all_expressions(numbers: tuple[int, ...], low: int, high: int) -> dict[int, tuple[str, ...]]:
    """Every distinct answer over a sub-multiset (>= 2 numbers) of `numbers` with an integer value in
    [low, high], grouped by value.

    Dynamic programming over sub-multisets: the canonical forms reachable with exactly the numbers of
    a sub-multiset S are the combinations of those of every split S = A + B. Canonicalisation is
    compositional, so deduplicating each sub-multiset's forms early is exact. At the top level (all
    numbers), which holds most of the work, a float pre-check skips the canonicalisation of values
    that are not integers in range; survivors are confirmed with exact `Fraction` arithmetic.
    """
    n = len(numbers)
    full = (1 << n) - 1
    multiset = lambda mask: tuple(sorted(numbers[i] for i in range(n) if mask >> i & 1))
    # sub-multiset -> {canonical text: (node, exact value, float value)}; forms dividing by zero are dropped
    forms: dict[tuple[int, ...], dict[str, tuple[Node, Fraction, float]]] = {}
    for mask in sorted(range(1, full + 1), key=lambda m: m.bit_count()):
        key = multiset(mask)
        if key in forms:
            continue
        if len(key) == 1:
            forms[key] = {str(key[0]): (_leaf(key[0]), Fraction(key[0]), float(key[0]))}
            continue
        top = mask == full
        out: dict[str, tuple[Node, Fraction, float]] = {}
        splits_done = set()
        sub = (mask - 1) & mask
        while sub:
            split = tuple(sorted((multiset(sub), multiset(mask ^ sub))))
            sub = (sub - 1) & mask
            if split in splits_done:
                continue
            splits_done.add(split)
            for x, ex, fx in forms[split[0]].values():
                for y, ey, fy in forms[split[1]].values():
                    for op, a, b, ea, eb, fa, fb in (
                        ("+", x, y, ex, ey, fx, fy),
                        ("*", x, y, ex, ey, fx, fy),
                        ("-", x, y, ex, ey, fx, fy),
                        ("-", y, x, ey, ex, fy, fx),
                        ("/", x, y, ex, ey, fx, fy),
                        ("/", y, x, ey, ex, fy, fx),
                    ):
                        if op == "/" and fb == 0.0:  # fb is float(eb), zero iff eb is
                            continue
                        if top:
                            f = (
                                fa + fb
                                if op == "+"
                                else fa * fb
                                if op == "*"
                                else fa - fb
                                if op == "-"
                                else fa / fb
                            )
                            if not low - 0.5 < f < high + 0.5 or abs(f - round(f)) > 1e-9 * max(1.0, abs(f)):
                                continue
                        node = _combine(op, a, b)
                        if node[1] not in out:
                            exact = _apply(op, ea, eb)
                            out[node[1]] = (node, exact, float(exact))
        forms[key] = out
    by_value: dict[int, set[str]] = {}
    for key, nodes in forms.items():
        if len(key) >= 2:
            for text, (_, exact, _) in nodes.items():
                if exact.denominator == 1 and low <= exact <= high:
                    by_value.setdefault(int(exact), set()).add(text)
    return {value: tuple(sorted(texts)) for value, texts in by_value.items()}


def enumerate_solutions(numbers: Sequence[int], target: int) -> set[str]:
    """All distinct valid answers (canonical strings) that reach `target` with at least two numbers.

    A single number equal to the target is also a valid answer (`verify_answer` accepts ``7`` for
    target 7); it is included when present. Cached per multiset of numbers: a 4-number instance takes
    ~0.1 s the first time, nothing after.
    """
    key = tuple(sorted(int(n) for n in numbers))
    if Fraction(target).denominator != 1:
        return set()
    target = int(target)
    # One cached table per multiset serves every target in [1, 64] (all the default datasets use).
    solutions = set(_all_expressions(key, min(1, target), max(64, target)).get(target, ()))
    if target in key:
        solutions.add(str(int(target)))
    return solutions


# --- Random expressions (for the pretraining corpus) -----------------------------------------------


def random_expression(numbers: Sequence[int], rng: random.Random, *, min_numbers: int = 2) -> str:
    """A uniformly shaped random well-formed answer over a random subset of `numbers` (canonical form).

    Subset size uniform in [min_numbers, len(numbers)], random binary tree, uniform operators;
    resampled on division by zero. Its value is whatever it is: this is the "format" part of the corpus.
    """
    while True:
        k = rng.randint(min(min_numbers, len(numbers)), len(numbers))
        chosen = rng.sample(list(numbers), k)
        node, value = _random_tree(chosen, rng)
        if value is not None:
            return _to_str(node)


def _random_tree(values: list[int], rng: random.Random) -> tuple[Node, Fraction | None]:
    if len(values) == 1:
        return _leaf(values[0]), Fraction(values[0])
    split = rng.randint(1, len(values) - 1)
    (left, vl), (right, vr) = _random_tree(values[:split], rng), _random_tree(values[split:], rng)
    op = rng.choice("+-*/")
    return _combine(op, left, right), _apply(op, vl, vr)


# --- Prompts and datasets ---------------------------------------------------------------------------


def format_prompt(numbers: Sequence[int], target: int) -> str:
    """Plain-text prompt, e.g. ``6 5 3 1 -> 24:`` (short sequences suit a character-level model).

    Numbers are listed in decreasing order, the order in which canonical answers mention them.
    """
    return f"{' '.join(str(n) for n in sorted(numbers, reverse=True))} -> {target}:"


def prompt_id(numbers: Sequence[int], target: int) -> str:
    return f"countdown-{'-'.join(str(n) for n in sorted(numbers))}-to-{target}"


def is_test_prompt(pid: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Fixed train/test partition of all prompts, independent of any call's sizes or seed."""
    digest = int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "big")
    return digest < test_fraction * 2**64


def _eligible_targets(numbers: tuple[int, ...], max_target: int, min_solutions: int) -> list[int]:
    table = _all_expressions(tuple(sorted(numbers)), 1, max(64, max_target))
    return [
        value
        for value, answers in table.items()
        if 1 <= value <= max_target and value not in numbers and len(answers) >= min_solutions
    ]


def _split_targets(numbers: tuple[int, ...], split: str, max_target: int, min_solutions: int) -> list[int]:
    return sorted(
        t
        for t in _eligible_targets(numbers, max_target, min_solutions)
        if is_test_prompt(prompt_id(numbers, t)) == (split == "test")
    )


def _pool(
    split: str, *, num_numbers: int, max_number: int, max_target: int, min_solutions: int
) -> list[tuple[tuple[int, ...], int]]:
    """Every prompt (numbers, target) of a split, in a fixed order (enumerates all multisets: slow-ish)."""
    multisets = itertools.combinations_with_replacement(range(max_number, 0, -1), num_numbers)
    return [
        (numbers, t)
        for numbers in multisets
        for t in _split_targets(numbers, split, max_target, min_solutions)
    ]


def prompt_pool_size(
    *,
    num_numbers: int = NUM_NUMBERS,
    max_number: int = MAX_NUMBER,
    max_target: int = MAX_TARGET,
    min_solutions: int = MIN_SOLUTIONS,
) -> dict[str, int]:
    """How many distinct train and test prompts a task has (the defaults: 638 train / 168 test)."""
    task = dict(
        num_numbers=num_numbers, max_number=max_number, max_target=max_target, min_solutions=min_solutions
    )
    return {split: len(_pool(split, **task)) for split in ("train", "test")}


def _row(numbers: tuple[int, ...], target: int, with_solutions: bool) -> dict[str, Any]:
    solutions = sorted(enumerate_solutions(numbers, target))
    row = {
        "prompt": format_prompt(numbers, target),
        "numbers": list(numbers),
        "target": target,
        "prompt_id": prompt_id(numbers, target),
        "num_solutions": len(solutions),
    }
    if with_solutions:
        row["solutions"] = solutions
    return row


def make_countdown_dataset(
    num_train: int,
    num_test: int,
    *,
    num_numbers: int = NUM_NUMBERS,
    max_number: int = MAX_NUMBER,
    max_target: int = MAX_TARGET,
    min_solutions: int = MIN_SOLUTIONS,
    seed: int = 0,
    with_solutions: bool = False,
) -> Any:
    """Countdown prompts as a `datasets.DatasetDict` with splits ``train`` and ``test``.

    Columns: ``prompt`` (plain text), ``numbers`` (list[int], decreasing as in the prompt), ``target`` (int), ``prompt_id``
    (stable, readable), ``num_solutions`` (distinct valid answers); with ``with_solutions=True`` also
    ``solutions`` (their canonical strings).

    Difficulty knobs: `num_numbers` numbers drawn uniformly from 1..`max_number`; the target is drawn
    uniformly among the integers in 1..`max_target` reachable with at least `min_solutions` distinct
    answers, excluding the numbers themselves (so a single number is never an answer). Every prompt
    appears at most once; train and test are disjoint (see `is_test_prompt`).
    """
    from datasets import Dataset, DatasetDict

    for name, value, low in (
        ("num_train", num_train, 0),
        ("num_test", num_test, 0),
        ("num_numbers", num_numbers, 2),
        ("max_number", max_number, 1),
        ("max_target", max_target, 1),
        ("min_solutions", min_solutions, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_countdown_dataset: {name} must be an integer >= {low}, got {value!r}")
    if num_numbers > 6:
        raise ValueError(
            f"make_countdown_dataset: num_numbers={num_numbers} is too many to enumerate; use <= 6"
        )

    task = dict(
        num_numbers=num_numbers, max_number=max_number, max_target=max_target, min_solutions=min_solutions
    )
    rng = random.Random(f"countdown:{seed}")
    picked: dict[str, list[tuple[tuple[int, ...], int]]] = {"train": [], "test": []}
    need = {"train": num_train, "test": num_test}
    seen: set[str] = set()
    attempts, max_attempts = 0, 20 * (num_train + num_test) + 200
    while (need["train"] or need["test"]) and attempts < max_attempts:
        attempts += 1
        # Pick the split first (in proportion to what is missing), then a target of that split, so that
        # every enumerated multiset of numbers yields a prompt.
        split = "test" if rng.random() * (need["train"] + need["test"]) < need["test"] else "train"
        numbers = tuple(sorted((rng.randint(1, max_number) for _ in range(num_numbers)), reverse=True))
        targets = [
            t
            for t in _split_targets(numbers, split, max_target, min_solutions)
            if prompt_id(numbers, t) not in seen
        ]
        if targets:
            target = rng.choice(targets)
            seen.add(prompt_id(numbers, target))
            picked[split].append((numbers, target))
            need[split] -= 1
    for split in ("train", "test"):
        if need[split]:  # random draws keep missing the rare prompts: take them from the whole pool
            pool = [(numbers, t) for numbers, t in _pool(split, **task) if prompt_id(numbers, t) not in seen]
            if len(pool) < need[split]:
                sizes = prompt_pool_size(**task)
                raise ValueError(
                    f"make_countdown_dataset: num_{split}={num_train if split == 'train' else num_test} but this "
                    f"task has only {sizes[split]} distinct {split} prompts ({sizes['train']} train / "
                    f"{sizes['test']} test); lower num_train/num_test or min_solutions, or raise "
                    f"max_number/max_target"
                )
            rng.shuffle(pool)
            picked[split] += pool[: need[split]]
    rows = {
        split: [_row(numbers, t, with_solutions) for numbers, t in pairs] for split, pairs in picked.items()
    }
    return DatasetDict(
        {
            split: Dataset.from_list(split_rows) if split_rows else _empty(with_solutions)
            for split, split_rows in rows.items()
        }
    )


def _empty(with_solutions: bool) -> Any:
    from datasets import Dataset

    columns = {"prompt": [], "numbers": [], "target": [], "prompt_id": [], "num_solutions": []}
    if with_solutions:
        columns["solutions"] = []
    return Dataset.from_dict(columns)


# --- Verifier --------------------------------------------------------------------------------------


def verify_countdown(completion: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `completion` answers the countdown prompt (`numbers`, `target`). Never raises on text.

    Valid iff the answer (the first non-empty line, see `extract_expression`) is an expression over the
    prompt's numbers, each used at most once, built from integer literals, binary + - * / and
    parentheses (no unary minus), whose exact rational value equals the target. Parsing goes through
    `ast` and a whitelist of node types, never `eval`; overlong, deeply nested or hostile text is
    rejected in bounded time.
    """
    if not isinstance(completion, str):
        return False
    return verify_answer(completion, numbers, target)


class CountdownVerifier(BinaryVerifier):
    """TRL reward function for countdown datasets (columns ``numbers`` and ``target``).

    `answer_key` is the canonical answer, so diversity counts answers up to commutativity and
    associativity (``3+4`` and ``4+3`` are one answer).
    """

    __name__ = "countdown"
    gold_column = "target"
    numbers_column = "numbers"

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        if gold is None:
            return None
        return 1.0 if verify_countdown(text, self._numbers(row), int(gold)) else 0.0

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        return canonical_answer(text, self._numbers(row))

    def _numbers(self, row: dict[str, Any]) -> Sequence[int]:
        if self.numbers_column not in row:
            raise KeyError(
                f"{self.__name__}: the dataset has no column {self.numbers_column!r} listing the numbers; "
                f"build it with filtered_rl.synthetic.tasks.countdown.make_countdown_dataset "
                f"(columns seen: {sorted(row)})"
            )
        return row[self.numbers_column]


# --- The registered task -----------------------------------------------------------------------------


@register_task
class CountdownTask(SyntheticTask):
    """Countdown: combine some of the given numbers with + - * / into the target."""

    name = "countdown"
    default_options = {
        "num_numbers": NUM_NUMBERS,
        "max_number": MAX_NUMBER,
        "max_target": MAX_TARGET,
        "min_solutions": MIN_SOLUTIONS,
    }
    max_completion_length = 32  # the longest 4-number answer is ~20 characters
    verifier_class = CountdownVerifier

    def make_dataset(
        self, num_train: int, num_test: int, *, seed: int = 0, with_solutions: bool = False, **options: Any
    ) -> Any:
        return make_countdown_dataset(
            num_train, num_test, seed=seed, with_solutions=with_solutions, **self.resolve_options(options)
        )

    def load_split(
        self,
        split: str,
        num_prompts: int | None = None,
        *,
        seed: int = 0,
        with_solutions: bool = False,
        **options: Any,
    ) -> Any:
        """One split; by default its whole pool of distinct prompts, and never more than the pool."""
        if split not in ("train", "test"):
            raise ValueError(f"countdown has splits 'train' and 'test', got split={split!r}")
        options = self.resolve_options(options)
        pool = prompt_pool_size(**options)[split]
        size = min(num_prompts or pool, pool)
        sizes = {"num_train": size if split == "train" else 0, "num_test": size if split == "test" else 0}
        return make_countdown_dataset(**sizes, seed=seed, with_solutions=with_solutions, **options)[split]

    def example(self) -> tuple[str, str]:
        return format_prompt([4, 3, 2, 1], 10), "4+3+2+1"

    def corpus_completion(self, row: dict[str, Any], rng: random.Random, valid: bool) -> str:
        """A valid answer uniformly among all of the prompt's, else a random expression over its numbers."""
        if valid:
            return rng.choice(row["solutions"])
        return random_expression(row["numbers"], rng)

    def enumerate_valid(self, row: dict[str, Any]) -> set[str]:
        return enumerate_solutions(row["numbers"], row["target"])

    def fingerprint(self) -> dict[str, Any]:
        # The pre-registry key material, unchanged, so that base models cached before tasks had names
        # (e.g. .cache/filtered-rl/nano-seed0-4d040cfd1f) keep being found; see base_model.cache_key.
        return {"prompt_example": format_prompt([4, 3, 2, 1], 10)}
