"""What all verifiers share: turning TRL completions into text and the reward-function signature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def completion_to_text(completion: Any) -> str:
    """Text of one TRL completion.

    TRL passes either plain strings (standard datasets) or, for conversational datasets, a list of
    message dicts `[{"role": "assistant", "content": ...}, ...]`; the answer is in the assistant turns.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_to_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        turns = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in turns if m.get("role", "assistant") == "assistant"] or turns
        return "\n".join(_content_to_text(m.get("content", "")) for m in assistant)
    raise TypeError(
        f"completion must be a string or a list of message dicts, got {type(completion).__name__}"
    )


def _content_to_text(content: Any) -> str:
    # Multimodal-style content: [{"type": "text", "text": ...}, ...]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


class BinaryVerifier:
    """Base class of the project's reward functions.

    Subclasses implement `score(text, gold, row) -> float | None` for one completion, or override
    `__call__` to verify a whole batch at once (the code verifier does, to use a process pool).
    `gold_column` names the dataset column holding the gold; TRL forwards every dataset column to
    reward functions as keyword arguments.
    """

    __name__ = "binary_verifier"
    gold_column: str = "answer"

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        raise NotImplementedError

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        """The answer a completion gives, normalised so that equivalent answers compare equal.

        Diversity metrics count distinct keys among valid completions; tasks with a notion of
        equivalence (a math answer, a canonical expression) override this. None: no answer found.
        """
        text = text.strip()
        return text or None

    def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **columns: Any
    ) -> list[float | None]:
        texts, rows = self._texts_and_rows(completions, columns)
        return [self.score(text, row[self.gold_column], row) for text, row in zip(texts, rows)]

    def _texts_and_rows(
        self, completions: list[Any] | None, columns: dict[str, Any]
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Completion texts and per-completion rows, after checking that the gold column exists."""
        if completions is None:
            raise TypeError(f"{self.__name__}: called without `completions`")
        if self.gold_column not in columns:
            raise KeyError(
                f"{self.__name__}: the dataset has no column {self.gold_column!r} holding the gold answer; "
                f"pass gold_column=<name> to the verifier (columns seen: {sorted(columns)})"
            )
        return [completion_to_text(c) for c in completions], _rows(columns, len(completions))


def _rows(columns: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per-completion view of TRL's column kwargs (lists of length n; scalars such as trainer_state are shared)."""
    per_row = {k: v for k, v in columns.items() if isinstance(v, list | tuple) and len(v) == n}
    shared = {k: v for k, v in columns.items() if k not in per_row}
    return [{**shared, **{k: v[i] for k, v in per_row.items()}} for i in range(n)]
