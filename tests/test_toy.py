"""The exact toy: its metrics against brute force, its objectives against closed forms, and the CI-sized run.

The CI-sized run (V = 3, L = 5, 7 prompts, three β) takes ~10 s on one core and checks the qualitative
ordering the full run in docs/toy.md shows: KL-control concentrates on fewer valid outputs as β falls,
while forward KL toward p* keeps (almost) all of them and every prompt solvable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from filtered_rl.control import validity_from_beta
from filtered_rl.divergences import f_divergence
from filtered_rl.synthetic import toy
from filtered_rl.synthetic.toy import (
    ToyConfig,
    build_problem,
    coverage_at_k,
    kl_control_loss,
    kl_control_objective,
    minimise,
    outputs_for_mass,
    pass_at_k,
    policy_log_probs,
    policy_metrics,
    tilted_log_probs,
)

torch.set_num_threads(1)


def _random_policy(problem, seed=1, scale=1.5):
    params = toy.init_params(
        problem.base_params[0].shape[0], problem.sequences.shape[1], problem.valid.shape[0], scale, seed
    )
    return policy_log_probs(params, problem.sequences)


def test_policy_is_normalised_and_base_validity_matches_enumeration():
    problem = build_problem(ToyConfig(vocab_size=3, length=3, targets=[1, 3, 5]))
    log_pi = _random_policy(problem)
    assert torch.allclose(torch.logsumexp(log_pi, dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    for x, target in enumerate([1, 3, 5]):
        brute = sum(
            math.exp(problem.log_base[x, i])
            for i, y in enumerate(problem.sequences.tolist())
            if sum(y) == target
        )
        assert problem.base_validity[x].item() == pytest.approx(brute, rel=1e-12)
    assert torch.allclose(problem.log_filtered.exp().sum(dim=1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pass_and_coverage_at_k_match_enumeration_of_k_tuples(k):
    """pass@k and coverage@k against every ordered k-tuple of i.i.d. samples, weighted by its probability."""
    problem = build_problem(ToyConfig(vocab_size=2, length=3, targets=[1, 2]))
    log_pi = _random_policy(problem, seed=3)
    pi, p_star, valid = log_pi.exp(), problem.log_filtered.exp(), problem.valid
    n = pi.shape[1]
    brute_pass, brute_cov = [], []
    for x in range(pi.shape[0]):
        hit_any = covered = 0.0
        for tup in itertools.product(range(n), repeat=k):
            prob = math.prod(pi[x, i].item() for i in tup)
            distinct = set(tup)
            hit_any += prob * any(valid[x, i].item() for i in distinct)
            covered += prob * sum(p_star[x, i].item() for i in distinct)
        brute_pass.append(hit_any)
        brute_cov.append(covered)
    validity = (pi * valid).sum(dim=1)
    assert pass_at_k(validity, k) == pytest.approx(sum(brute_pass) / len(brute_pass), rel=1e-10)
    assert coverage_at_k(log_pi, problem.log_filtered, k) == pytest.approx(
        sum(brute_cov) / len(brute_cov), rel=1e-10
    )


def test_outputs_for_mass_is_the_smallest_subset_reaching_the_mass():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.rand(6, generator=gen, dtype=torch.float64) ** 3
        brute = min(
            size
            for size in range(1, 7)
            for subset in itertools.combinations(range(6), size)
            if probs[list(subset)].sum() >= 0.9 * probs.sum()
        )
        assert outputs_for_mass(probs, 0.9) == brute
    assert outputs_for_mass(torch.tensor([1.0, 0.0, 0.0])) == 1


def test_metrics_against_direct_formulas():
    problem = build_problem(ToyConfig(vocab_size=3, length=3, targets=[2, 4]))
    log_pi = _random_policy(problem, seed=5)
    m = policy_metrics(log_pi, problem, ks=[1, 4])
    kl = [f_divergence(log_pi[x], problem.log_filtered[x], "forward_kl").item() for x in range(2)]
    assert m["kl_filtered_policy"] == pytest.approx(sum(kl) / 2, rel=1e-10)
    # KL(p*‖π) = −log μ + KL(p*‖π restricted to valid): the −log μ barrier against dropping a prompt.
    mu = torch.tensor(m["validity_per_prompt"], dtype=torch.float64)
    assert m["validity"] == pytest.approx(m["pass_at_k"]["1"], rel=1e-12)
    assert m["kl_filtered_policy"] >= float((-mu.log()).mean()) - 1e-12
    pi_valid = log_pi.exp() * problem.valid / mu[:, None]
    entropy = -(torch.xlogy(pi_valid, pi_valid)).sum(dim=1).mean()
    assert m["entropy_valid"] == pytest.approx(float(entropy), rel=1e-10)


def test_kl_control_loss_is_the_kl_control_objective_up_to_its_constant():
    """E_π[v] − β·KL(π‖a) = β·(log Z_β − KL(π‖p_β)), Z_β = Σ_y a(y) e^{v(y)/β}, averaged over prompts."""
    problem = build_problem(ToyConfig(vocab_size=3, length=3, targets=[2, 4]))
    log_pi = _random_policy(problem, seed=7)
    beta = 0.3
    log_z = torch.logsumexp(problem.log_base + problem.valid.double() / beta, dim=1).mean()
    expected = beta * (float(log_z) - float(kl_control_loss(log_pi, problem, beta)))
    assert kl_control_objective(log_pi, problem, beta) == pytest.approx(expected, rel=1e-10)


def test_well_specified_case_reaches_the_tilted_model_and_the_controller_formula():
    """L = 1: each prompt has its own full softmax, so KL-control's optimum is p_β exactly and its
    validity is control.validity_from_beta(β, A) — the misspecification is what the full toy adds."""
    config = ToyConfig(vocab_size=4, length=1, targets=[1, 2], max_iter=500)
    problem = build_problem(config)
    for beta in (0.5, 0.2):
        params, info = minimise(
            lambda lp, b=beta: kl_control_loss(lp, problem, b), problem.base_params, problem, config
        )
        log_pi = policy_log_probs(params, problem.sequences)
        assert info["loss"] < 1e-9  # KL(π‖p_β) = 0: the tilted model is in the family
        validity = (log_pi.exp() * problem.valid).sum(dim=1)
        expected = validity_from_beta(beta, problem.base_validity)
        assert torch.allclose(validity, expected, atol=1e-6)
        assert torch.allclose(log_pi.exp(), tilted_log_probs(problem, beta).exp(), atol=1e-6)


def test_forward_kl_is_convex_same_optimum_from_different_starts():
    config = ToyConfig(vocab_size=3, length=4, targets=[2, 4, 6], max_iter=1000)
    problem = build_problem(config)
    loss = lambda lp: toy.filtered_loss(lp, problem.log_filtered, "forward_kl", None)  # noqa: E731
    losses = []
    for seed in (1, 2):
        init = toy.init_params(3, 4, 3, 2.0, seed)
        _, info = minimise(loss, init, problem, config)
        assert info["converged"] and info["grad_norm"] < 1e-5
        losses.append(info["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-8)


def test_config_rejects_bad_input_with_the_field_name():
    with pytest.raises(ValueError, match="targets"):
        ToyConfig(vocab_size=3, length=2, targets=[9])
    with pytest.raises(ValueError, match="enumerate"):
        ToyConfig(vocab_size=10, length=6)
    with pytest.raises(ValueError, match="alpha"):
        ToyConfig(alphas=[1.5])
    with pytest.raises(ValueError, match="target_validities"):
        ToyConfig(target_validities=[1.0])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The CLI on the CI-sized instance; returns (results, output dir)."""
    out = tmp_path_factory.mktemp("toy")
    parser = argparse.ArgumentParser()
    toy.add_arguments(parser)
    args = parser.parse_args(
        ["--output-dir", str(out), "--vocab-size", "3", "--length", "5", "--target-validities", "0.3", "0.9", "0.99",
         "--alphas", "0.5", "--no-tilted-forward-kl", "--ks", "1", "8", "64", "--max-iter", "1500"]
    )  # fmt: skip
    assert toy.run(args) == 0
    return json.loads((out / "toy_results.json").read_text()), out


def test_cli_writes_json_table_and_figures(small_run):
    results, out = small_run
    for name in ("toy_results.json", "toy_table.md", "toy_frontier.png", "toy_passk.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "toy_frontier.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "toy_table.md").read_text()
    assert (
        table.count("| KL-control |") == 3 and "| forward KL→p* |" in table and "KL-control from a" in table
    )


def test_kl_control_collapses_as_beta_falls_and_forward_kl_does_not(small_run):
    results, _ = small_run
    rows = {r["name"]: r for r in results["rows"]}
    kl_rows = [r for r in results["rows"] if r["family"] == "kl_control"]
    from_base = [r for r in results["rows"] if r["family"] == "kl_control_from_base"]
    assert [r["beta"] for r in kl_rows] == sorted((r["beta"] for r in kl_rows), reverse=True)
    assert all(r["optimiser"]["converged"] for r in results["rows"] if "optimiser" in r)
    base, p_star, fkl = rows["base a"], rows["filtered p*"], rows["forward KL→p*"]
    smallest = kl_rows[-1]
    # The best optimum found is at least as good as the one reached from the base model.
    assert all(b["optimiser"]["loss"] <= a["optimiser"]["loss"] + 1e-9 for b, a in zip(kl_rows, from_base))

    # KL-control: more valid, but on ever fewer valid outputs, and farther from p*.
    validities = [r["validity"] for r in kl_rows]
    n90 = [r["outputs_90"] for r in kl_rows]
    assert validities == sorted(validities) and validities[-1] > 4 * base["validity"]
    assert all(a >= b - 1e-9 for a, b in zip(n90, n90[1:])) and n90[-1] < n90[0] / 3
    assert smallest["kl_filtered_policy"] > 5 * base["kl_filtered_policy"]
    # Reached from the base model (as an RL run at fixed β is), KL-control abandons whole prompts at small
    # β: pass@64 falls below the base model's while pass@1 rises.
    assert from_base[-1]["validity_min"] < 1e-6
    assert from_base[-1]["pass_at_k"]["64"] < base["pass_at_k"]["64"] < from_base[-1]["pass_at_k"]["1"] + 1

    # Forward KL toward p*: more valid than the base, every prompt still solvable, (almost) every valid
    # output kept, the closest to p* of all policies, and the best coverage@64 by a wide margin.
    assert fkl["validity"] > 2 * base["validity"] and fkl["validity_min"] > 0.1
    assert fkl["outputs_90"] >= 0.75 * p_star["outputs_90"]
    assert fkl["pass_at_k"]["64"] > 0.999
    others = [r for r in results["rows"] if r is not fkl and r is not p_star]
    assert all(fkl["kl_filtered_policy"] < r["kl_filtered_policy"] for r in others)
    assert fkl["coverage_at_k"]["64"] > 1.3 * max(r["coverage_at_k"]["64"] for r in kl_rows + from_base)
    # Every KL-control optimum is either less valid than forward KL or concentrated on ≤ 1/3 as many outputs.
    for r in kl_rows + from_base:
        assert r["validity"] < fkl["validity"] or r["outputs_90"] < fkl["outputs_90"] / 3

    # At comparable validity (within 0.1) to KL-control's smallest β, α = 0.5 keeps more valid outputs.
    alpha = rows["α=0.5→p*"]
    assert abs(alpha["validity"] - smallest["validity"]) < 0.1
    assert alpha["outputs_90"] > smallest["outputs_90"]
    assert alpha["coverage_at_k"]["64"] > smallest["coverage_at_k"]["64"]
