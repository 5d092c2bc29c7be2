"""The literature's diversity-collapse remedies (docs/baselines.md): their advantages and losses exactly, on
hand-computed groups, and inside TRL (the trainer hands TRL the pure function's values, then trains a step).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from _common import CPU, t

from filtered_rl.trainers._grpo import group_zscore
from filtered_rl.trainers.dph_rehearsal import DPHConfig, rehearsal_divergence
from filtered_rl.trainers.inverse_success import InverseSuccessConfig, inverse_success_advantages
from filtered_rl.trainers.mara import MARAConfig, mara_advantages, mara_rewards
from filtered_rl.trainers.passk_training import PassKConfig, passk_advantages
from filtered_rl.trainers.unlikeliness import UnlikelinessConfig, likelihood_ranks, unlikeliness_rewards


def close(actual, expected, tol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=tol, atol=tol)


STD_TOL = 1e-7  # TRL's nanstd computes its Bessel factor count/(count − 1) in float32


# ---- the shared group z-score (TRL's formula) ------------------------------------------------------------


def test_group_zscore_is_trls_formula_with_nan_rows_left_out() -> None:
    std = 0.5  # unbiased std of [1, 0, 0, 0]
    close(
        group_zscore(t([1, 0, 0, 0]), 4, "group"),
        [x / (std + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)],
        STD_TOL,
    )
    close(group_zscore(t([1, 0, 0, 0]), 4, "none"), [0.75, -0.25, -0.25, -0.25])
    # an unscored row (NaN) is out of the mean and std, and gets 0
    std = math.sqrt((1 / 9 + 4 / 9 + 1 / 9) / 2)
    close(
        group_zscore(t([math.nan, 1, 0, 1]), 4, "group"),
        [0, (1 / 3) / (std + 1e-4), (-2 / 3) / (std + 1e-4), (1 / 3) / (std + 1e-4)],
        STD_TOL,
    )
    batch_std = t([1, 0, 0, 0, 1, 1, 1, 1]).std().item()
    close(
        group_zscore(t([1, 0, 0, 0, 1, 1, 1, 1]), 4, "batch")[:4],
        [x / (batch_std + 1e-4) for x in (0.75, -0.25, -0.25, -0.25)],
        STD_TOL,
    )


# ---- MARA ------------------------------------------------------------------------------------------------


def test_mara_anchors_every_high_reward_sample_to_the_likeliest_one() -> None:
    reward = t([1, 0, 1, 1, 0, 0, 0, 0, math.nan, 0.5, 1, 1])
    log_ref = t([-2, -1, -5, -3, -1, -2, -3, -4, 0, 0, -1, -4])
    augmented = mara_rewards(reward, log_ref, 4, beta=0.5, tau=1.0)
    # group 1: anchor = sample 0 (log a = −2): 1 + 0.5·(−2 − log a_i); group 2: no sample ≥ τ, unchanged;
    # group 3: NaN and 0.5 < τ stay, anchor = sample 2 (log a = −1).
    expected = [1, 0, 2.5, 1.5, 0, 0, 0, 0, math.nan, 0.5, 1, 2.5]
    torch.testing.assert_close(augmented, t(expected), rtol=0, atol=1e-12, equal_nan=True)
    # The point of it: log a + R̄/β is one number over S, so the KL-optimal target a·exp(R̄/β) is flat there.
    in_set = [0, 2, 3]
    tilt = log_ref[in_set] + augmented[in_set] / 0.5
    close(tilt, [0.0, 0.0, 0.0])  # −2 + 1/0.5, −5 + 2.5/0.5, −3 + 1.5/0.5


def test_mara_advantages_fold_the_kl_into_the_reward_before_the_group_baseline() -> None:
    reward, log_ref = t([1, 0, 1, 1]), t([-2, -1, -5, -3])
    log_pi = t([-1, -1, -4, -2])
    # R̃ = R̄ − β(log π − log a) = [1, 0, 2.5, 1.5] − 0.5·[1, 0, 1, 1] = [0.5, 0, 2, 1]; mean 0.875
    close(
        mara_advantages(reward, log_ref, log_pi, 4, beta=0.5, scale_rewards="none"),
        [-0.375, -0.875, 1.125, 0.125],
    )
    std = math.sqrt((0.375**2 + 0.875**2 + 1.125**2 + 0.125**2) / 3)
    close(
        mara_advantages(reward, log_ref, log_pi, 4, beta=0.5, scale_rewards="group"),
        [x / (std + 1e-4) for x in (-0.375, -0.875, 1.125, 0.125)],
        STD_TOL,
    )
    # mara_kl="loss": no KL in the reward (TRL's k3 term carries it): R̄ = [1, 0, 2.5, 1.5], mean 1.25
    close(
        mara_advantages(reward, log_ref, log_pi, 4, beta=0.5, kl_in_reward=False, scale_rewards="none"),
        [-0.25, -1.25, 1.25, 0.25],
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mara_beta=0.0), "mara_beta"),
        (dict(mara_beta=float("nan")), "mara_beta"),
        (dict(mara_kl="both"), "mara_kl"),
        (dict(beta=0.04), "beta=0.04 with mara_kl='reward'"),
        (dict(mara_kl="loss", beta=0.0, scale_rewards="none"), "set beta: 0.1"),
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
    ],
)
def test_mara_config_errors_name_the_field(tmp_path, overrides, field) -> None:
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        MARAConfig(output_dir=str(tmp_path), **CPU, **overrides)


def test_mara_kl_in_the_loss_with_std_scaling_warns(tmp_path) -> None:
    with pytest.warns(UserWarning, match="effective KL coefficient"):
        MARAConfig(output_dir=str(tmp_path), mara_kl="loss", beta=0.1, **CPU)


# ---- Pass@k training -------------------------------------------------------------------------------------


def test_passk_advantages_on_hand_computed_groups() -> None:
    # N = 4, k = 2. c = 1: ρ = 1 − C(3,2)/C(4,2) = 1/2, σ = 1/2; correct (1 − ρ)/σ = 1,
    # incorrect (1 − ρ − C(2,1)/C(3,1))/σ = (1/2 − 2/3)/(1/2) = −1/3.
    # c = 2: ρ = 5/6, σ = √5/6; correct 1/√5, incorrect (1/6 − 1/3)/(√5/6) = −1/√5.
    # c = 3: only one incorrect sample < k, every pair passes: ρ = 1, σ = 0 → 0. c = 0, c = 4 → 0.
    valid = t([0, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    r5 = 1 / math.sqrt(5)
    expected = [-1 / 3, 1, -1 / 3, -1 / 3, r5, -r5, r5, -r5] + [0.0] * 12
    close(passk_advantages(valid, 4, 2), expected)


def test_passk_with_k_1_is_the_population_zscore() -> None:
    # ρ = c/N, σ = √(ρ(1−ρ)): the group z-score with the population (biased) std.
    valid = t([1, 0, 0, 0, 1, 1, 0, 1])
    grouped = valid.view(2, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(passk_advantages(valid, 4, 1), expected.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, k", [(6, 3), (5, 2), (8, 4)])
def test_passk_advantages_are_the_mean_over_k_subsets(n: int, k: int) -> None:
    """Brute force: a sample's advantage is (mean pass@k reward of the k-subsets holding it − ρ)/σ."""
    for c in range(n + 1):
        valid = [1.0] * c + [0.0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        rho = sum(max(valid[i] for i in s) for s in subsets) / len(subsets)
        sigma = math.sqrt(rho * (1 - rho))
        expected = []
        for i in range(n):
            holding = [s for s in subsets if i in s]
            mean = sum(max(valid[j] for j in s) for s in holding) / len(holding)
            expected.append((mean - rho) / sigma if sigma > 0 else 0.0)
        torch.testing.assert_close(passk_advantages(t(valid), n, k), t(expected), rtol=1e-10, atol=1e-10)


def test_passk_k_above_the_group_size_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="passk_k=9 exceeds num_generations=8"):
        PassKConfig(output_dir=str(tmp_path), passk_k=9, num_generations=8, **CPU)


def test_passk_k_equal_to_the_group_size_trains_nothing_and_is_refused(tmp_path) -> None:
    """k = G: every k-subset is the whole group, so every sample's advantage is the same, 0 (measured in the
    study: the arm ended exactly at the base model)."""
    valid = t([1.0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert passk_advantages(valid, 8, 8).abs().max() == 0
    assert passk_advantages(valid, 8, 7).abs().max() > 0
    with pytest.raises(ValueError, match="passk_k=8 equals num_generations"):
        PassKConfig(output_dir=str(tmp_path), passk_k=8, num_generations=8, **CPU)
    with pytest.raises(ValueError, match="1 ≤ k ≤ group size 4"):
        passk_advantages(t([1, 0, 0, 0]), 4, 5)


# ---- Unlikeliness reward ---------------------------------------------------------------------------------


def test_likelihood_ranks_are_0_based_ascending_with_stable_ties() -> None:
    close(likelihood_ranks(t([-0.5, -3.0, -2.0, -1.0]), 4).double(), [3, 0, 1, 2])
    close(likelihood_ranks(t([-1.0, -1.0, -2.0, -1.0]), 4).double(), [1, 2, 0, 3])  # ties: earlier lower
    among = torch.tensor([True, False, True, True])
    close(likelihood_ranks(t([-0.5, -3.0, -2.0, -1.0]), 4, among).double(), [2, 0, 0, 1])


def test_unlikeliness_penalises_the_likeliest_correct_sample_most() -> None:
    reward, mean_logp = t([1, 0, 1, 1]), t([-0.5, -3.0, -2.0, -1.0])
    # ranks over the group [3, 0, 1, 2]: r·(1 − 0.25·rank/4)
    close(unlikeliness_rewards(reward, mean_logp, 4, 0.25, "group"), [1 - 0.1875, 0, 1 - 0.0625, 1 - 0.125])
    # ranks among the correct samples [2, –, 0, 1]
    close(unlikeliness_rewards(reward, mean_logp, 4, 0.25, "correct"), [1 - 0.125, 0, 1, 1 - 0.0625])


def test_unlikeliness_matches_the_reference_code_convention() -> None:
    """The authors' verl code: scores · (1 − argsort(argsort(mean log-probs)) / G · rank_penalty)."""
    gen = torch.Generator().manual_seed(0)
    reward = (torch.rand(5, 8, generator=gen) < 0.5).double()
    mean_logp = -torch.rand(5, 8, generator=gen).double()
    ranks = torch.argsort(torch.argsort(mean_logp, dim=1), dim=1) / 8
    reference = reward * (1 - ranks * 0.25)
    close(unlikeliness_rewards(reward.reshape(-1), mean_logp.reshape(-1), 8), reference.reshape(-1).tolist())


def test_unlikeliness_config_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="unlikeliness_penalty=1.5"):
        UnlikelinessConfig(output_dir=str(tmp_path), unlikeliness_penalty=1.5, **CPU)
    with pytest.raises(ValueError, match="unlikeliness_rank_over='reward'"):
        UnlikelinessConfig(output_dir=str(tmp_path), unlikeliness_rank_over="reward", **CPU)


# ---- Inverse-success calibration -------------------------------------------------------------------------


def test_inverse_success_scales_only_positive_advantages_by_the_failure_count(tmp_path) -> None:
    valid = t([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    advantages = group_zscore(valid, 4, "none")  # [.75, −.25 ×3], [.25 ×3, −.75], [0 ×4]
    close(
        inverse_success_advantages(advantages, valid, 4),
        [2.25, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75, 0, 0, 0, 0],
    )
    close(inverse_success_advantages(advantages, valid, 4, alpha=2.0)[:4], [6.75, -0.25, -0.25, -0.25])
    close(inverse_success_advantages(advantages, valid, 4, alpha=0.0), advantages.tolist())
    with pytest.raises(ValueError, match="inverse_success_alpha=-1"):
        InverseSuccessConfig(output_dir=str(tmp_path), inverse_success_alpha=-1.0, **CPU)


# ---- DPH-RL rehearsal loss -------------------------------------------------------------------------------


def test_rehearsal_divergence_generators_per_token() -> None:
    log_u = t([[math.log(2.0), 0.0, -math.log(2.0), 5.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last token is padding
    base = torch.zeros_like(log_u)
    # forward KL, u − log u − 1: (1 − ln 2) + 0 + (ln 2 − 0.5) = 0.5 over 3 tokens
    close(rehearsal_divergence(log_u, base, mask, "forward_kl").reshape(1), [0.5 / 3])
    js = [2 * math.log(2) - 3 * math.log(1.5), 0.0, 0.5 * math.log(0.5) - 1.5 * math.log(0.75)]
    close(rehearsal_divergence(log_u, base, mask, "js").reshape(1), [sum(js) / 3])
    # the authors' clamps: log u to ±20, the forward-KL term to ≤ 10
    close(
        rehearsal_divergence(t([[30.0]]), t([[0.0]]), torch.tensor([[True]]), "forward_kl").reshape(1), [10.0]
    )


def test_rehearsal_divergence_is_zero_with_zero_gradient_at_the_base_model() -> None:
    base = t([[-1.0, -2.0, -0.5]])
    policy = base.clone().requires_grad_(True)
    for divergence in ("forward_kl", "js"):
        loss = rehearsal_divergence(policy, base, torch.ones_like(base, dtype=torch.bool), divergence)
        (grad,) = torch.autograd.grad(loss, policy)
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(), "rehearsal_path is required"),
        (dict(rehearsal_path="x", rehearsal_divergence="reverse_kl"), "rehearsal_divergence='reverse_kl'"),
        (dict(rehearsal_path="x", beta=0.04), "beta=0.04"),
        (dict(rehearsal_path="x", rehearsal_coef=-1.0), "rehearsal_coef=-1.0"),
        (dict(rehearsal_path="x", rehearsal_batch_size=0), "rehearsal_batch_size=0"),
    ],
)
def test_dph_config_errors_name_the_field(tmp_path, overrides, field) -> None:
    with pytest.raises(ValueError, match=field):
        DPHConfig(output_dir=str(tmp_path), **CPU, **overrides)


def test_dph_config_defaults_follow_the_authors(tmp_path) -> None:
    args = DPHConfig(output_dir=str(tmp_path), rehearsal_path="x", per_device_train_batch_size=16, **CPU)
    assert (args.rehearsal_coef, args.rehearsal_batch_size) == (0.01, 4)
    assert (
        DPHConfig(
            output_dir=str(tmp_path), rehearsal_path="x", rehearsal_divergence="js", **CPU
        ).rehearsal_coef
        == 0.1
    )


def test_split_prompts_keeps_correct_finished_samples_of_near_perfect_prompts() -> None:
    from filtered_rl.rehearsal import split_prompts

    def rec(pid, i, verdict, finished=True):
        return {"prompt_id": pid, "sample_index": i, "verdict": verdict, "finished": finished}

    records = [rec("a", 0, 1.0), rec("a", 1, 1.0, finished=False), rec("a", 2, 1.0)]  # all correct
    records += [rec("b", 0, 1.0), rec("b", 1, 0.0), rec("b", 2, None)]  # one of three
    records += [rec("c", 0, 1.0), rec("c", 1, 1.0)]  # incomplete: not judged
    near, kept = split_prompts(records, num_samples=3, min_correct=3)
    assert near == {"a"} and [(r["prompt_id"], r["sample_index"]) for r in kept] == [("a", 0), ("a", 2)]
    near, kept = split_prompts(records, num_samples=3, min_correct=1)
    assert near == {"a", "b"} and [(r["prompt_id"], r["sample_index"]) for r in kept][-1] == ("b", 0)


# ---- inside TRL: the trainer hands TRL the pure function's advantages, then trains --------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}:"} for i in range(n)]


def sequence_logps(model, output) -> torch.Tensor:
    """Σ_t log softmax(logits_t)[y_t] over each completion, by a plain forward (no TRL code)."""
    completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
    ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
    attention = torch.cat([output["prompt_mask"], completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -completion_ids.size(1) - 1 : -1]
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None])[..., 0]
    return (token_logps * completion_mask).sum(1).double()


def write_rehearsal_set(folder: Path, model_dir: Path, prompts: list[str]) -> None:
    """A rehearsal set by hand: one completion per prompt, scored by the tiny model itself (the base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.control import prompt_key
    from filtered_rl.rehearsal import FORMAT, INFO_FILE, REHEARSAL_FILE, completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [
        tokenizer(f" {i}{i}")["input_ids"] + [tokenizer.eos_token_id] for i in range(len(prompts))
    ]
    with torch.no_grad():
        logps, mask = completion_logprobs(model, prompt_ids, completion_ids, tokenizer.pad_token_id)
    samples = [
        {"prompt_key": prompt_key(p), "prompt_ids": pi, "completion_ids": ci, "base_logprobs": lp[: len(ci)]}
        for p, pi, ci, lp in zip(prompts, prompt_ids, completion_ids, logps.tolist())
    ]
    folder.mkdir(parents=True)
    (folder / REHEARSAL_FILE).write_text("".join(json.dumps(s) + "\n" for s in samples))
    info = {
        "format": FORMAT,
        "rehearsal_samples": len(samples),
        "near_perfect_keys": [prompt_key(p) for p in prompts],
    }
    (folder / INFO_FILE).write_text(json.dumps(info))


def expected(algorithm: str, args, reward, valid, log_pi, log_ref, lengths, trl_advantages) -> torch.Tensor:
    g = args.num_generations
    if algorithm == "mara":
        return mara_advantages(
            reward, log_ref, log_pi, g, args.mara_beta, args.mara_tau, True, args.scale_rewards
        )
    if algorithm == "unlikeliness":
        return group_zscore(
            unlikeliness_rewards(reward, log_pi / lengths, g, args.unlikeliness_penalty),
            g,
            args.scale_rewards,
        )
    if algorithm == "passk":
        return passk_advantages(valid, g, args.passk_k)
    if algorithm == "inverse_success":
        return inverse_success_advantages(
            group_zscore(reward, g, args.scale_rewards), valid, g, args.inverse_success_alpha
        )
    return trl_advantages  # dph: TRL's own GRPO advantages


OPTIONS = {
    "mara": dict(mara_beta=0.5),
    "unlikeliness": dict(unlikeliness_penalty=0.5),
    "passk": dict(passk_k=2),
    "inverse_success": dict(),
    "dph": dict(rehearsal_batch_size=2),
}


@pytest.mark.parametrize("algorithm", list(OPTIONS))
def test_trainer_hands_trl_the_pure_advantages_and_trains(algorithm, tiny_model_dir, tmp_path) -> None:
    from _tiny_model import has_digit
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from filtered_rl.trainers import ALGORITHMS

    entry = ALGORITHMS[algorithm]
    options = dict(OPTIONS[algorithm])
    rows = prompt_rows(4)
    if algorithm == "dph":
        write_rehearsal_set(tmp_path / "rehearsal", tiny_model_dir, ["q0:", "q1:"])  # q0, q1 near-perfect
        options["rehearsal_path"] = str(tmp_path / "rehearsal")
    args = entry.config_class(
        output_dir=str(tmp_path / "out"), max_completion_length=8, num_generations=4, per_device_train_batch_size=8,
        max_steps=1, learning_rate=1e-2, seed=0, **CPU, **options,
    )  # fmt: skip
    trainer = entry.trainer_class(
        model=str(tiny_model_dir), reward_funcs=has_digit, args=args, train_dataset=Dataset.from_list(rows)
    )
    assert (trainer.ref_model is None) == (algorithm != "mara")  # only MARA reads log a(y)
    if algorithm == "dph":
        assert sorted(trainer.train_dataset["prompt"]) == ["q2:", "q3:"]  # exploration prompts only
    trainer.model.train()
    inputs = [row for row in rows[:2] for _ in range(4)]
    output = trainer._generate_and_score_completions(inputs)
    completions = trainer.processing_class.batch_decode(output["completion_ids"], skip_special_tokens=True)
    reward = t(has_digit(completions))
    assert 0 < reward.sum() < reward.numel(), "the check needs valid and invalid completions"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    log_pi = log_ref = sequence_logps(base, output)  # the policy is the base model before any step
    lengths = output["completion_mask"].sum(1).double()
    want = expected(algorithm, args, reward, reward, log_pi, log_ref, lengths, output["advantages"].double())
    torch.testing.assert_close(output["advantages"].double(), want, rtol=1e-4, atol=1e-4)
    assert output["advantages"].abs().max() > 1e-3

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"])
    if algorithm == "dph":  # the policy is still the base model at the first loss call: u = 1, f(u) = 0
        assert logs[0]["dph/rehearsal_loss"] == pytest.approx(0.0, abs=1e-5)


def test_dph_refuses_a_missing_rehearsal_folder_before_loading_the_model(tmp_path) -> None:
    from filtered_rl.trainers.dph_rehearsal import DPHTrainer

    args = DPHConfig(output_dir=str(tmp_path), rehearsal_path=str(tmp_path / "none"), **CPU)
    with pytest.raises(FileNotFoundError, match="rehearsal-sample"):
        DPHTrainer(model="not/a/model", reward_funcs=lambda **k: [], args=args)


def test_completion_logprobs_match_an_unpadded_forward(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from filtered_rl.rehearsal import completion_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]
    with torch.no_grad():
        logps, mask = completion_logprobs(model, prompts, completions, pad_id=0)
        for row, (p, c) in enumerate(zip(prompts, completions)):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(logps[row, : len(c)], want, rtol=1e-5, atol=1e-5)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]


# ---- KL-control exactly: the tilted target as an arm of its own ---------------------------------------------


def test_tilted_is_reverse_kl_toward_p_beta_and_trains(tiny_model_dir, tmp_path) -> None:
    from _tiny_model import has_digit
    from datasets import Dataset

    from filtered_rl.trainers.tilted import TiltedConfig, TiltedGRPOTrainer

    with pytest.raises(ValueError, match="algorithm: filtered"):
        TiltedConfig(output_dir=str(tmp_path), target="filtered", **CPU)
    with pytest.raises(ValueError, match="exactly one of target_beta"):
        TiltedConfig(output_dir=str(tmp_path), **CPU)
    args = TiltedConfig(
        output_dir=str(tmp_path / "out"), target_beta=0.5, max_completion_length=8, num_generations=4,
        per_device_train_batch_size=8, max_steps=1, learning_rate=1e-2, partition_estimate="group", **CPU,
    )  # fmt: skip
    assert (args.target, args.divergence) == ("tilted", "reverse_kl")
    trainer = TiltedGRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=has_digit,
        args=args,
        train_dataset=Dataset.from_list(prompt_rows(2)),
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert trainer.state.log_history[0]["filtered/target_beta"] == pytest.approx(0.5)


# ---- the offline step: filtered-rl rehearsal-sample ----------------------------------------------------------


def rehearsal_args(model: Path, out: Path, *extra: str):
    import argparse

    from filtered_rl.rehearsal import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--model", str(model), "--dataset", "countdown", "--num-prompts", "8", "--num-samples", "4",
         "--max-new-tokens", "24", "--batch-size", "32", "--output-dir", str(out), "--no-progress", *extra]
    )  # fmt: skip


def test_rehearsal_sample_stores_base_samples_with_their_per_token_logprobs(nano_model_dir, tmp_path) -> None:
    """The nano base model on 8 countdown prompts, K = 4, near-perfect = at least one correct (so there are some).

    Each stored completion's per-token base log-probs must sum to the log-prob its sampler recorded (the
    sampler *is* the base model at T = 1): a check of the re-tokenisation and of the token alignment.
    """
    from filtered_rl.evaluation.outputs import read_jsonl
    from filtered_rl.rehearsal import load_rehearsal, run

    out = tmp_path / "rehearsal"
    assert run(rehearsal_args(nano_model_dir, out, "--min-correct", "1")) == 0
    rehearsal = load_rehearsal(out)
    info = rehearsal.info
    assert info["prompts"] == 8 and info["near_perfect_prompts"] + info["exploration_prompts"] == 8
    assert info["rehearsal_samples"] == len(rehearsal.samples) > 0
    assert len(rehearsal.near_perfect_keys) == info["near_perfect_prompts"]
    assert info["retokenized_differently"] == 0  # a character tokenizer
    records = {(r["prompt_id"], r["sample_index"]): r for r in read_jsonl(out / "samples.jsonl")}
    for sample in rehearsal.samples:
        record = records[(sample["prompt_id"], sample["sample_index"])]
        assert record["verdict"] == 1.0 and sample["prompt_key"] in rehearsal.near_perfect_keys
        assert len(sample["base_logprobs"]) == len(sample["completion_ids"]) == record["num_tokens"]
        assert sum(sample["base_logprobs"]) == pytest.approx(record["logprob"], abs=1e-3)

    first = (out / "rehearsal.jsonl").read_text()
    assert run(rehearsal_args(nano_model_dir, out, "--min-correct", "1")) == 0  # resumed: nothing new drawn
    assert json.loads((out / "summary.json").read_text())["run"]["new_samples"] == 0
    assert [json.loads(x)["completion"] for x in (out / "rehearsal.jsonl").read_text().splitlines()] == [
        json.loads(x)["completion"] for x in first.splitlines()
    ]
    # the paper's split (all K correct) keeps a subset of those prompts
    assert run(rehearsal_args(nano_model_dir, out)) == 0
    assert load_rehearsal(out).near_perfect_keys <= rehearsal.near_perfect_keys


def test_rehearsal_sample_refuses_min_correct_above_k(tmp_path, capsys) -> None:
    from filtered_rl.rehearsal import run

    assert run(rehearsal_args(Path("unused"), tmp_path, "--min-correct", "5")) == 2
    assert "--min-correct 5" in capsys.readouterr().err


# ---- the frontier's arms -------------------------------------------------------------------------------------


def test_frontier_arms_select_runs_by_name_at_the_presets_sizes() -> None:
    import argparse

    from filtered_rl.synthetic.frontier import (
        ARMS,
        GRPO_BETA_004,
        MARA,
        PASSK,
        PRESETS,
        add_arguments,
        select_arms,
    )

    for name in (
        "mara",
        "dph",
        "unlikeliness",
        "passk",
        "inverse-success",
        "rloo",
        "tilted",
        "grpo-beta-0-04",
    ):
        assert name in ARMS
    from filtered_rl.trainers import ALGORITHMS

    # every arm is a registered algorithm, or the exact p* distillation (an oracle reference, not RL)
    assert all(spec.algorithm in ALGORITHMS or spec.algorithm == "pstar_distill" for spec in ARMS.values())
    chosen = select_arms(PRESETS["cpu"], ["mara", "passk", "grpo-beta-0-04", "mara"])
    assert chosen.runs == (MARA, PASSK, GRPO_BETA_004) and chosen.steps == PRESETS["cpu"].steps
    assert select_arms(PRESETS["cpu"], None) is PRESETS["cpu"]  # default: the preset's own runs
    with pytest.raises(ValueError, match="--arms ppo: unknown"):
        select_arms(PRESETS["cpu"], ["ppo"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--arms", "mara, passk"]).arms == ["mara", "passk"]
    assert parser.parse_args([]).arms is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--arms", "mara,nope"])


def test_objectives_without_log_a_still_get_trls_kl_term_when_beta_is_set(tiny_model_dir, tmp_path) -> None:
    from _tiny_model import has_digit
    from datasets import Dataset

    from filtered_rl.trainers.passk_training import PassKTrainer

    args = PassKConfig(output_dir=str(tmp_path), beta=0.04, passk_k=2, num_generations=4, max_completion_length=8,
                       per_device_train_batch_size=8, **CPU)  # fmt: skip
    trainer = PassKTrainer(
        model=str(tiny_model_dir),
        reward_funcs=has_digit,
        args=args,
        train_dataset=Dataset.from_list(prompt_rows(2)),
    )
    assert trainer.ref_model is not None and trainer.beta == 0.04
    trainer.model.train()
    output = trainer._generate_and_score_completions([row for row in prompt_rows(2) for _ in range(4)])
    assert "ref_per_token_logps" in output  # TRL's k3 term applies


def test_rehearsal_sample_is_a_filtered_rl_subcommand() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "filtered_rl.cli", "rehearsal-sample", "--help"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "--min-correct" in done.stdout and "--output-dir" in done.stdout
