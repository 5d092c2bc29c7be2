"""Math verifier: a completion is valid iff its final answer equals the gold answer (math-verify).

Parsing and equivalence are math-verify's (`parse`, then `verify(gold, prediction)`, in that order:
the comparison is not symmetric). This module only decides *which* text to hand it:

- gold (`extract_gold`, style `auto` picks by content): GSM8K `... #### 1,234` (the number after the
  last `####`, commas dropped); a full solution containing `\\boxed{}` (its last box); otherwise a bare
  answer such as MATH-500's `answer` field (LaTeX without `$`), parsed as if boxed.
- prediction (`extract_prediction`): the last `\\boxed{}` / `\\fbox{}`; else the number after the last
  `####`; else math-verify's own search over the text (anchors like "the answer is", then the last
  LaTeX or plain expression, i.e. the last number).

Why a process pool. math-verify bounds its own work with `signal.alarm`, which only works on the main
thread, and no signal can interrupt a long computation inside C (huge integers, `10^{10^{10}}`).
`verify_math` and `MathVerifier` therefore run each judgement in long-lived helper processes
(`pool.WorkerPool`). A helper bounds the whole judgement with one timer of its own, at 0.8 x `timeout`
(it answers 0.0 and stays up); work stuck in C is cut by the pool, which kills the helper at `timeout`
and starts a replacement. Either way the completion scores 0.0 and the verdict is cached (it is not
paid for again by `answer_key`). Safe from any thread or process.

What bounds a call's total time: each judgement is bounded by `timeout` *once a helper has it*; the
helpers (`workers`, shared by every verifier of that size in the process) take requests first come,
first served. So a call with n distinct answers, made while other threads have m judgements queued or
running, returns within ceil((n + m) / workers) x `timeout` (measured: 16 threads on 2 helpers with
`timeout=2` waited up to 19.8 s). Give a multi-threaded caller more `workers`, or fewer threads.

The helpers start from a scrubbed environment (PATH, LANG and PYTHONPATH only): math-verify hands
untrusted text to SymPy's parser, and nothing of the caller's (API keys, tokens) is to be there.
"""

from __future__ import annotations

import logging
import math as _math
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._registry import register_verifier
from .base import BinaryVerifier, completion_to_text
from .pool import SCRUBBED_ENV, WorkerPool

__all__ = ["GOLD_STYLES", "MathVerifier", "extract_gold", "extract_prediction", "verify_math"]

GOLD_STYLES = ("auto", "gsm8k", "solution", "answer")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")

# A helper stops a judgement itself at this share of `timeout` (it answers, and stays up for the next
# request); the pool kills it at the full `timeout` only when the work is stuck in C code.
HELPER_TIME_SHARE = 0.8


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    for match in reversed(list(_BOX.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def _mv_timeout(seconds: int | None) -> int | None:
    # math-verify's alarm raises off the main thread; there the caller must bound time another way.
    return seconds if threading.current_thread() is threading.main_thread() else None


def _parse(text: str, boxed: bool, timeout: int | None) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0 if boxed else 50), ExprExtractionConfig()]
    return parse(text, extraction_config=configs, parsing_timeout=_mv_timeout(timeout))


def extract_gold(gold: Any, style: str = "auto", timeout: int | None = 5) -> list:
    """Parsed gold answer (math-verify objects); empty when the gold is unusable.

    In-process: meant for trusted gold text. For untrusted text use `verify_math` or `MathVerifier`.
    """
    if style not in GOLD_STYLES:
        raise ValueError(f"gold_style must be one of {GOLD_STYLES}, got {style!r}")
    if gold is None:
        return []
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        gold = repr(gold)
    text = str(gold).strip()
    if not text:
        return []
    hashes = _HASHES.findall(text)
    if style == "gsm8k" or (style == "auto" and hashes):
        if not hashes:
            return []
        return _parse(hashes[-1].replace(",", "").strip(), boxed=False, timeout=timeout)
    boxed = _last_boxed(text)
    if style == "solution" or (style == "auto" and boxed is not None):
        return _parse(f"\\boxed{{{boxed}}}", boxed=True, timeout=timeout) if boxed is not None else []
    return _parse(f"\\boxed{{{text}}}", boxed=True, timeout=timeout) or _parse(
        text, boxed=False, timeout=timeout
    )


def extract_prediction(text: str, timeout: int | None = 5) -> list:
    """Parsed final answer of a completion: last \\boxed{}, else `#### N`, else math-verify's search."""
    boxed = _last_boxed(text)
    if boxed is not None:
        parsed = _parse(f"\\boxed{{{boxed}}}", boxed=True, timeout=timeout)
        if parsed:
            return parsed
    hashes = _HASHES.findall(text)
    if hashes:
        parsed = _parse(hashes[-1].replace(",", "").strip(), boxed=False, timeout=timeout)
        if parsed:
            return parsed
    return _parse(text, boxed=False, timeout=timeout)


def _answer_key(parsed: list) -> str | None:
    """Normalised answer text, equal for equal numbers (`0.5`, `1/2`, `\\frac{1}{2}` -> `1/2`)."""
    import sympy

    for value in parsed:
        if isinstance(value, sympy.Float):
            value = sympy.nsimplify(value, rational=True)
        if isinstance(value, sympy.Basic | sympy.MatrixBase):
            return str(value)
    strings = [str(v).strip() for v in parsed if str(v).strip()]
    return strings[0] if strings else None


# ----------------------------------------------------------------------------------------------
# Helper processes
# ----------------------------------------------------------------------------------------------


_ZERO = {"gold_ok": True, "valid": False, "key": None}  # a reply with no answer found (or no time left)


class _OutOfTime(BaseException):
    """Raised by a helper's judgement timer. Not an `Exception`: math-verify catches those (its own
    TimeoutException included) and carries on with the next extraction, which would void the bound."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise `_OutOfTime` in the helper's main thread after `seconds` (fractions allowed).

    One timer for the whole judgement, not math-verify's per-call `signal.alarm`: that one counts
    whole seconds, restarts for each of the several parse calls a judgement makes, and is swallowed.
    """

    def expire(signum: int, frame: Any) -> None:
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _key_or_none(parsed: list) -> str | None:
    """The answer key, or None if the judgement's time runs out first: validity is decided before,
    so a slow key never costs a completion its reward."""
    try:
        return _answer_key(parsed)
    except _OutOfTime:
        return None


def _judge(request: dict[str, Any], gold_cache: dict[tuple[str, str], list]) -> dict[str, Any]:
    """One judgement inside a helper, within `request["budget"]` seconds: {"gold_ok", "valid", "key"}.

    Work stuck in C code (a huge integer power) ignores the timer; the pool's deadline kills it.
    """
    from math_verify import verify

    with _time_limit(float(request["budget"])):
        pred = extract_prediction(request["pred"], timeout=None)
        if "gold" not in request:
            return {**_ZERO, "key": _key_or_none(pred)}
        cache_key = (request["gold"], request["style"])
        if cache_key not in gold_cache:
            if len(gold_cache) > 4096:
                gold_cache.clear()
            gold_cache[cache_key] = extract_gold(request["gold"], request["style"], timeout=None)
        gold = gold_cache[cache_key]
        if not gold:
            return {"gold_ok": False, "valid": False, "key": None}
        valid = bool(pred) and verify(gold, pred, timeout_seconds=None)
        return {"gold_ok": True, "valid": bool(valid), "key": _key_or_none(pred)}


def _worker_main() -> None:
    """Entry point of a helper process (`_serve` protocol): one judgement per request."""
    import resource

    from ._serve import die_with_parent, serve

    parent_pid, memory_bytes = int(sys.argv[-1]), int(sys.argv[-2])
    if not die_with_parent(parent_pid):
        return
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # e.g. "timeout is disabled": ours is on
    gold_cache: dict[tuple[str, str], list] = {}
    # Warm up (imports, grammar, regex caches) before saying ready: requests then meet only their own cost.
    _judge({"pred": r"so \boxed{\frac{1}{2}}", "gold": "#### 0.5", "style": "auto", "budget": 30}, gold_cache)
    gold_cache.clear()
    serve(
        lambda request: _judge(request, gold_cache),
        {"ready": True},
        lambda exc: {**_ZERO, "error": type(exc).__name__},
    )


_pools: dict[tuple[int, int], WorkerPool] = {}
_pools_lock = threading.Lock()


def _pool(workers: int, memory_bytes: int) -> WorkerPool:
    with _pools_lock:
        key = (workers, memory_bytes)
        if key not in _pools:
            # -P: no current directory on sys.path, where a file named like a stdlib module could shadow it.
            argv = [
                sys.executable,
                "-P",
                "-c",
                "from filtered_rl.verifiers.math import _worker_main; _worker_main()",
                str(memory_bytes),
            ]
            env = {**SCRUBBED_ENV, **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
            _pools[key] = WorkerPool(argv, workers, env=env)
        return _pools[key]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _gold_text(gold: Any) -> str | None:
    """The gold as sent to the helpers (and as the verdict cache keys it); None: no gold (key only)."""
    if gold is None:
        return None
    return gold if isinstance(gold, str) else repr(gold)


class _BoundedCache:
    """A thread-safe mapping that forgets its oldest entries beyond `size`."""

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = value
            while len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self) -> tuple[type, tuple[int]]:  # a pickled or copied verifier starts empty
        return type(self), (self.size,)


def verify_math(completion: Any, gold: Any, gold_style: str = "auto", timeout: float = 5.0) -> bool:
    """Whether `completion` (text or TRL messages) gives the gold answer. Thread-safe; at most ~`timeout` s."""
    return MathVerifier(gold_style=gold_style, timeout=timeout).verify(completion_to_text(completion), gold)


@register_verifier("math")
class MathVerifier(BinaryVerifier):
    """Binary reward for math: 1.0 if the completion's final answer equals the gold, else 0.0.

    `gold_column` names the dataset column with the gold (GSM8K and MATH-500 call it `answer`);
    `gold_style` is one of `GOLD_STYLES` (see the module docstring); `timeout` bounds each judgement
    in seconds (past it: 0.0); `workers` helper processes (default: min(4, CPUs), shared by all
    verifiers with the same settings); `memory_bytes` caps each helper's address space.
    A gold that yields no answer gives None (TRL ignores that reward).

    Each (completion, gold) is judged once: verdict and answer key are kept (the `cache_size` most
    recent), so an evaluation loop's `answer_key` after scoring, or a repeated completion, costs
    nothing, and a judgement that ran out of time is not paid for twice.
    """

    __name__ = "math"
    cache_size = 100_000

    def __init__(
        self,
        gold_column: str = "answer",
        gold_style: str = "auto",
        timeout: float = 5.0,
        workers: int | None = None,
        memory_bytes: int = 4 << 30,
    ):
        if gold_style not in GOLD_STYLES:
            raise ValueError(f"gold_style must be one of {GOLD_STYLES}, got {gold_style!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        self.gold_column, self.gold_style, self.timeout = gold_column, gold_style, timeout
        self.workers = workers or _default_workers()
        self.memory_bytes = memory_bytes
        self._cache = _BoundedCache(self.cache_size)

    def _judgements(self, pairs: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """Replies for (text, gold text or None for the key alone): cached ones, the rest (each distinct
        pair once) from the helpers in parallel, each within `timeout` (see `HELPER_TIME_SHARE`)."""
        found = {pair: self._cache.get(pair) for pair in dict.fromkeys(pairs)}
        missing = [pair for pair, reply in found.items() if reply is None]
        budget = HELPER_TIME_SHARE * self.timeout
        requests = [{"pred": text, "style": self.gold_style, "budget": budget} for text, _ in missing]
        for request, (_, gold) in zip(requests, missing):
            if gold is not None:
                request["gold"] = gold
        replies = _pool(self.workers, self.memory_bytes).map(requests, deadline_s=self.timeout)
        for pair, reply in zip(missing, replies):
            reply = found[pair] = reply or {**_ZERO, "error": "deadline"}
            self._cache.put(pair, reply)
            if pair[1] is not None and reply["gold_ok"]:  # the key does not depend on the gold
                self._cache.put((pair[0], None), {**_ZERO, "key": reply["key"]})
        return [found[pair] for pair in pairs]

    def _rewards(self, texts: list[str], golds: list[Any]) -> list[float | None]:
        todo = [i for i, gold in enumerate(golds) if _usable(gold)]
        replies = self._judgements([(texts[i], _gold_text(golds[i])) for i in todo])
        rewards: list[float | None] = [None] * len(texts)
        for i, reply in zip(todo, replies):
            rewards[i] = float(reply["valid"]) if reply["gold_ok"] else None
        return rewards

    def verify(self, text: str, gold: Any) -> bool:
        return self._rewards([text], [gold])[0] == 1.0

    def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **columns: Any
    ) -> list[float | None]:
        texts, rows = self._texts_and_rows(completions, columns)
        return self._rewards(texts, [row[self.gold_column] for row in rows])

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        return self._rewards([text], [gold])[0]

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        """Normalised final answer (see `_answer_key`); free for texts this verifier has just scored."""
        return self.answer_keys([text])[0]

    def answer_keys(self, texts: list[str]) -> list[str | None]:
        """`answer_key` for many completions at once (in parallel)."""
        return [reply["key"] for reply in self._judgements([(text, None) for text in texts])]


def _usable(gold: Any) -> bool:
    if gold is None or isinstance(gold, bool):
        return False
    if isinstance(gold, float) and not _math.isfinite(gold):
        return False
    return bool(str(gold).strip())
