"""Countdown at a harder setting: larger numbers and targets, answer-rich prompts, a lower base validity.

On the default countdown (4 numbers from 1..6, targets ≤ 24) the nano base model is valid 15 % of the
time and every prompt has about 10 answers, so pass@64 is already 1.0 and a study cannot see coverage
fall. Here the numbers run to 10 and the targets to 64, and a prompt needs at least 20 distinct answers:
fewer of the model's guesses are valid, and there are many answers to keep or lose. Same grammar,
verifier and enumeration as countdown (`filtered-rl pretrain --task countdown_hard` pretrains its own
base model).
"""

from __future__ import annotations

from typing import Any

from filtered_rl.synthetic.tasks import SyntheticTask, register_task
from filtered_rl.synthetic.tasks.countdown import CountdownTask


@register_task
class CountdownHardTask(CountdownTask):
    """Countdown with numbers up to 10, targets up to 64 and at least 20 answers a prompt."""

    name = "countdown_hard"
    default_options = {"num_numbers": 4, "max_number": 10, "max_target": 64, "min_solutions": 20}
    max_completion_length = 32  # 4 numbers up to 10: answers of at most ~20 characters

    def fingerprint(self) -> dict[str, Any]:
        return SyntheticTask.fingerprint(self)  # countdown keeps a legacy key; this task has its own
