"""Stored samples in an extra loss: what DPH-RL's rehearsal, filtered_pstar's p* draws and RFT share.

Each adds a loss on samples drawn before training (`filtered_rl.rehearsal`). Which samples a loss call
draws depends only on (seed, process, global step, call index in the step), so a resumed run draws the
same ones; the policy scores them at temperature 1, as they were stored.
"""

from __future__ import annotations

from typing import Any

import torch

from filtered_rl.evaluation.generate import sample_seed


def load_verified_samples(path: str, why: str) -> Any:
    """The stored set at `path` (`filtered-rl rehearsal-sample`), refused unless it keeps every prompt's
    verified samples (`--min-correct 1`): a set kept only for prompts with several valid draws is not a
    sample of p* for every prompt. `why` ends the error (what the caller needs the samples for). Read
    before the model loads, so a missing file fails fast."""
    from filtered_rl.rehearsal import load_rehearsal

    stored = load_rehearsal(path)
    if stored.info.get("min_correct", 1) != 1:
        raise ValueError(
            f"{path} keeps only prompts with ≥ {stored.info['min_correct']} verified samples: {why}; "
            "resample with `filtered-rl rehearsal-sample --min-correct 1`"
        )
    return stored


class StoredSampleDraws:
    """Mixin for a `PostScoringTrainer` whose `extra_loss` reads stored samples (prompt_ids, completion_ids)."""

    _draw: tuple[int, int] = (-1, 0)  # (global step, loss calls in that step)

    def next_draw(self) -> tuple[int, int]:
        """(global step, index of this loss call in the step): counts the call, names what it draws."""
        step, calls = self._draw
        calls = calls + 1 if step == self.state.global_step else 0
        self._draw = (self.state.global_step, calls)
        return self._draw

    def draw_generator(self) -> torch.Generator:
        """A generator for this loss call's draw, seeded by (seed, process, global step, call in the step)."""
        step, calls = self.next_draw()
        stream = self.accelerator.process_index * 2**32 + step
        return torch.Generator().manual_seed(sample_seed(self.args.seed, stream, calls))

    def stored_logprobs(self, model: Any, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logps, mask), (B, T): the policy's per-token log-probs of the samples' completions, differentiable."""
        from filtered_rl.rehearsal import completion_logprobs

        pad = self.processing_class.pad_token_id or 0  # padded positions are masked out
        return completion_logprobs(
            model, [s["prompt_ids"] for s in samples], [s["completion_ids"] for s in samples], pad
        )
