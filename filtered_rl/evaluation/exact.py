"""Exact evaluation where the valid set is enumerable: π's probability of every valid answer by teacher forcing.

Sampling estimates pass@k and diversity with noise that grows with k; when a task can list its valid
answers (the synthetic tasks can), the quantities the objectives are about are computed exactly from
log π(y|x) and log a(y|x) of each valid y (a = the base model):

    μ_x          = Σ_{y valid} π(y|x)                      exact validity
    pass@k       = 1 − (1 − μ_x)^k                         for every k
    p*(y|x)      = a(y|x) / A(x),  A(x) = Σ_{y valid} a    the filtered model, from the base model itself
    KL(p* ‖ π(·|valid)) = Σ p* (log p* − log π + log μ_x)  distance to p*'s proportions, validity aside
    coverage@k   = Σ_y p*(y)·(1 − (1 − π(y|x))^k)          expected p*-mass of the distinct valid answers
                                                           among k samples (by linearity of expectation)
    H(π(·|valid))                                          entropy of π restricted to valid answers

Only strings that are enumerated count: a valid string the enumeration misses (another spelling of an
answer) is mass this misses. `enumeration_residual` compares μ_x with the sampled validity to measure it.

Prompts are what the sampler conditions on: plain text, or chat messages rendered with the tokenizer's
chat template (`filtered_rl.data.render_prompt`, as `load_task(..., conversational=True)` builds them),
tokenized as the evaluation runner does. Each answer is scored in the one tokenization the tokenizer gives
it alone, then EOS: with a BPE tokenizer a model could write the same string in other token sequences too,
which this does not count (a model trained on tokenized answers puts almost no mass there; the sampled
check in tests/test_exact_real_model.py measures it on SmolLM2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def pstar_proportions(log_base: Sequence[float]) -> np.ndarray:
    """p*(y|x) = a(y|x) / Σ_{y' valid} a(y'|x) over one prompt's enumerated valid answers, from log a."""
    log_base = np.asarray(log_base, dtype=np.float64)
    return np.exp(log_base - np.logaddexp.reduce(log_base))


def exact_prompt_metrics(
    log_pi: Sequence[float], log_base: Sequence[float], ks: Sequence[int]
) -> dict[str, Any]:
    """Exact metrics of one prompt from the log-probs of its enumerated valid answers (same order)."""
    log_pi = np.asarray(log_pi, dtype=np.float64)
    log_base = np.asarray(log_base, dtype=np.float64)
    if log_pi.shape != log_base.shape or log_pi.ndim != 1 or log_pi.size == 0:
        raise ValueError("log_pi and log_base must be 1-D arrays over the same non-empty valid set")
    pi = np.exp(log_pi)
    log_mu = float(np.logaddexp.reduce(log_pi))
    log_a = float(np.logaddexp.reduce(log_base))
    p_star = pstar_proportions(log_base)
    log_pi_valid = log_pi - log_mu
    kl = float(np.sum(p_star * (np.log(np.maximum(p_star, 1e-300)) - log_pi_valid)))
    pi_valid = np.exp(log_pi_valid)
    entropy = float(-np.sum(pi_valid * log_pi_valid))
    mu = math.exp(log_mu)
    # 1 − (1 − q)^k via log1p/expm1: exact for tiny q where the direct form rounds to 0.
    pass_at = {int(k): -math.expm1(k * math.log1p(-min(mu, 1.0 - 1e-16))) for k in ks}
    coverage_at = {
        int(k): float(np.sum(p_star * -np.expm1(k * np.log1p(-np.minimum(pi, 1.0 - 1e-16))))) for k in ks
    }
    return {
        "validity": mu,
        "base_validity": math.exp(log_a),
        "num_valid": int(log_pi.size),
        "kl_pstar_policy_valid": kl,
        "entropy_valid": entropy,
        "pass_at_k": pass_at,
        "coverage_at_k": coverage_at,
    }


def aggregate_exact(per_prompt: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over prompts (each prompt weighs the same, as in pass@k over a benchmark)."""
    if not per_prompt:
        raise ValueError("no prompts to aggregate")
    ks = sorted(per_prompt[0]["pass_at_k"])
    mean = lambda key: float(np.mean([row[key] for row in per_prompt]))  # noqa: E731
    return {
        "num_prompts": len(per_prompt),
        "validity": mean("validity"),
        "base_validity": mean("base_validity"),
        "num_valid": mean("num_valid"),
        "kl_pstar_policy_valid": mean("kl_pstar_policy_valid"),
        "entropy_valid": mean("entropy_valid"),
        "pass_at_k": {k: float(np.mean([row["pass_at_k"][k] for row in per_prompt])) for k in ks},
        "coverage_at_k": {k: float(np.mean([row["coverage_at_k"][k] for row in per_prompt])) for k in ks},
    }


def enumeration_residual(
    sampled_validity: float, exact_validity: float, num_samples: int
) -> dict[str, float]:
    """Valid mass the enumeration misses: sampled validity − exact μ, with the sampling standard error.

    A residual within about two standard errors of 0 says the enumeration covers what the model writes.
    """
    se = math.sqrt(max(exact_validity * (1 - exact_validity), 1e-12) / max(num_samples, 1))
    return {"residual": sampled_validity - exact_validity, "standard_error": se}


def prompt_token_ids(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """The prompt's token ids as the sampler sees them: chat messages through the chat template (whose
    text carries its own special tokens), plain text with the tokenizer's special tokens (as the
    evaluation runner tokenizes it)."""
    from filtered_rl.data import render_prompt

    return tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=isinstance(prompt, str))[
        "input_ids"
    ]


# Models with at least this many parameters score each prompt's answers with the prompt encoded once
# (`shared_prompt_logprobs`); smaller ones (the nano bases) keep the one-pass scoring their published
# figures were computed with. The two agree up to floating-point rounding.
SHARED_PROMPT_MIN_PARAMETERS = 10_000_000


def completion_token_ids(tokenizer: Any, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer as the model writes it: the text, then EOS (how completions end)."""
    return [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]


def exact_evaluation(
    model: Any,
    base_model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    valid_answers: Sequence[Sequence[str]],
    ks: Sequence[int],
    batch_size: int = 256,
    base_log_probs: list[list[float]] | None = None,
    shared_prompt: bool | None = None,
) -> dict[str, Any]:
    """Exact metrics of `model` on `prompts` (plain text or chat messages), each with its enumerated valid
    answers.

    `base_log_probs` (per prompt, per answer in `sorted(answers)` order) may be passed to reuse the base
    model's scores across runs (they do not change with the policy); they are returned under "base_log_probs".
    `shared_prompt`: encode each prompt once for all its answers (`shared_prompt_logprobs`); None: when the
    model has at least `SHARED_PROMPT_MIN_PARAMETERS` parameters.
    """
    import torch

    with torch.inference_mode():
        return _exact_evaluation(
            model,
            base_model,
            tokenizer,
            prompts,
            valid_answers,
            ks,
            batch_size,
            base_log_probs,
            shared_prompt,
        )


def _exact_evaluation(
    model, base_model, tokenizer, prompts, valid_answers, ks, batch_size, base_log_probs, shared_prompt
):
    from filtered_rl.evaluation.generate import sequence_logprobs, shared_prompt_logprobs

    if shared_prompt is None:
        shared_prompt = sum(p.numel() for p in model.parameters()) >= SHARED_PROMPT_MIN_PARAMETERS
    prompt_ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
    answer_ids = [completion_token_ids(tokenizer, sorted(answers)) for answers in valid_answers]
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} lists of valid answers")
    flat_prompts = [ids for ids, answers in zip(prompt_ids, answer_ids) for _ in answers]
    flat_answers = [ids for answers in answer_ids for ids in answers]

    def score(scorer: Any) -> list[float]:
        if shared_prompt:
            grouped = shared_prompt_logprobs(scorer, tokenizer, prompt_ids, answer_ids, batch_size=batch_size)
            return [value for group in grouped for value in group]
        return sequence_logprobs(scorer, tokenizer, flat_prompts, flat_answers, batch_size=batch_size)

    log_pi = score(model)
    if base_log_probs is None:
        flat_base = (  # the base model scored as the policy (step 0, the base's own evaluation): one pass
            log_pi if base_model is model else score(base_model)
        )
        base_log_probs, start = [], 0
        for answers in valid_answers:
            base_log_probs.append(flat_base[start : start + len(answers)])
            start += len(answers)
    per_prompt, start = [], 0
    for answers, base in zip(valid_answers, base_log_probs, strict=True):
        if answers:
            per_prompt.append(exact_prompt_metrics(log_pi[start : start + len(answers)], base, ks))
        start += len(answers)
    return {
        "summary": aggregate_exact(per_prompt),
        "per_prompt": per_prompt,
        "base_log_probs": base_log_probs,
    }
