"""Tokenizer, model factory, pretraining, caching and the base model's validity spread."""

from __future__ import annotations

import json
import random

import pytest
import torch

from filtered_rl.synthetic.base_model import (
    SIZES,
    Corpus,
    _batch,
    build_model,
    build_tokenizer,
    count_parameters,
    load_or_pretrain,
    make_config,
    pretrain_base_model,
)
from filtered_rl.synthetic.tasks.countdown import format_prompt, make_countdown_dataset, random_expression

# A few-step configuration: enough to test mechanics, not to learn the task.
TINY = dict(
    steps=6,
    batch_size=8,
    corpus_prompts=40,
    warmup_steps=2,
    task_options=dict(num_numbers=3, max_number=6, max_target=20, min_solutions=2),
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trip_is_exact_on_task_text(tokenizer):
    rng = random.Random(0)
    texts = ["", " ", "6 5 3 1 -> 24:", "(6-5)*(3+1)\n", "  a b\tc  ", "Hello, world! What's 2+2?"]
    for _ in range(200):
        numbers = [rng.randint(1, 12) for _ in range(4)]
        texts.append(format_prompt(numbers, rng.randint(1, 30)) + random_expression(numbers, rng))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_padding(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("1+2<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 4
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1+2"
    text = "1+2 é ✓"  # beyond the task alphabet: bytes, still exact
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    batch = tokenizer(["1", "1+2"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2 and batch["attention_mask"][0] == [
        0,
        0,
        1,
    ]


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "6 5 -> 11:"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\n6 5 -> 11:<|im_end|>\n<|im_start|>assistant\n"


def test_model_sizes(tokenizer):
    nano = count_parameters(build_model("nano", tokenizer))
    assert 1e5 < nano < 1e6  # CPU-sized
    assert set(SIZES) >= {"nano", "small"}
    with pytest.raises(ValueError, match="size"):
        build_model("huge", tokenizer)


def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_model("nano", tokenizer, seed=1).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "6 5 3 1 -> 24:(6-5)*(3+1)"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.eos_token == tokenizer.eos_token
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded_model(ids).logits)


def test_pretraining_lowers_the_loss(tmp_path, tokenizer):
    config = make_config("nano", seed=0, **{**TINY, "steps": 40, "batch_size": 16})
    path = pretrain_base_model(tmp_path / "model", progress=False, **{**TINY, "steps": 40, "batch_size": 16})
    from transformers import AutoModelForCausalLM

    batch = _batch([Corpus(make_config("nano", seed=5, **TINY)).sample() for _ in range(64)], tokenizer)
    with torch.no_grad():
        before = build_model("nano", tokenizer, seed=config.seed)(**batch).loss.item()
        after = AutoModelForCausalLM.from_pretrained(path)(**batch).loss.item()
    assert after < before - 0.5
    info = json.loads((path / "pretrain_info.json").read_text())
    assert info["final_loss"] < info["initial_loss"] and info["config"]["steps"] == 40


def test_pretraining_is_deterministic_under_a_seed(tmp_path):
    from transformers import AutoModelForCausalLM

    weights = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = pretrain_base_model(tmp_path / name, seed=seed, progress=False, **TINY)
        weights.append(AutoModelForCausalLM.from_pretrained(path).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_load_or_pretrain_caches_by_config(tmp_path):
    first = load_or_pretrain("nano", seed=0, cache_dir=tmp_path, progress=False, **TINY)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = load_or_pretrain("nano", seed=0, cache_dir=tmp_path, progress=False, **TINY)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = load_or_pretrain(
        "nano", seed=0, cache_dir=tmp_path, progress=False, **{**TINY, "valid_fraction": 0.3}
    )
    assert other != first
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and ".tmp" in p.name]
    assert leftovers == []


def test_bad_pretraining_options_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="valid_fraction"):
        make_config("nano", valid_fraction=1.5)
    with pytest.raises(ValueError, match="learning_rte"):
        make_config("nano", learning_rte=1e-3)
    with pytest.raises(ValueError, match="size"):
        load_or_pretrain("giant", cache_dir=tmp_path)


def test_pretrain_cli(tmp_path, capsys):
    from filtered_rl.cli import main

    out = tmp_path / "cli-model"
    assert main(["pretrain", "--steps", "3", "--batch-size", "4", "--output-dir", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert "parameters:" in capsys.readouterr().out


def test_fixture_model_has_nontrivial_validity(nano_model_dir, countdown_data):
    from filtered_rl.synthetic.report import validity_report

    report = validity_report(nano_model_dir, countdown_data["test"], num_samples=16, max_prompts=24)
    assert report["overall_validity"] > 0.05
    assert report["mean_distinct_valid"] > 1.0
    assert sum(report["histogram"].values()) == 24


def test_sample_cli_prints_a_histogram(nano_model_dir, capsys):
    from filtered_rl.cli import main

    assert (
        main(["sample", "--model-dir", str(nano_model_dir), "--num-prompts", "4", "--num-samples", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "overall validity" in out and "histogram" in out


@pytest.mark.slow
def test_full_nano_model_has_a_validity_spread(tmp_path):
    """The default nano model: most held-out prompts solved sometimes, in several ways."""
    from filtered_rl.synthetic.report import validity_report

    path = load_or_pretrain("nano", seed=0)
    report = validity_report(path, make_countdown_dataset(0, 64, seed=0)["test"], num_samples=32)
    assert report["fraction_in_5_70"] >= 0.5
    assert report["mean_distinct_valid"] >= 2.0


@pytest.mark.slow
def test_grpo_trainer_accepts_the_model_directory(nano_model_dir, countdown_data, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from filtered_rl.synthetic.tasks.countdown import CountdownVerifier

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=str(nano_model_dir),
        reward_funcs=CountdownVerifier(),
        args=args,
        train_dataset=countdown_data["train"],
    )
    trainer.train()
    assert any("reward" in key for entry in trainer.state.log_history for key in entry)
