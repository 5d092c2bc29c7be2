"""Exact evaluation over an enumerable valid set: formulas against brute force, and the model path."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from filtered_rl.evaluation.exact import aggregate_exact, enumeration_residual, exact_prompt_metrics


def brute_force(pi: list[float], valid: list[bool], base: list[float], k: int) -> tuple[float, float]:
    """(pass@k, coverage@k) by summing over every sequence of k draws from π."""
    a_valid = sum(b for b, v in zip(base, valid) if v)
    p_star = [b / a_valid if v else 0.0 for b, v in zip(base, valid)]
    pass_k = coverage = 0.0
    for draws in itertools.product(range(len(pi)), repeat=k):
        prob = math.prod(pi[i] for i in draws)
        distinct = {i for i in draws if valid[i]}
        pass_k += prob * bool(distinct)
        coverage += prob * sum(p_star[i] for i in distinct)
    return pass_k, coverage


def test_pass_and_coverage_match_brute_force():
    pi = [0.5, 0.2, 0.1, 0.2]  # outputs 0..2 valid, 3 invalid
    valid = [True, True, True, False]
    base = [0.05, 0.15, 0.3, 0.5]
    metrics = exact_prompt_metrics(np.log(pi[:3]), np.log(base[:3]), ks=[1, 2, 3])
    for k in (1, 2, 3):
        pass_k, coverage = brute_force(pi, valid, base, k)
        assert metrics["pass_at_k"][k] == pytest.approx(pass_k, rel=1e-12)
        assert metrics["coverage_at_k"][k] == pytest.approx(coverage, rel=1e-12)
    assert metrics["validity"] == pytest.approx(0.8) and metrics["base_validity"] == pytest.approx(0.5)


def test_kl_is_zero_at_pstar_proportions_and_positive_elsewhere():
    base = np.log([0.1, 0.3, 0.1])
    proportional = exact_prompt_metrics(base + math.log(2.0), base, ks=[1])  # π = 2a on valid: p*'s shape
    assert proportional["kl_pstar_policy_valid"] == pytest.approx(0.0, abs=1e-12)
    skewed = exact_prompt_metrics(np.log([0.6, 0.1, 0.1]), base, ks=[1])
    p_star = np.array([0.2, 0.6, 0.2])
    q = np.array([0.75, 0.125, 0.125])
    assert skewed["kl_pstar_policy_valid"] == pytest.approx(float(np.sum(p_star * np.log(p_star / q))))
    assert skewed["entropy_valid"] == pytest.approx(float(-np.sum(q * np.log(q))))


def test_tiny_validity_keeps_precision_and_bad_input_fails():
    tiny = exact_prompt_metrics([math.log(1e-12)], [math.log(1e-3)], ks=[1, 1000])
    assert tiny["pass_at_k"][1000] == pytest.approx(1e-9, rel=1e-6)
    with pytest.raises(ValueError, match="same non-empty"):
        exact_prompt_metrics([], [], ks=[1])


def test_aggregate_and_residual():
    rows = [
        exact_prompt_metrics(np.log([0.2]), np.log([0.1]), [1, 4]),
        exact_prompt_metrics(np.log([0.4]), np.log([0.1]), [1, 4]),
    ]
    summary = aggregate_exact(rows)
    assert summary["validity"] == pytest.approx(0.3)
    assert summary["pass_at_k"][4] == pytest.approx((1 - 0.8**4 + 1 - 0.6**4) / 2)
    residual = enumeration_residual(0.32, 0.3, num_samples=1000)
    assert residual["residual"] == pytest.approx(0.02) and 0 < residual["standard_error"] < 0.02


def test_model_path_reuses_base_scores_and_is_zero_kl_against_itself(tmp_path):
    pytest.importorskip("transformers")
    from _tiny_model import save_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.exact import exact_evaluation

    directory = save_tiny_model(tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(directory)
    other = AutoModelForCausalLM.from_pretrained(directory)
    for p in other.parameters():  # a different policy
        p.data.add_(0.05 * np.sign(p.data.sum().item() or 1.0))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts, answers = ["12+3=", "7*"], [["15", "3+12", "5*3"], ["1", "2"]]
    itself = exact_evaluation(base, base, tokenizer, prompts, answers, ks=[1, 8])
    assert itself["summary"]["kl_pstar_policy_valid"] == pytest.approx(0.0, abs=1e-9)
    assert itself["summary"]["validity"] == pytest.approx(itself["summary"]["base_validity"])
    fresh = exact_evaluation(other, base, tokenizer, prompts, answers, ks=[1, 8])
    reused = exact_evaluation(
        other, None, tokenizer, prompts, answers, ks=[1, 8], base_log_probs=itself["base_log_probs"]
    )
    assert fresh["summary"]["kl_pstar_policy_valid"] > 1e-6
    assert reused["summary"]["kl_pstar_policy_valid"] == pytest.approx(
        fresh["summary"]["kl_pstar_policy_valid"], rel=1e-6
    )
    assert 0 < fresh["summary"]["validity"] < 1


def test_exact_base_report_bounds_the_sampled_validity_from_below(nano_model_dir):
    """countdown enumerates one spelling per answer, so exact validity is a lower bound of the sampled one
    (which counts every spelling); the aggregate pass@k is the mean of 1 − (1 − A(x))^k."""
    import numpy as np

    from filtered_rl.synthetic.report import exact_base_report, validity_report
    from filtered_rl.synthetic.tasks import get_task

    test = get_task("countdown").make_dataset(0, 8, seed=0)["test"]
    exact = exact_base_report(nano_model_dir, test, task="countdown", ks=(1, 64))
    sampled = validity_report(nano_model_dir, test, num_samples=128, task="countdown", seed=0)
    validities = np.array(exact["per_prompt_validity"])
    assert len(validities) == 8 and 0 < exact["validity"] < 1
    assert exact["validity"] <= sampled["overall_validity"] + 0.03
    assert exact["pass_at_k"][64] == pytest.approx(np.mean(1 - (1 - validities) ** 64), rel=1e-6)
    assert list(exact["validity_quantiles"].values()) == sorted(exact["validity_quantiles"].values())
