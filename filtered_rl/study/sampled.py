"""Per-prompt sampled metrics of one evaluation, for the study's paired comparisons (any task).

`filtered-rl eval` writes every sample (`samples.jsonl`: prompt, sample index, verdict, answer key) and a
summary of means. The study compares arms prompt by prompt (a paired bootstrap over seeds and prompts), so
it keeps the per-prompt values in `sampled.json`, next to the summary:

- pass@1 and pass@n (the unbiased estimator, n = the samples per prompt);
- distinct valid answers among the n samples, and the answer entropy among the valid ones;
- distinct answers among m valid samples: the expected number of distinct answers when m of the prompt's
  valid samples are drawn without replacement, Σ_a [1 − C(V − c_a, m) / C(V, m)] (V valid samples, c_a of
  answer a), defined where V ≥ m. Unlike the distinct valid answers among n samples, it does not grow with
  validity itself: a model that is twice as often right with the same answer distribution scores the same.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

SAMPLED_FILE = "sampled.json"


def distinct_among_valid(keys: list[str], m: int) -> float | None:
    """Expected number of distinct answers among m of these valid answers drawn without replacement
    (None when fewer than m)."""
    total = len(keys)
    if m < 1:
        raise ValueError(f"m must be ≥ 1, got {m}")
    if total < m:
        return None
    norm = math.comb(total, m)
    return float(sum(1.0 - math.comb(total - c, m) / norm for c in Counter(keys).values()))


def prompt_values(verdicts: list[float | None], keys: list[str | None], m: int) -> dict[str, Any]:
    """The per-prompt metrics of n samples (verdict None: not judged, counted invalid)."""
    from filtered_rl.evaluation import metrics
    from filtered_rl.evaluation.passk import pass_at_k

    n = len(verdicts)
    valid = [(v or 0.0) > 0.5 for v in verdicts]
    count = sum(valid)
    valid_keys = [k for k, ok in zip(keys, valid, strict=True) if ok]
    answered = [k for k in valid_keys if k is not None]
    entropy = metrics.answer_entropy(answered)
    return {
        "valid": count,
        "pass@1": count / n,
        "pass@n": float(pass_at_k(n, count, n)),
        "distinct_valid": metrics.distinct_answers(answered),
        "entropy_valid": None if math.isnan(entropy) else entropy,
        "distinct_m_valid": distinct_among_valid(answered, m) if len(answered) == count else None,
    }


def sampled_metrics(eval_dir: Path, num_samples: int, m: int) -> dict[str, Any]:
    """`sampled.json` of a finished evaluation in `eval_dir` (written once, atomically; reused after)."""
    from filtered_rl.evaluation.outputs import atomic_write_text, read_jsonl

    path = eval_dir / SAMPLED_FILE
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("m") == m and cached.get("num_samples") == num_samples:
            return cached
    by_prompt: dict[str, list[dict]] = {}
    order: dict[str, int] = {}
    for record in read_jsonl(eval_dir / "samples.jsonl"):
        if record["sample_index"] < num_samples:
            by_prompt.setdefault(record["prompt_id"], []).append(record)
            order.setdefault(record["prompt_id"], record.get("prompt_index", len(order)))
    rows = []
    for prompt_id in sorted(by_prompt, key=lambda p: order[p]):
        samples = sorted(by_prompt[prompt_id], key=lambda r: r["sample_index"])
        values = prompt_values([s["verdict"] for s in samples], [s["answer_key"] for s in samples], m)
        rows.append({"prompt_id": prompt_id, **values})
    result = {"num_samples": num_samples, "m": m, "num_prompts": len(rows), "per_prompt": rows}
    atomic_write_text(path, json.dumps(result, indent=1))
    return result
