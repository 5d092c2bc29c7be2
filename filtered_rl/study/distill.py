"""Distil the filtered model p* exactly: the forward-KL optimum the policy family can reach.

Why: every filtered arm aims at p* = a·v/A but estimates the gradient of KL(p*‖π) from a few samples of π
weighted by p*/π. On a task that enumerates its valid answers the gradient can be computed exactly,

    ∇ KL(p*‖π) = −Σ_{y valid} p*(y|x) ∇log π(y|x),     p*(y|x) = a(y|x) / Σ_{y' valid} a(y'|x),

so a few hundred steps of teacher forcing answer two questions the study needs: can the nano model
represent p* at all (the KL floor it reaches on the prompts it trains on, and how much of that carries to
held-out prompts), and where a forward-KL run with noise-free gradients would sit on the frontier at the
same number of steps and prompts per step (an oracle point, not a method: it needs the valid set).

The loop is plain PyTorch (AdamW, constant learning rate): each step draws `prompts_per_step` training
prompts and weights each of their valid answers by p*(y|x). The exact curve callback measures the held-out
prompts as for the RL arms. A killed run restarts from the base model (its final folder is written last).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pstar_weights(base_log_probs: Sequence[Sequence[float]]) -> list[list[float]]:
    """p*(y|x) over each prompt's valid answers from the base model's log a(y|x); [] for a prompt with none."""
    from filtered_rl.evaluation.exact import pstar_proportions

    return [pstar_proportions(row).tolist() if len(row) else [] for row in base_log_probs]


def distill_pstar(
    base_model: Path,
    prompts: Sequence[str],
    valid_answers: Sequence[Sequence[str]],
    output_dir: Path,
    *,
    steps: int,
    learning_rate: float,
    prompts_per_step: int,
    seed: int,
    curve: Any | None = None,
) -> Path:
    """Train a copy of `base_model` by the exact forward-KL gradient toward p* on `prompts`; returns its
    final folder (reused when present). `curve` (an `ExactCurveCallback`) is measured at its steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import completion_token_ids, exact_evaluation
    from filtered_rl.rehearsal import completion_logprobs
    from filtered_rl.synthetic.console import quiet_libraries

    final = output_dir / "final"
    if (final / "train_minutes.json").exists():
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but was not written by a finished distillation: move it away")
    if steps < 1 or prompts_per_step < 1:
        raise ValueError(f"steps={steps} and prompts_per_step={prompts_per_step} must be ≥ 1")
    answers = [sorted(a) for a in valid_answers]
    kept = [i for i, a in enumerate(answers) if a]  # a prompt without a valid answer has no p*
    if not kept:
        raise ValueError("no prompt has a valid answer: p* is undefined")
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model)
    base = exact_evaluation(model, model, tokenizer, prompts, answers, ks=(1,))["base_log_probs"]
    weights = pstar_weights(base)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answer_ids = [completion_token_ids(tokenizer, a) for a in answers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    if curve is not None:
        curve.measure(model, 0)
    every = curve.every if curve is not None else steps
    for step in range(1, steps + 1):
        draw = torch.randint(len(kept), (prompts_per_step,), generator=generator).tolist()
        chosen = [kept[i] for i in draw]
        rows = [(i, j) for i in chosen for j in range(len(answers[i]))]
        logps, mask = completion_logprobs(
            model, [prompt_ids[i] for i, _ in rows], [answer_ids[i][j] for i, j in rows], pad
        )
        weight = torch.tensor([weights[i][j] for i, j in rows], dtype=logps.dtype, device=logps.device)
        # The cross-entropy H(p*, π) = KL(p*‖π) + H(p*), averaged over the drawn prompts.
        loss = -(weight * (logps * mask).sum(-1)).sum() / prompts_per_step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if curve is not None and (step % every == 0 or step == steps):
            curve.measure(model, step)
    model.eval()
    staging = output_dir / "final.partial"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "train_minutes.json").write_text(json.dumps((time.perf_counter() - start) / 60))
    staging.rename(final)  # final appears complete or not at all
    return final
