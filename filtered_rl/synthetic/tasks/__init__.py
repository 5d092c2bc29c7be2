"""Synthetic tasks: prompt families whose base model the project pretrains itself.

A synthetic task is one file in this package: a `SyntheticTask` subclass registered with
`@register_task`. Registration is all it takes. The registry finds the file on first lookup, and
everything that takes a task name then accepts it without further wiring: `filtered-rl pretrain
--task NAME`, `filtered-rl sample --task NAME`, `load_task(NAME)` (so `filtered-rl eval --dataset NAME`
and `dataset_name: NAME` in a recipe), and the evaluation's coverage metrics when the task can
enumerate its valid answers.

A task supplies what the base-model factory and the evaluation need to know about it:

- prompts: `make_dataset` builds train and test splits (a `datasets.Dataset` each) with a plain-text
  ``prompt``, a stable ``prompt_id``, the gold columns its verifier reads and ``num_solutions``.
  Test prompts must never appear in any train split, whatever the sizes and seeds (the pretraining
  corpus is drawn from the train split).
- the pretraining corpus: `corpus_completion` writes a valid answer, or a near-miss, for a train row.
  The mix of the two (`PretrainConfig.valid_fraction`) and the task's choice of which valid answers
  to favour give the base model its validity spread and its skew over the valid answers.
- the verifier (a TRL reward function, `filtered_rl.verifiers.BinaryVerifier`) and `answer_key`,
  the normalised answer that diversity metrics count.
- optionally `enumerate_valid`: every valid answer of a prompt, as `answer_key` writes it. With it
  the evaluation reports coverage of the filtered model's support and its p*-mass.

    from filtered_rl.synthetic.tasks import TASKS, get_task
    task = get_task("countdown")
    splits = task.make_dataset(num_train=100, num_test=20, seed=0)
    reward = task.verifier()

`TASKS` maps names to task instances; an unknown name raises `UnknownNameError` (a `ValueError` and
a `KeyError`) that lists the known ones.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any, ClassVar, TypeVar

from filtered_rl.registry import Registry, UnknownNameError

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "SyntheticTask",
    "UnknownNameError",
    "get_task",
    "register_task",
]

# The task of `filtered-rl pretrain`/`sample` and `filtered-rl:<size>` model names when none is named.
DEFAULT_TASK = "countdown"
SPLITS = ("train", "test")


class SyntheticTask(ABC):
    """One synthetic task: prompts, a pretraining corpus, a verifier and (optionally) all valid answers.

    Subclasses set `name`, `verifier_class`, `default_options` and `max_completion_length`, and
    implement the abstract methods. An instance holds no state beyond caches, so the registry keeps one per task. Difficulty
    knobs are passed as keyword `options` (validated against `default_options` by `resolve_options`),
    so a base model's cache key can record them.
    """

    name: ClassVar[str]
    # Difficulty knobs and their defaults, e.g. countdown's {"num_numbers": 4, ...}.
    default_options: ClassVar[dict[str, Any]] = {}
    # Longest completion the task needs, in characters = tokens of the character-level tokenizer; the
    # base model's generation config and the evaluation use it as max_new_tokens.
    max_completion_length: ClassVar[int] = 32
    # Prompts `load_split` returns when asked for no number (tasks with a finite pool may clamp).
    default_num_prompts: ClassVar[dict[str, int]] = {"train": 2000, "test": 256}
    # `PretrainConfig` fields this task's base model uses instead of the defaults (every size), e.g.
    # {"valid_fraction": 0.8}; explicit options still win.
    pretrain_defaults: ClassVar[dict[str, Any]] = {}
    # The verifier `make_verifier` instantiates (a `BinaryVerifier` subclass).
    verifier_class: ClassVar[type]

    # --- prompts ---------------------------------------------------------------------------------

    @abstractmethod
    def make_dataset(
        self, num_train: int, num_test: int, *, seed: int = 0, with_solutions: bool = False, **options: Any
    ) -> Any:
        """A `datasets.DatasetDict` with splits ``train`` and ``test``.

        Columns: ``prompt`` (plain text), ``prompt_id``, the verifier's gold columns, ``num_solutions``;
        with ``with_solutions=True`` also ``solutions`` (the valid answers, for the corpus). Train and
        test must be disjoint across every call, so the corpus never holds a test prompt.
        """

    def load_split(
        self,
        split: str,
        num_prompts: int | None = None,
        *,
        seed: int = 0,
        with_solutions: bool = False,
        **options: Any,
    ) -> Any:
        """One split as a `datasets.Dataset`: `num_prompts` prompts (None: `default_num_prompts`)."""
        if split not in SPLITS:
            raise ValueError(f"{self.name} has splits 'train' and 'test', got split={split!r}")
        size = num_prompts or self.default_num_prompts[split]
        sizes = {"num_train": size if split == "train" else 0, "num_test": size if split == "test" else 0}
        return self.make_dataset(**sizes, seed=seed, with_solutions=with_solutions, **options)[split]

    @abstractmethod
    def example(self) -> tuple[str, str]:
        """A (prompt, valid completion) pair in the task's exact format.

        It documents the format and enters the base model's cache key, so that a change of the prompt
        or answer format never reuses a model pretrained on the old one.
        """

    # --- pretraining corpus --------------------------------------------------------------------------

    @abstractmethod
    def corpus_completion(self, row: dict[str, Any], rng: random.Random, valid: bool) -> str:
        """One pretraining completion for a train `row` (built with ``with_solutions=True``).

        `valid`: a valid answer, drawn as the task chooses (its skew becomes the base model's skew
        over valid answers); otherwise a near-miss in the answer format (well-formed, wrong), which
        teaches the format without the answer. Draw only from `rng`: pretraining is deterministic.
        """

    # --- verification --------------------------------------------------------------------------------

    def make_verifier(self, **options: Any) -> Any:
        """A new TRL reward function (`verifier_class`, a `filtered_rl.verifiers.BinaryVerifier`).

        `options` set the verifier's attributes (e.g. ``gold_column=``); an unknown one is a ValueError.
        """
        verifier = self.verifier_class()
        for key, value in options.items():
            if key.startswith("_") or not hasattr(verifier, key):
                raise ValueError(f"the {self.name} verifier has no option {key!r}")
            setattr(verifier, key, value)
        return verifier

    def verifier(self) -> Any:
        """The task's verifier with default options (shared; do not mutate)."""
        return self._verifier

    @cached_property
    def _verifier(self) -> Any:
        return self.make_verifier()

    def is_valid(self, completion: str, row: dict[str, Any]) -> bool:
        """True iff the verifier accepts `completion` for `row` (a dict of the dataset's columns)."""
        verdict = self.verifier()(prompts=[row.get("prompt")], completions=[completion], **_columns(row))
        return verdict[0] == 1.0

    def answer_key(self, completion: str, row: dict[str, Any]) -> str | None:
        """The normalised answer of `completion` (equivalent answers share it); None: no answer."""
        return self.verifier().answer_key(completion, row)

    def enumerate_valid(self, row: dict[str, Any]) -> set[str] | None:
        """Every valid answer of `row` as `answer_key` writes it, or None if the task cannot list them."""
        return None

    # --- cache key -------------------------------------------------------------------------------------

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """`default_options` updated with `options`; an unknown option is a ValueError naming it."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise ValueError(
                f"task {self.name!r} has no option(s) {unknown}; its options: {sorted(self.default_options)}"
            )
        return {**self.default_options, **options}

    def fingerprint(self) -> dict[str, Any]:
        """What, beyond the pretraining config, shapes a base model of this task (in its cache key)."""
        return {"task": self.name, "example": list(self.example())}

    def __repr__(self) -> str:
        return f"<synthetic task {self.name!r}>"


def _columns(row: dict[str, Any]) -> dict[str, list[Any]]:
    """A row as TRL passes dataset columns to reward functions (one list per column)."""
    return {key: [value] for key, value in row.items() if key not in ("prompt", "completions")}


TASKS: Registry[SyntheticTask] = Registry("synthetic task", discover=__name__)

TaskClass = TypeVar("TaskClass", bound=type[SyntheticTask])


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: register one instance of a `SyntheticTask` subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, SyntheticTask)):
        raise TypeError(f"register_task decorates SyntheticTask subclasses, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (the task's registry name)")
    TASKS.register(name, cls())
    return cls


def get_task(name: str | SyntheticTask) -> SyntheticTask:
    """The registered task `name` (a task instance is returned as it is)."""
    if isinstance(name, SyntheticTask):
        return name
    return TASKS[name]


def task_names() -> tuple[str, ...]:
    """Names of every registered task (imports this package's task modules on first call)."""
    return TASKS.names()
