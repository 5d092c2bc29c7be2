"""The study's arithmetic: per-arm points, family frontiers through the base model, matched-pass@1 values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from filtered_rl.synthetic.exact_curve import read_curve
from filtered_rl.synthetic.study import (
    BASE,
    arm_difference_table,
    arm_points,
    difference_table,
    family_frontiers,
    matched_table,
    paired_resamples,
    points_table,
    spread,
    write_study,
)


def _exact(validities: list[float], passk: list[float], coverage: list[float], kl: list[float]) -> dict:
    """An exact.json as the frontier writes it (k as strings), per prompt."""
    return {"per_prompt": [
        {"validity": v, "pass_at_k": {"256": p}, "coverage_at_k": {"256": c}, "kl_pstar_policy_valid": k}
        for v, p, c, k in zip(validities, passk, coverage, kl, strict=True)
    ]}  # fmt: skip


def test_arm_points_average_seeds_and_prompts_with_a_standard_error() -> None:
    (point,) = arm_points({"a": [_exact([0.1, 0.3], [0.5, 0.7], [0.2, 0.4], [1.0, 3.0]),
                                 _exact([0.2, 0.4], [0.6, 0.8], [0.3, 0.5], [2.0, 4.0])]})  # fmt: skip
    assert point["seeds"] == 2
    assert point["pass@1"] == pytest.approx(0.25) and point["kl_valid"] == pytest.approx(2.5)
    assert 0 < point["pass@1_se"] < 0.15
    (same,) = arm_points({"a": [_exact([0.2] * 3, [0.5] * 3, [0.1] * 3, [1.0] * 3)] * 2})
    assert same["pass@1_se"] == pytest.approx(0.0, abs=1e-12)  # no variation: no error


def _point(run: str, pass1: float, pass256: float, coverage: float, kl: float) -> dict:
    return {"run": run, "pass@1": pass1, "pass@256": pass256, "coverage@256": coverage, "kl_valid": kl}


def test_a_family_frontier_starts_at_the_base_and_drops_dominated_arms() -> None:
    points = [
        _point(BASE, 0.05, 0.70, 0.50, 0.0),
        _point("g0", 0.20, 0.40, 0.10, 3.0),
        _point("g1", 0.10, 0.50, 0.20, 0.5),  # below the chord base → g0 in pass@256 (off), in KL too (on)
        _point("f0", 0.10, 0.68, 0.45, 0.5),
    ]
    families = {"g0": "grpo", "g1": "grpo", "f0": "filtered"}
    fronts = family_frontiers(points, families)
    assert fronts["grpo"]["pass@256"] == [(0.05, 0.70), (0.20, 0.40)]
    assert fronts["filtered"]["coverage@256"] == [(0.05, 0.50), (0.10, 0.45)]
    # KL is lower-is-better: its frontier is the lower envelope, in KL's own sign
    assert fronts["grpo"]["kl_valid"] == [(0.05, 0.0), (0.10, 0.5), (0.20, 3.0)]
    table = matched_table(fronts, [0.10, 0.20], "pass@256")
    assert "| grpo | 0.600 | 0.400 |" in table  # on the chord base → g0: 0.70 − 0.30·(0.05/0.15)
    assert "| filtered | 0.680 | – |" in table  # the filtered family does not reach 0.20


def test_write_study_reads_a_frontier_directory(tmp_path: Path) -> None:
    for slug, v in (("base", 0.05), ("grpo-beta-0", 0.2)):
        folder = tmp_path / "eval" / f"{slug}-seed0"
        folder.mkdir(parents=True)
        (folder / "exact.json").write_text(json.dumps(_exact([v, v], [0.5, 0.6], [0.3, 0.3], [1.0, 1.0])))
    curve = tmp_path / "train" / "grpo-beta-0-seed0" / "exact_curve.jsonl"
    curve.parent.mkdir(parents=True)
    lines = [{"step": s, "validity": 0.1 * s, "coverage@256": 0.5} for s in (0, 1)]
    curve.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 2, "valid')  # a line cut by a kill
    assert [p["step"] for p in read_curve(curve)] == [0, 1]
    path = write_study(tmp_path, [("grpo β=0", "grpo-beta-0", "GRPO + KL")], [0])
    assert path is not None and "| grpo β=0 | GRPO + KL | 1 | 0.200" in path.read_text()
    assert "pass@1 − base (paired SE)" in path.read_text()
    assert (tmp_path / "study_curves.png").exists() and (tmp_path / "study_frontier.png").exists()
    assert write_study(tmp_path, [("missing", "missing", "x")], [1]) is None  # nothing evaluated: no study


def _seeded(values_by_seed: dict[int, list[float]]) -> dict[int, dict]:
    """{seed: exact.json} with the same per-prompt values for every metric (enough for pass@1 tests)."""
    return {s: _exact(v, v, v, v) for s, v in values_by_seed.items()}


def test_a_paired_difference_cancels_the_spread_the_arms_share() -> None:
    rng = np.random.default_rng(1)
    prompts = rng.uniform(0.02, 0.6, size=(3, 40))  # large prompt-to-prompt spread, shared by both arms
    base = {s: list(prompts[s]) for s in range(3)}
    arm = {s: list(prompts[s] + 0.03 + rng.normal(0, 0.005, 40)) for s in range(3)}
    evaluations = {BASE: _seeded(base), "a": _seeded(arm)}
    points = arm_points({k: list(v.values()) for k, v in evaluations.items()})
    means, _ = paired_resamples(evaluations, {"a": "fam"}, [0.2])
    paired = means["a"]["pass@1"] - means[BASE]["pass@1"]
    assert paired.mean() == pytest.approx(0.03, abs=0.005)
    unpaired = np.hypot(points[0]["pass@1_se"], points[1]["pass@1_se"])
    assert paired.std(ddof=1) < 0.1 * unpaired  # pairing removes the shared spread
    assert "| a | fam | 3 | " in points_table(points, {"a": "fam"}, means)
    gain = points_table(points, {"a": "fam"}, means).splitlines()[-1].split("|")[-2]
    assert float(gain.split("±")[0]) == pytest.approx(0.03, abs=0.005) and float(gain.split("±")[1]) < 0.003


def test_family_differences_at_matched_pass1_with_a_paired_error() -> None:
    # two families, each one arm: g (pass@1 0.3, coverage 0.5) and f (pass@1 0.3, coverage 0.6 = g + 0.1
    # on every prompt); the base at (0.1, 0.8). At pass@1 0.2 each frontier is its chord from the base.
    def arm(pass1: float, cover: float, noise: float, seed: int) -> dict[int, dict]:
        r = np.random.default_rng(seed)
        out = {}
        for s in range(2):
            shift = r.normal(0, noise, 30)
            out[s] = _exact(list(pass1 + shift), [1.0] * 30, list(cover + shift), [0.5] * 30)
        return out

    evaluations = {BASE: arm(0.1, 0.8, 0.0, 0), "g": arm(0.3, 0.5, 0.05, 1), "f": arm(0.3, 0.6, 0.05, 1)}
    families = {"g": "grpo", "f": "filtered"}
    points = arm_points({k: list(v.values()) for k, v in evaluations.items()})
    fronts = family_frontiers(points, families)
    _, matched = paired_resamples(evaluations, families, [0.2, 0.5])
    table = difference_table(fronts, [0.2, 0.5], "coverage@256", matched, "grpo")
    row = next(line for line in table.splitlines() if line.startswith("| filtered |"))
    value, se = row.split("|")[2].split("±")
    reach = next(p["pass@1"] for p in points if p["run"] == "g")  # 0.3 + the shared noise's mean
    assert float(value) == pytest.approx(0.1 * 0.1 / (reach - 0.1), abs=1e-3)  # along both chords
    assert 0 <= float(se) < 0.005  # same noise on both: the difference barely varies
    assert row.split("|")[3].strip() == "–"  # 0.5: beyond both frontiers
    assert "±" in matched_table(fronts, [0.2], "coverage@256", matched)


def test_an_arm_with_fewer_seeds_is_resampled_from_its_own() -> None:
    evaluations = {BASE: _seeded({0: [0.1, 0.2], 1: [0.1, 0.3]}), "long": _seeded({1: [0.4, 0.5]})}
    means, matched = paired_resamples(evaluations, {"long": "x"}, [0.3], num_resamples=50)
    assert np.isfinite(means["long"]["pass@1"]).all()
    assert np.isin(
        np.round(means["long"]["pass@1"], 9), [0.4, 0.45, 0.5]
    ).all()  # only its own seed's prompts
    assert spread(np.full(10, np.nan)) is None and spread(np.array([1.0, np.nan, 3.0])) is not None


def test_named_arm_differences_are_paired_and_name_what_is_missing() -> None:
    rng = np.random.default_rng(2)
    shared = rng.uniform(0.0, 0.5, size=(2, 30))
    evaluations = {
        BASE: _seeded({s: list(shared[s]) for s in range(2)}),
        "a": _seeded({s: list(shared[s] + 0.02) for s in range(2)}),  # the base + 0.02 on every prompt
    }
    means, _ = paired_resamples(evaluations, {"a": "fam"}, [0.3])
    table = arm_difference_table(means, [("a", BASE), ("a", "never ran")])
    row = next(line for line in table.splitlines() if line.startswith("| a − base model |"))
    assert all(cell.strip() == "+0.020 ± 0.000" for cell in row.split("|")[2:-1])  # every metric, no spread
    assert "not evaluated: never ran" in table
