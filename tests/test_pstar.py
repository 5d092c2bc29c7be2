"""Samples of p* itself: the filtered objective with stored verified base samples, and p*'s exact distillation.

- `filtered_pstar` adds the NLL of stored draws of p* to forward KL toward p*. On an enumerable task its
  optimum is exact: minimising E[(p* + c·p̂)(−log π)] over π gives π = (p* + c·p̂)/(1 + c), p̂ the stored
  samples' empirical distribution (module doc of filtered_rl.trainers.filtered_pstar). The test trains
  to it, with p̂ chosen far from p* so that reaching p* alone would fail it.
- `distill_pstar` descends the exact KL(p*‖π) on enumerated valid answers: validity rises from the base
  model's while π keeps p*'s proportions among valid answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from _enumerable import _encode, build_base_model, make_trainer, one_token_task, train_and_measure  # noqa: E402

from filtered_rl.synthetic.distill import pstar_weights  # noqa: E402
from filtered_rl.trainers.filtered_pstar import FilteredPStarConfig  # noqa: E402

CPU = dict(use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, save_strategy="no")
TASK = one_token_task((0.2,))
STORED = {"8": 1, "9": 1}  # the two least likely valid digits of q0 (p* gives them 0.03 and 0.02)
COEF = 1.0
pytestmark = pytest.mark.filterwarnings("ignore")  # TRL/transformers deprecation notices


def write_pstar_set(folder: Path, model_dir: Path, prompt: str, counts: dict[str, int], min_correct: int = 1):
    """A stored set of verified one-token samples of `prompt`, `counts[text]` copies of each."""
    from transformers import AutoTokenizer

    from filtered_rl.control import prompt_key
    from filtered_rl.rehearsal import FORMAT, INFO_FILE, REHEARSAL_FILE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [
        {"prompt_key": prompt_key(prompt), "prompt_ids": _encode(tokenizer, prompt),
         "completion_ids": _encode(tokenizer, text), "base_logprobs": [0.0]}
        for text, n in counts.items() for _ in range(n)
    ]  # fmt: skip
    folder.mkdir(parents=True)
    (folder / REHEARSAL_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    info = {"format": FORMAT, "rehearsal_samples": len(samples), "min_correct": min_correct,
            "near_perfect_keys": [prompt_key(prompt)]}  # fmt: skip
    (folder / INFO_FILE).write_text(json.dumps(info))


def test_pstar_weights_are_the_base_models_proportions_among_valid_answers() -> None:
    weights = pstar_weights([[math.log(0.1), math.log(0.3)], [], [-800.0, -801.0]])
    assert weights[0] == pytest.approx([0.25, 0.75])
    assert weights[1] == []
    assert weights[2] == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def test_filtered_pstar_reaches_the_mixture_of_pstar_and_its_stored_samples(tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base_dir = build_base_model(tmp_path / "base", TASK)
        write_pstar_set(tmp_path / "pstar", base_dir, TASK.prompts[0].prompt, STORED)
        a = TASK.prompts[0].base_validity
        trainer = make_trainer(
            "filtered_pstar", base_dir, TASK, tmp_path / "out", steps=120, learning_rate=1e-2,
            lr_scheduler_type="linear", divergence="forward_kl", partition_estimate="column",
            dataset_columns={"base_validity": [a]}, rehearsal_path=str(tmp_path / "pstar"),
            rehearsal_coef=COEF, rehearsal_batch_size=4,
        )  # fmt: skip
        outcome = train_and_measure(trainer, TASK)
    finally:
        torch.set_num_threads(previous)
    base, policy = outcome.base[0], outcome.policy[0]
    strings = [trainer.processing_class.decode([i], skip_special_tokens=True) for i in range(len(base.valid))]
    p_star = torch.where(base.valid, base.log_probs.exp(), torch.zeros_like(base.log_probs))
    p_star = p_star / p_star.sum()
    p_hat = torch.tensor([STORED.get(s, 0) for s in strings], dtype=torch.float64)
    p_hat = p_hat / p_hat.sum()
    optimum = (p_star + COEF * p_hat) / (1 + COEF)
    pi = policy.log_probs.exp()
    kl_to_optimum = float((optimum[optimum > 0] * (optimum[optimum > 0].log() - pi[optimum > 0].log())).sum())
    kl_to_pstar = float((p_star[p_star > 0] * (p_star[p_star > 0].log() - pi[p_star > 0].log())).sum())
    assert outcome.validity > 0.95
    assert kl_to_optimum < 0.02, (kl_to_optimum, pi[optimum > 0], optimum[optimum > 0])
    assert kl_to_pstar > 0.1  # the stored samples moved it: p* alone is not where it went
    logged = [h["filtered/pstar_nll"] for h in trainer.state.log_history if "filtered/pstar_nll" in h]
    assert logged and logged[-1] < logged[0]  # the stored samples' NLL fell


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(rehearsal_path=None), "rehearsal_path"),
        (dict(target="tilted", target_beta=0.1), "target"),
        (dict(rehearsal_coef=-1.0), "rehearsal_coef"),
        (dict(rehearsal_batch_size=0), "rehearsal_batch_size"),
    ],
)
def test_filtered_pstar_config_errors_name_the_field(tmp_path: Path, overrides: dict, field: str) -> None:
    values = dict(output_dir=str(tmp_path), rehearsal_path=str(tmp_path / "set"), **CPU) | overrides
    with pytest.raises(ValueError, match=field):
        FilteredPStarConfig(**values)


def test_filtered_pstar_refuses_a_set_kept_only_for_near_perfect_prompts(tmp_path: Path) -> None:
    """A DPH set (only prompts with ≥ 3 verified samples) is not p*'s draws for every prompt: refused before
    the model loads; a missing folder is refused with the command that writes it."""

    from filtered_rl.trainers.filtered_pstar import FilteredPStarTrainer

    model_dir = build_base_model(tmp_path / "base", TASK, steps=1, tolerance=10.0)
    write_pstar_set(tmp_path / "dph", model_dir, "q0:", {"1": 1}, min_correct=3)
    args = FilteredPStarConfig(output_dir=str(tmp_path / "o"), rehearsal_path=str(tmp_path / "dph"), **CPU)
    with pytest.raises(ValueError, match="--min-correct 1"):
        FilteredPStarTrainer(model="not/a/model", reward_funcs=TASK.verifier, args=args)
    args = FilteredPStarConfig(output_dir=str(tmp_path / "o"), rehearsal_path=str(tmp_path / "none"), **CPU)
    with pytest.raises(FileNotFoundError, match="rehearsal-sample"):
        FilteredPStarTrainer(model="not/a/model", reward_funcs=TASK.verifier, args=args)


def test_distill_pstar_raises_validity_and_keeps_pstars_proportions(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.data import load_task
    from filtered_rl.evaluation.exact import exact_evaluation
    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.distill import distill_pstar
    from filtered_rl.synthetic.frontier import enumerated_answers

    base = load_or_pretrain("nano", seed=0, cache_dir=tmp_path / "base", task="subset_sum", progress=False,
                            steps=4, batch_size=8, corpus_prompts=16, warmup_steps=1)  # fmt: skip
    prompts, answers = enumerated_answers(
        load_task("subset_sum", split="train", seed=0, task_options={"num_train": 2})
    )
    final = distill_pstar(base, prompts, answers, tmp_path / "run", steps=60, learning_rate=3e-3,
                          prompts_per_step=2, seed=0)  # fmt: skip
    assert (final / "train_minutes.json").exists() and not (tmp_path / "run" / "final.partial").exists()
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    before = exact_evaluation(base_model, base_model, tokenizer, prompts, answers, ks=(1,))["summary"]
    after = exact_evaluation(AutoModelForCausalLM.from_pretrained(final), base_model, tokenizer, prompts, answers,
                             ks=(1,))["summary"]  # fmt: skip
    assert after["validity"] > max(0.05, 100 * before["validity"])
    assert after["kl_pstar_policy_valid"] < 0.1
    assert distill_pstar(base, prompts, answers, tmp_path / "run", steps=60, learning_rate=3e-3,
                         prompts_per_step=2, seed=0) == final  # fmt: skip  # finished: reused, not retrained
