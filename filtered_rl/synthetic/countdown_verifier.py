"""Verifier of the synthetic countdown task (rules in `filtered_rl.synthetic.countdown`).

A completion is valid iff its answer (the first non-empty line, see `extract_expression`) is an
expression over the prompt's numbers, each used at most once, built from integer literals, binary
+ - * / and parentheses (no unary minus), whose exact rational value equals the target. Parsing goes
through `ast` and a whitelist of node types, never `eval`; overlong, deeply nested or hostile text is
rejected in bounded time without raising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filtered_rl.synthetic.countdown import canonical_answer, verify_answer

from filtered_rl.verifiers.base import BinaryVerifier


def verify_countdown(completion: str, numbers: Sequence[int], target: int) -> bool:
    """True iff `completion` answers the countdown prompt (`numbers`, `target`). Never raises on text."""
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
                f"build it with filtered_rl.synthetic.countdown.make_countdown_dataset (columns seen: {sorted(row)})"
            )
        return row[self.numbers_column]
