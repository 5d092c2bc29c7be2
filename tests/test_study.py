"""The study's arithmetic: per-arm points, family frontiers through the base model, matched-pass@1 values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filtered_rl.synthetic.exact_curve import read_curve
from filtered_rl.synthetic.study import BASE, arm_points, family_frontiers, matched_table, write_study


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
    assert (tmp_path / "study_curves.png").exists() and (tmp_path / "study_frontier.png").exists()
    assert write_study(tmp_path, [("missing", "missing", "x")], [1]) is None  # nothing evaluated: no study
