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
`verify_math` and `MathVerifier` therefore run each judgement in long-lived helper processes (their
main thread keeps math-verify's alarm as a cheap first line) under a hard deadline; a helper that
misses it is killed and replaced and the completion scores 0.0. They are safe from any thread or
process and never hang the caller.
"""

from __future__ import annotations

import logging
import math as _math
import os
import re
import signal
import sys
import threading
from typing import Any

from .base import BinaryVerifier, completion_to_text
from .sandbox import WorkerPool

__all__ = ["GOLD_STYLES", "MathVerifier", "extract_gold", "extract_prediction", "verify_math"]

GOLD_STYLES = ("auto", "gsm8k", "solution", "answer")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")


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


def _judge(request: dict[str, Any], gold_cache: dict[tuple[str, str], list]) -> dict[str, Any]:
    """One judgement inside a helper: {"gold_ok", "valid", "key"}."""
    from math_verify import verify

    alarm = int(request["alarm"])
    pred = extract_prediction(request["pred"], alarm)
    if "gold" not in request:
        return {"gold_ok": True, "valid": False, "key": _bounded_key(pred, alarm)}
    key = (request["gold"], request["style"])
    if key not in gold_cache:
        if len(gold_cache) > 4096:
            gold_cache.clear()
        gold_cache[key] = extract_gold(request["gold"], request["style"], alarm)
    gold = gold_cache[key]
    if not gold:
        return {"gold_ok": False, "valid": False, "key": None}
    valid = bool(pred) and verify(gold, pred, timeout_seconds=alarm)
    key = _bounded_key(pred, alarm) if request.get("want_key") else None
    return {"gold_ok": True, "valid": bool(valid), "key": key}


class _KeyTimeout(Exception):
    pass


def _bounded_key(parsed: list, seconds: int) -> str | None:
    """`_answer_key` under a SIGALRM bound (helpers run it on their main thread): a slow key is no key,
    and never costs a completion its validity, which is decided before."""

    def expire(signum: int, frame: Any) -> None:
        raise _KeyTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return _answer_key(parsed)
    except _KeyTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker_main() -> None:
    """Entry point of a helper process: JSON requests on stdin, one JSON reply per line on stdout."""
    import json
    import resource

    parent_pid, memory_bytes = int(sys.argv[-1]), int(sys.argv[-2])
    if sys.platform == "linux":  # die with the parent even while busy (stdin EOF is seen only when idle)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        return
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies may reach the protocol channel
    gold_cache: dict[tuple[str, str], list] = {}
    # Warm up (imports, grammar, regex caches) before saying ready: requests then meet only their own cost.
    _judge({"pred": r"so \boxed{\frac{1}{2}}", "gold": "#### 0.5", "style": "auto", "alarm": 5}, gold_cache)
    gold_cache.clear()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply = {"pong": True} if request.get("ping") else _judge(request, gold_cache)
        except BaseException as exc:  # MemoryError, math-verify's TimeoutException, RecursionError, ...
            reply = {"gold_ok": True, "valid": False, "key": None, "error": type(exc).__name__}
        out.write(json.dumps(reply) + "\n")
        out.flush()


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
            _pools[key] = WorkerPool(argv, workers)
        return _pools[key]


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _request(pred: str, gold: Any, style: str, timeout: float, want_key: bool = False) -> dict[str, Any]:
    request = {
        "pred": pred,
        "style": style,
        "want_key": want_key,
        "alarm": max(1, int(timeout // 2)),
    }  # math-verify's own per-step alarm, whole seconds
    if gold is not None:
        request["gold"] = gold if isinstance(gold, str) else repr(gold)
    return request


def verify_math(completion: Any, gold: Any, gold_style: str = "auto", timeout: float = 5.0) -> bool:
    """Whether `completion` (text or TRL messages) gives the gold answer. Thread-safe; at most ~`timeout` s."""
    return MathVerifier(gold_style=gold_style, timeout=timeout).verify(completion_to_text(completion), gold)


class MathVerifier(BinaryVerifier):
    """Binary reward for math: 1.0 if the completion's final answer equals the gold, else 0.0.

    `gold_column` names the dataset column with the gold (GSM8K and MATH-500 call it `answer`);
    `gold_style` is one of `GOLD_STYLES` (see the module docstring); `timeout` bounds each judgement
    in seconds (past it: 0.0); `workers` helper processes (default: min(4, CPUs), shared by all
    verifiers with the same settings); `memory_bytes` caps each helper's address space.
    A gold that yields no answer gives None (TRL ignores that reward).
    """

    __name__ = "math"

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
        self._keys: dict[str, str | None] = {}  # answer keys of recently scored completions

    def _judge_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        replies = _pool(self.workers, self.memory_bytes).map(requests, deadline_s=self.timeout)
        return [r or {"gold_ok": True, "valid": False, "key": None, "error": "deadline"} for r in replies]

    def verify(self, text: str, gold: Any) -> bool:
        return self._judge_many([_request(text, gold, self.gold_style, self.timeout)])[0]["valid"]

    def __call__(
        self, prompts: list[Any] | None = None, completions: list[Any] | None = None, **columns: Any
    ) -> list[float | None]:
        texts, rows = self._texts_and_rows(completions, columns)
        golds = [row[self.gold_column] for row in rows]
        todo = [i for i, gold in enumerate(golds) if _usable(gold)]
        replies = self._judge_many(
            [_request(texts[i], golds[i], self.gold_style, self.timeout, want_key=True) for i in todo]
        )
        scores: list[float | None] = [None] * len(completions)
        if len(self._keys) > 100_000:
            self._keys.clear()
        for i, reply in zip(todo, replies):
            scores[i] = float(reply["valid"]) if reply["gold_ok"] else None
            if reply["gold_ok"] and "error" not in reply:
                self._keys[texts[i]] = reply["key"]
        return scores

    def score(self, text: str, gold: Any, row: dict[str, Any]) -> float | None:
        if not _usable(gold):
            return None
        reply = self._judge_many([_request(text, gold, self.gold_style, self.timeout)])[0]
        return float(reply["valid"]) if reply["gold_ok"] else None

    def answer_key(self, text: str, row: dict[str, Any]) -> str | None:
        """Normalised final answer (see `_answer_key`); free for texts this verifier has just scored."""
        if text in self._keys:
            return self._keys[text]
        return self.answer_keys([text])[0]

    def answer_keys(self, texts: list[str]) -> list[str | None]:
        """`answer_key` for many completions at once (in parallel)."""
        return [
            r["key"]
            for r in self._judge_many([_request(t, None, self.gold_style, self.timeout, True) for t in texts])
        ]


def _usable(gold: Any) -> bool:
    if gold is None or isinstance(gold, bool):
        return False
    if isinstance(gold, float) and not _math.isfinite(gold):
        return False
    return bool(str(gold).strip())
