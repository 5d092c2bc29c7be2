"""Code verifier: a completion is valid iff its program passes the task's tests in the sandbox.

Where the tests come from, per dataset row (first match wins):

1. `tests_column` (default `"tests"`): test code run after the program, a string or a list of
   statements (e.g. asserts) joined by newlines; a `test_imports` list, if present, is run first.
2. `test_list` (MBPP): `test_setup_code` (original MBPP, if present), then `test_imports`, then the
   asserts of `test_list`.
3. `test` + `entry_point` (HumanEval): the `test` code defines `check(candidate)`; `check(<entry_point>)`
   is called after it. The program is the code prompt followed by the completion, unless the
   completion defines `entry_point` itself, in which case the prompt (its imports and helpers; its
   docstring-only stub is harmlessly redefined) precedes the completion's code. The code prompt is
   the `prompt_column` value if given, else TRL's `prompts` entry when that is plain text.

A row whose tests are missing or empty gets `None` (TRL then ignores it). Code is taken from the last
fenced block (```python ... ```) that defines a function the tests call, else the first block, else
the whole completion.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any

from ._registry import register_verifier
from .base import BinaryVerifier, _rows, completion_to_text
from .sandbox import ExecutionResult, SandboxLimits, SandboxPool, as_source, default_pool, run_code

__all__ = [
    "CodeVerifier",
    "ExecutionResult",
    "SandboxLimits",
    "SandboxPool",
    "build_program",
    "extract_code",
    "run_code",
]

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)[ \t]*\(", re.M)


def extract_code(text: str, tests: str = "", entry_point: str | None = None) -> str:
    """The program in a completion: a fenced block defining a function the tests use, or the raw text."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "python3", "py")]
    if not blocks:
        return text
    wanted = {entry_point} if entry_point else set(re.findall(r"\b(\w+)\s*\(", tests))
    defining = [b for b in blocks if wanted & set(_DEF.findall(b))]
    return defining[-1] if defining else blocks[0]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def build_program(
    completion: str,
    row: dict[str, Any],
    prompt: Any = None,
    tests_column: str = "tests",
    prompt_column: str | None = None,
) -> tuple[str, str] | None:
    """(program, tests) for one completion, per the rules in this module's docstring; None: no usable tests."""
    if tests_column in row:
        tests = as_source(row[tests_column])
        if tests.strip() and row.get("test_imports"):
            tests = as_source(row["test_imports"]) + "\n" + tests
        return (extract_code(completion, tests), tests) if tests.strip() else None
    if "test_list" in row:
        asserts = as_source(row["test_list"])
        if not asserts.strip():
            return None
        tests = "\n".join(
            filter(None, [as_source(row.get("test_setup_code")), as_source(row.get("test_imports")), asserts])
        )
        return extract_code(completion, asserts), tests
    if "test" in row and "entry_point" in row:
        entry_point, test = row["entry_point"], as_source(row["test"])
        if not test.strip() or not entry_point:
            return None
        tests = f"{test}\n\ncheck({entry_point})\n"
        prefix = row.get(prompt_column) if prompt_column else prompt
        prefix = prefix if isinstance(prefix, str) else ""
        code = extract_code(completion, entry_point=entry_point)
        if _defines(code, entry_point):
            return (f"{prefix}\n{code}" if prefix else code), tests
        return prefix + code, tests
    raise KeyError(
        f"code verifier: no tests in the dataset row (columns: {sorted(row)}); provide a {tests_column!r} column "
        "(test code), MBPP's 'test_list', or HumanEval's 'test' + 'entry_point', or pass tests_column=<name>"
    )


def normalise_program(code: str) -> str | None:
    """Canonical text of a program: parsed and unparsed (formatting and comments dropped), docstrings removed."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        code = "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())
        return code or None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree) or None


@register_verifier("code")
class CodeVerifier(BinaryVerifier):
    """Binary reward for code: 1.0 if the program passes its tests in the sandbox, else 0.0.

    `workers=None` shares the process-wide pool (one worker per CPU); an int gives this verifier its own.
    `limits` bounds each program (default: 5 s wall clock, 1 GiB address space, 32 processes).
    """

    __name__ = "code"

    def __init__(
        self,
        tests_column: str = "tests",
        prompt_column: str | None = None,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
    ):
        self.gold_column = tests_column
        self.prompt_column = prompt_column
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self._pool: SandboxPool | None = None

    @property
    def pool(self) -> SandboxPool:
        if self.workers is None:
            return default_pool()
        if self._pool is None:
            self._pool = SandboxPool(self.workers)
        return self._pool

    def __getstate__(self) -> dict[str, Any]:  # worker processes do not travel with a pickled verifier
        return {**self.__dict__, "_pool": None}

    def run(
        self, prompts: list[Any] | None, completions: list[Any], **columns: Any
    ) -> list[ExecutionResult | None]:
        """Sandbox results per completion (None where the row has no usable tests)."""
        rows = _rows(columns, len(completions))
        prompts = prompts if prompts is not None else [None] * len(completions)
        jobs = [
            build_program(completion_to_text(c), row, p, self.gold_column, self.prompt_column)
            for c, row, p in zip(completions, rows, prompts)
        ]
        results = iter(self.pool.run_many([job for job in jobs if job is not None], self.limits))
        return [next(results) if job is not None else None for job in jobs]

    def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **columns: Any
    ) -> list[float | None]:
        if completions is None:
            raise TypeError(f"{self.__name__}: called without `completions`")
        results = self.run(prompts, completions, **columns)
        log_metric = columns.get("log_metric")
        ran = [r for r in results if r is not None]
        if callable(log_metric) and ran:
            counts = Counter(r.status for r in ran)
            for status in ("timeout", "error"):
                log_metric(f"{self.__name__}/{status}_frac", counts[status] / len(ran))
        return [None if r is None else float(r.passed) for r in results]

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        return self([row.get("prompt")], [text], **{k: [v] for k, v in row.items() if k != "prompt"})[0]

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        tests = as_source(row.get(self.gold_column) or row.get("test_list") or row.get("test"))
        return normalise_program(extract_code(text, tests, row.get("entry_point")))
