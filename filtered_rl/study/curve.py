"""Exact validity and diversity *during* training: the curves that show whether a run has plateaued.

The frontier evaluates every run once at the end; whether a budget was long enough (the fastest arm's
validity flat) and how diversity moved on the way there need the same metrics at intermediate steps.
Where the task enumerates its valid answers this is cheap: teacher forcing the held-out prompts' valid
answers (about 1,300 sequences for 48 subset_sum prompts) takes about a second for the nano model, so a
callback measures exact validity, pass@256, coverage@256 and KL(p*‖π(·|valid)) every few steps
(`filtered_rl.evaluation.exact`), reusing the base model's log-probs, which do not change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

CURVE_FILE = "exact_curve.jsonl"


def curve_point(step: int, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the curve: the step and the exact summary's headline numbers (k as the summary keys)."""
    return {
        "step": step,
        "validity": summary["validity"],
        "pass@256": summary["pass_at_k"][256],
        "coverage@256": summary["coverage_at_k"][256],
        "kl_valid": summary["kl_pstar_policy_valid"],
        "entropy_valid": summary["entropy_valid"],
    }


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The curve's points by step; a step measured twice (a resumed run) keeps its last measurement."""
    if not path.exists():
        return []
    points: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                point = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            points[point["step"]] = point
    return [points[s] for s in sorted(points)]


class ExactCurveCallback(TrainerCallback):
    """Every `every` steps (and at steps 0 and max_steps), the policy's exact metrics on fixed prompts."""

    def __init__(
        self,
        base_model: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        valid_answers: Sequence[Sequence[str]],
        every: int,
        path: Path,
    ):
        from filtered_rl.evaluation.exact import exact_evaluation

        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.tokenizer, self.every, self.path = tokenizer, every, Path(path)
        self.prompts = list(prompts)
        self.answers = [sorted(a) for a in valid_answers]
        self.base_log_probs = exact_evaluation(
            base_model, base_model, tokenizer, self.prompts, self.answers, ks=(256,)
        )["base_log_probs"]
        self.done = {point["step"] for point in read_curve(self.path)}

    def measure(self, model: Any, step: int) -> dict[str, Any]:
        from filtered_rl.evaluation.exact import exact_evaluation

        was_training = model.training
        model.eval()
        try:
            result = exact_evaluation(
                model, None, self.tokenizer, self.prompts, self.answers, ks=(1, 256),
                base_log_probs=self.base_log_probs,
            )  # fmt: skip
        finally:
            model.train(was_training)
        point = curve_point(step, result["summary"])
        with self.path.open("a") as f:  # one line per point: a kill loses at most the line being written
            f.write(json.dumps(point) + "\n")
        self.done.add(step)
        return point

    def _maybe_measure(self, state: Any, model: Any) -> None:
        step = state.global_step
        due = step % self.every == 0 or step == state.max_steps
        if model is not None and due and step not in self.done:
            self.measure(model, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe_measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe_measure(state, model)
