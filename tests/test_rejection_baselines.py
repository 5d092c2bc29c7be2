"""The rejection-sampling rivals of the filtered objective (docs/baselines.md): offline RFT, online RAFT++ and
Reinforce-Rej.

- Exact advantages on hand-computed groups (mixed, all-valid, none-valid, ties), and each trainer hands TRL
  exactly these and trains a step.
- RFT's optimum is the stored set's per-prompt empirical distribution p̂ (module doc of
  filtered_rl.trainers.rft): trained to convergence on the enumerable one-token task, π reaches p̂ (with and
  without de-duplication), far from p* — which p̂ is chosen to differ from.
- RAFT is REINFORCE on v without a baseline, so validity goes to 1; where it ends among the valid answers is
  measured against p* (KL(p*‖π restricted to valid answers), in the RAFT test's docstring: 2–7 nats, more
  collapsed than GRPO β = 0 on the same task).
- `filtered-rl train --algorithm rft|raft|reinforce_rej` runs a step on the nano countdown model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _common import CPU, t

pytest.importorskip("trl")

from _enumerable import _encode, build_base_model, make_trainer, one_token_task, train_and_measure  # noqa: E402

from filtered_rl.trainers.raft import RAFTConfig, raft_advantages  # noqa: E402
from filtered_rl.trainers.reinforce_rej import ReinforceRejConfig, reinforce_rej_advantages  # noqa: E402
from filtered_rl.trainers.rft import RFTConfig, epoch_steps, rft_training_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")  # TRL/transformers deprecation notices


# ---- RAFT: advantages = the verdicts (of the first k valid samples per group) ------------------------------


def test_raft_keeps_the_valid_samples_of_every_group() -> None:
    valid = t([1, 0, 1, 0] + [1, 1, 1, 1] + [0, 0, 0, 0])  # mixed, all-valid, none-valid
    assert raft_advantages(valid, 4).tolist() == [1, 0, 1, 0] + [1, 1, 1, 1] + [0, 0, 0, 0]


def test_raft_ties_among_valid_samples_go_to_the_first_sampled() -> None:
    """Every valid sample ties at the maximum reward; with a cap of k per group the first k win."""
    valid = t([0, 1, 0, 1] + [1, 1, 1, 1] + [0, 0, 0, 0])
    assert raft_advantages(valid, 4, max_per_group=1).tolist() == [0, 1, 0, 0] + [1, 0, 0, 0] + [0] * 4
    assert raft_advantages(valid, 4, max_per_group=2).tolist() == [0, 1, 0, 1] + [1, 1, 0, 0] + [0] * 4
    assert raft_advantages(valid, 4, max_per_group=4).tolist() == raft_advantages(valid, 4).tolist()


# ---- Reinforce-Rej: ±1 in mixed groups, 0 in degenerate ones --------------------------------------------


def test_reinforce_rej_drops_all_valid_and_all_invalid_groups() -> None:
    valid = t([1, 0, 0, 1] + [1, 1, 1, 1] + [0, 0, 0, 0] + [0, 0, 0, 1])
    assert reinforce_rej_advantages(valid, 4).tolist() == [1, -1, -1, 1] + [0] * 8 + [-1, -1, -1, 1]
    # the paper's ablations: keep one kind of degenerate group
    assert reinforce_rej_advantages(valid, 4, drop="all_invalid").tolist()[4:12] == [1] * 4 + [0] * 4
    assert reinforce_rej_advantages(valid, 4, drop="all_valid").tolist()[4:12] == [0] * 4 + [-1] * 4
    assert reinforce_rej_advantages(valid, 4, drop="none").tolist()[4:12] == [1] * 4 + [-1] * 4
    # a negative reward of 0: RAFT restricted to the mixed groups
    assert reinforce_rej_advantages(valid, 4, negative_reward=0.0).tolist() == [1, 0, 0, 1] + [0] * 8 + [
        0,
        0,
        0,
        1,
    ]
    assert reinforce_rej_advantages(valid, 4, negative_reward=-0.5).tolist()[:4] == [1, -0.5, -0.5, 1]


def test_reinforce_rej_ties_a_group_of_equal_verdicts_is_dropped_whatever_its_size() -> None:
    """A group whose verdicts all tie (reward std 0, the authors' test) teaches nothing; two samples suffice."""
    valid = t([1, 1] + [0, 0] + [1, 0] + [0, 1])
    assert reinforce_rej_advantages(valid, 2).tolist() == [0, 0, 0, 0, 1, -1, -1, 1]


# ---- configs: the authors' defaults, errors that name the field -----------------------------------------


def test_configs_carry_the_authors_defaults(tmp_path: Path) -> None:
    raft = RAFTConfig(output_dir=str(tmp_path), **CPU)
    assert (raft.beta, raft.epsilon, raft.raft_max_per_group) == (0.001, 0.2, None)
    rej = ReinforceRejConfig(output_dir=str(tmp_path), **CPU)
    assert (rej.beta, rej.delta, rej.reinforce_rej_negative_reward, rej.reinforce_rej_filter) == (
        0.001, 3.0, -1.0, "both",
    )  # fmt: skip
    rft = RFTConfig(output_dir=str(tmp_path), rehearsal_path="x", per_device_train_batch_size=8, **CPU)
    assert (rft.rft_epochs, rft.rft_dedup, rft.rft_samples_per_prompt, rft.rft_batch_size, rft.beta) == (
        3.0, True, None, 8, 0.0,
    )  # fmt: skip
    for config in (RAFTConfig, ReinforceRejConfig, RFTConfig):
        for name, spec in config.__dataclass_fields__.items():
            if name.startswith(("raft_", "reinforce_rej_", "rft_")) or name == "rehearsal_path":
                assert spec.metadata.get("help"), f"{config.__name__}.{name} has no help"


@pytest.mark.parametrize(
    ("config", "overrides", "field"),
    [
        (RAFTConfig, dict(raft_max_per_group=0), "raft_max_per_group"),
        (RAFTConfig, dict(beta=-1.0), "beta"),
        (ReinforceRejConfig, dict(reinforce_rej_negative_reward=-2.0), "reinforce_rej_negative_reward"),
        (ReinforceRejConfig, dict(reinforce_rej_negative_reward=0.5), "reinforce_rej_negative_reward"),
        (ReinforceRejConfig, dict(reinforce_rej_filter="some"), "reinforce_rej_filter"),
        (ReinforceRejConfig, dict(delta=1.1), "delta"),
        (RFTConfig, dict(rehearsal_path=None), "rehearsal_path"),
        (RFTConfig, dict(rft_samples_per_prompt=0), "rft_samples_per_prompt"),
        (RFTConfig, dict(rft_epochs=0.0), "rft_epochs"),
        (RFTConfig, dict(rft_batch_size=0), "rft_batch_size"),
        (RFTConfig, dict(beta=0.1), "beta"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, config, overrides: dict, field: str) -> None:
    values = dict(output_dir=str(tmp_path), **CPU)
    if config is RFTConfig:
        values["rehearsal_path"] = str(tmp_path / "set")
    with pytest.raises(ValueError, match=field):
        config(**(values | overrides))


# ---- RFT's training set: budget, de-duplication, epochs ----------------------------------------------------


def stored(prompt: str, completion: list[int], index: int | None) -> dict:
    sample = {"prompt_key": prompt, "prompt_ids": [1], "completion_ids": completion, "base_logprobs": [0.0]}
    return sample if index is None else sample | {"sample_index": index}


def test_rft_training_set_budget_and_dedup() -> None:
    samples = [stored("a", [5], 0), stored("a", [6], 2), stored("a", [5], 3), stored("a", [7], 9),
               stored("b", [5], 1), stored("b", [5], 4)]  # fmt: skip
    pairs = lambda kept: [(s["prompt_key"], s["completion_ids"][0]) for s in kept]  # noqa: E731
    assert pairs(rft_training_set(samples, dedup=False)) == [
        ("a", 5),
        ("a", 6),
        ("a", 5),
        ("a", 7),
        ("b", 5),
        ("b", 5),
    ]
    assert pairs(rft_training_set(samples)) == [
        ("a", 5),
        ("a", 6),
        ("a", 7),
        ("b", 5),
    ]  # same completion, other prompt: kept
    assert pairs(rft_training_set(samples, samples_per_prompt=4, dedup=False)) == [
        ("a", 5),
        ("a", 6),
        ("a", 5),
        ("b", 5),
    ]
    assert pairs(rft_training_set(samples, samples_per_prompt=1)) == [("a", 5)]
    with pytest.raises(ValueError, match="rft_samples_per_prompt"):
        rft_training_set([stored("a", [5], None)], samples_per_prompt=2)
    assert epoch_steps(10, 3.0, 4, 2, 1) == 4  # ceil(30 / 8)
    assert epoch_steps(10, 0.01, 4, 1, 1) == 1


def write_stored_set(folder: Path, model_dir: Path, rows: list[tuple[str, str]], *, min_correct: int = 1,
                     num_samples: int = 8) -> None:  # fmt: skip
    """A stored set of verified samples by hand: (prompt, completion text) per sample, in draw order."""
    from transformers import AutoTokenizer

    from filtered_rl.control import prompt_key
    from filtered_rl.rehearsal import FORMAT, INFO_FILE, REHEARSAL_FILE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    index: dict[str, int] = {}
    samples = []
    for prompt, text in rows:
        index[prompt] = index.get(prompt, -1) + 1
        samples.append({"prompt_key": prompt_key(prompt), "prompt_ids": _encode(tokenizer, prompt),
                        "completion_ids": _encode(tokenizer, text), "base_logprobs": [0.0] * len(text),
                        "sample_index": index[prompt]})  # fmt: skip
    folder.mkdir(parents=True)
    (folder / REHEARSAL_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    info = {"format": FORMAT, "rehearsal_samples": len(samples), "min_correct": min_correct,
            "num_samples": num_samples, "near_perfect_keys": sorted({prompt_key(p) for p, _ in rows})}  # fmt: skip
    (folder / INFO_FILE).write_text(json.dumps(info))


# ---- inside TRL: the trainer hands TRL the pure function's advantages, then trains --------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("algorithm", ["raft", "reinforce_rej", "rft"])
def test_trainer_hands_trl_the_pure_advantages_and_trains(
    algorithm: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from _tiny_model import has_digit
    from datasets import Dataset

    from filtered_rl.trainers import ALGORITHMS

    entry = ALGORITHMS[algorithm]
    rows = [{"prompt": f"q{i}:"} for i in range(4)]
    options: dict = dict(raft=dict(), reinforce_rej=dict(), rft=dict(rft_batch_size=2))[algorithm]
    if algorithm == "rft":
        write_stored_set(tmp_path / "set", tiny_model_dir, [("q0:", "12"), ("q0:", "7"), ("q1:", "3")])
        options["rehearsal_path"] = str(tmp_path / "set")
    args = entry.config_class(
        output_dir=str(tmp_path / "out"), max_completion_length=8, num_generations=4, per_device_train_batch_size=8,
        max_steps=1, learning_rate=1e-2, seed=0, **CPU, **options,
    )  # fmt: skip
    trainer = entry.trainer_class(
        model=str(tiny_model_dir), reward_funcs=has_digit, args=args, train_dataset=Dataset.from_list(rows)
    )
    assert (trainer.ref_model is None) == (args.beta == 0)  # a reference model only for TRL's KL term
    trainer.model.train()
    inputs = [row for row in rows[:2] for _ in range(4)]
    output = trainer._generate_and_score_completions(inputs)
    completions = trainer.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
    valid = t(has_digit(completions))
    want = {
        "raft": raft_advantages(valid, 4),
        "reinforce_rej": reinforce_rej_advantages(valid, 4),
        "rft": torch.zeros_like(valid),
    }[algorithm]
    torch.testing.assert_close(output["advantages"].double(), want)

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    assert f"{algorithm}/validity" in logs[0]
    if algorithm == "rft":
        assert math.isfinite(logs[0]["rft/nll"]) and logs[0]["rft/nll"] > 0


def test_rft_epochs_set_the_length_and_draw_each_sample_once_per_epoch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from _tiny_model import has_digit
    from datasets import Dataset

    from filtered_rl.trainers.rft import RFTTrainer

    write_stored_set(tmp_path / "set", tiny_model_dir, [("q0:", "1"), ("q0:", "2"), ("q1:", "3")])
    args = RFTConfig(
        output_dir=str(tmp_path / "out"), rehearsal_path=str(tmp_path / "set"), max_completion_length=4,
        num_generations=2, per_device_train_batch_size=4, max_steps=-1, rft_epochs=2.0, rft_batch_size=2, **CPU,
    )  # fmt: skip
    trainer = RFTTrainer(
        model=str(tiny_model_dir),
        reward_funcs=has_digit,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "q0:"}]),
    )
    assert trainer.args.max_steps == 3  # ceil(2 epochs · 3 samples / 2 per step)
    draws = [s["completion_ids"][0] for _ in range(3) for s in trainer._draw_samples()]
    assert (
        sorted(draws[:3]) == sorted(draws[3:6]) == sorted(s["completion_ids"][0] for s in trainer.rft_samples)
    )


def test_rft_refuses_sets_that_do_not_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Refused before the model loads: a set kept only for near-perfect prompts, a budget above the draws, none."""
    from filtered_rl.trainers.rft import RFTTrainer

    write_stored_set(tmp_path / "dph", tiny_model_dir, [("q0:", "1")], min_correct=3)
    write_stored_set(tmp_path / "k4", tiny_model_dir, [("q0:", "1")], num_samples=4)
    cases = [("dph", {}, ValueError, "--min-correct 1"), ("k4", dict(rft_samples_per_prompt=8), ValueError,
             "rft_samples_per_prompt=8 exceeds"), ("none", {}, FileNotFoundError, "rehearsal-sample")]  # fmt: skip
    for folder, options, error, message in cases:
        args = RFTConfig(
            output_dir=str(tmp_path / "o"), rehearsal_path=str(tmp_path / folder), **CPU, **options
        )
        with pytest.raises(error, match=message):
            RFTTrainer(model="not/a/model", reward_funcs=lambda **k: [], args=args)


# ---- end points on the enumerable one-token task ----------------------------------------------------------

TASK = one_token_task((0.2,))
# Verified draws of q0, chosen far from p* (p* gives '0' 0.27, '8' 0.03, '9' 0.02): the empirical distribution
# p̂ is 3/6, 2/6, 1/6 on '9', '8', '0' with duplicates, and uniform 1/3 after de-duplication.
DRAWS = ["9", "8", "9", "0", "9", "8"]
# Tolerances at the end of 150 full-batch steps: KL(p̂‖π) < 0.005 and |π − p̂| < 0.01 on every answer.
# Measured (torch 2.13 CPU): KL(p̂‖π) = 1e-4 and max |π − p̂| = 1e-4, with and without de-duplication.
RFT_KL_TOLERANCE, RFT_PROB_TOLERANCE = 0.005, 0.01


def exact_pstar(base) -> torch.Tensor:
    p_star = torch.where(base.valid, base.log_probs.exp(), torch.zeros_like(base.log_probs))
    return p_star / p_star.sum()


@pytest.mark.parametrize("dedup", [False, True])
def test_rft_converges_to_the_stored_sets_empirical_distribution(dedup: bool, tmp_path: Path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base_dir = build_base_model(tmp_path / "base", TASK)
        prompt = TASK.prompts[0].prompt
        write_stored_set(tmp_path / "set", base_dir, [(prompt, d) for d in DRAWS], num_samples=len(DRAWS))
        size = 3 if dedup else len(DRAWS)  # one whole epoch per step: the exact NLL gradient of p̂
        trainer = make_trainer("rft", base_dir, TASK, tmp_path / "out", steps=150, learning_rate=1e-2,
                               rehearsal_path=str(tmp_path / "set"), rft_dedup=dedup, rft_batch_size=size)  # fmt: skip
        outcome = train_and_measure(trainer, TASK)
    finally:
        torch.set_num_threads(previous)
    base, policy = outcome.base[0], outcome.policy[0]
    strings = [trainer.processing_class.decode([i], skip_special_tokens=True) for i in range(len(base.valid))]
    counts = {d: (1 if dedup else DRAWS.count(d)) for d in DRAWS}
    p_hat = t([counts.get(s, 0) for s in strings])
    p_hat = p_hat / p_hat.sum()
    pi = policy.log_probs.exp()
    support = p_hat > 0
    kl_to_p_hat = float((p_hat[support] * (p_hat[support].log() - pi[support].log())).sum())
    p_star = exact_pstar(base)
    kl_to_pstar = float((p_star[p_star > 0] * (p_star[p_star > 0].log() - pi[p_star > 0].log())).sum())
    assert kl_to_p_hat < RFT_KL_TOLERANCE, (kl_to_p_hat, pi[support], p_hat[support])
    assert float((pi - p_hat).abs().max()) < RFT_PROB_TOLERANCE
    assert outcome.validity > 0.97  # p̂ has valid answers only
    assert kl_to_pstar > 1.0  # it went to the stored set, not to p*
    logged = [h["rft/nll"] for h in trainer.state.log_history if "rft/nll" in h]
    assert logged[-1] < logged[0]


def test_raft_drives_validity_to_one_and_its_end_point_is_measured_against_pstar(tmp_path: Path) -> None:
    """RAFT's expected gradient is E_π[v ∇log π] = ∇E_π[v]: validity → 1 (asserted). Among valid answers it
    does not keep p*'s proportions: a valid answer's logit grows at rate π(y)(1 − V) (the likely ones fastest),
    and an all-valid group still gets advantage 1 on every sample, a gradient of mean 0 but not 0 per batch,
    which Adam rescales into a random walk of the proportions. Measured (torch 2.13 CPU, 200 steps, lr 1e-2,
    beta 0, G = 16; p*'s likeliest valid answer has 0.265): KL(p*‖π restricted to valid answers) = 4.86,
    6.69, 2.27 nats for seeds 0, 1, 2 (the likeliest valid answer holds 0.998, 1.000, 0.631); with the
    authors' beta = 0.001: 4.86, 6.68, 4.83. Same task and budget, GRPO β = 0: 0.98, 1.56, 1.77 and
    Reinforce-Rej (beta 0): 1.46, 1.97, 2.14: RAFT ends the most collapsed. The base model has 0."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base_dir = build_base_model(tmp_path / "base", TASK)
        trainer = make_trainer(
            "raft", base_dir, TASK, tmp_path / "out", steps=200, learning_rate=1e-2, beta=0.0
        )
        outcome = train_and_measure(trainer, TASK)
    finally:
        torch.set_num_threads(previous)
    kl_valid = outcome.kl_valid[0]
    print(f"raft end point: validity {outcome.validity:.4f}, KL(p*|pi valid) {kl_valid:.4f}")
    assert outcome.validity > 0.95
    assert math.isfinite(kl_valid)


# ---- `filtered-rl train --algorithm rft|raft|reinforce_rej` on the nano countdown model --------------------


@pytest.fixture(scope="module")
def nano_pstar_set(nano_model_dir: Path, tmp_path_factory) -> Path:
    """The offline step for rft: 16 training prompts × K = 8 base samples, every verified one kept."""
    from filtered_rl.rehearsal import sample_rehearsal

    out = tmp_path_factory.mktemp("rehearsal") / "set"
    info = sample_rehearsal(str(nano_model_dir), out, num_samples=8, min_correct=1, dataset="countdown",
                            split="train", num_prompts=16, max_new_tokens=24, seed=0, progress=False)  # fmt: skip
    assert info["rehearsal_samples"] > 0
    return out


@pytest.mark.parametrize("algorithm", ["rft", "raft", "reinforce_rej"])
def test_filtered_rl_train_runs_a_step_on_the_nano_model(
    algorithm: str, nano_model_dir: Path, tmp_path: Path, request
) -> None:
    """The nano recipe's section for the algorithm, one step, in process (the 2-process launch is
    tests/test_baselines_launch.py, slow)."""
    from filtered_rl.train import main

    extra = ["--rehearsal_path", str(request.getfixturevalue("nano_pstar_set"))] if algorithm == "rft" else []
    out = tmp_path / "run"
    code = main(
        ["--config", str(ROOT / "recipes" / "configs" / "countdown-nano-cpu.yaml"), "--algorithm", algorithm,
         "--model_name_or_path", str(nano_model_dir), "--output_dir", str(out), "--countdown_train_prompts", "16",
         "--max_steps", "1", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--disable_tqdm", "true",
         *extra]
    )  # fmt: skip
    assert code in (0, None)
    state = (
        json.loads((out / "trainer_state.json").read_text())
        if (out / "trainer_state.json").exists()
        else None
    )
    assert (out / "model.safetensors").exists()
    if state is not None:
        logs = [entry for entry in state["log_history"] if "loss" in entry]
        assert logs and f"{algorithm}/validity" in logs[0]
