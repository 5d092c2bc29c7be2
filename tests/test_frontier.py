"""The frontier driver: its table arithmetic exactly, and (slow) a whole tiny run end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from filtered_rl.synthetic.frontier import (
    FILTERED_FKL,
    GRPO_SMALL_BETA,
    Preset,
    aggregate,
    format_table,
    row_from_summary,
    run_frontier,
    slug,
)


def _summary(validity: float, pass_at_4: float, distinct: float) -> dict:
    return {
        "validity": validity,
        "pass_at_k": {"1": {"mean": validity}, "4": {"mean": pass_at_4}},
        "diversity": {"distinct_valid_answers": distinct},
        "coverage": {"fraction_of_valid_answers_hit": 0.5, "pstar_mass_hit": None},
        "kl_pstar_to_policy": {"mean": 1.5},
    }


def test_rows_aggregate_to_mean_and_spread_over_seeds() -> None:
    rows = [
        row_from_summary("grpo", s, _summary(v, p, d))
        for s, (v, p, d) in enumerate([(0.2, 0.5, 1.0), (0.4, 0.7, 3.0)])
    ]
    assert rows[0]["pass@4"] == 0.5 and rows[0]["pass_at_k"] == {1: 0.2, 4: 0.5}
    (entry,) = aggregate(rows)
    assert entry["seeds"] == 2
    assert entry["validity"] == pytest.approx((0.3, 0.1))
    assert entry["distinct_valid"] == pytest.approx((2.0, 1.0))
    assert entry["pstar_mass_hit"] is None  # absent everywhere: no number is made up
    table = format_table([entry])
    assert "| grpo | 2 | 0.300 ± 0.100 |" in table and "–" in table


def test_run_names_become_safe_directory_names() -> None:
    assert slug("grpo β=0.01") == "grpo-beta-0-01"
    assert slug("filtered α=0.5") == "filtered-alpha-0-5"


@pytest.mark.slow
def test_tiny_frontier_trains_evaluates_plots_and_resumes(nano_model_dir: Path, tmp_path: Path) -> None:
    preset = Preset("nano", (GRPO_SMALL_BETA, FILTERED_FKL), steps=2, train_prompts=16, num_generations=4,
                    batch_size=8, learning_rate=1e-4, eval_prompts=4, eval_samples=4)  # fmt: skip
    rows = run_frontier(preset, tmp_path, [0], threads=1, base_model=nano_model_dir)
    assert [r["run"] for r in rows] == ["base model", GRPO_SMALL_BETA.name, FILTERED_FKL.name]
    assert all(0.0 <= r["validity"] <= 1.0 for r in rows)
    for name in ("results.json", "results.md", "passk.png", "frontier.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = json.loads((tmp_path / "results.json").read_text())["rows"]
    finished = sorted(p.stat().st_mtime for p in tmp_path.glob("train/*/final/config.json"))
    again = run_frontier(preset, tmp_path, [0], threads=1, base_model=nano_model_dir)  # all reused
    assert json.loads(json.dumps(again)) == first
    assert sorted(p.stat().st_mtime for p in tmp_path.glob("train/*/final/config.json")) == finished


def test_select_task_moves_the_preset_to_another_synthetic_task() -> None:
    from filtered_rl.synthetic.frontier import PRESETS, select_task
    from filtered_rl.synthetic.tasks import UnknownNameError, get_task

    assert select_task(PRESETS["cpu"], None) is PRESETS["cpu"]
    moved = select_task(PRESETS["cpu"], "subset_sum")
    assert moved.task == "subset_sum" and moved.steps == PRESETS["cpu"].steps
    assert moved.max_completion_length == get_task("subset_sum").max_completion_length > 24
    with pytest.raises(UnknownNameError, match="subset_sum"):  # the miss lists the known tasks
        select_task(PRESETS["cpu"], "sudoku")


def test_tiny_frontier_on_the_second_task(tmp_path: Path) -> None:
    """The frontier trains and evaluates on subset_sum's own (tiny) base model and prompts."""
    from filtered_rl.synthetic.base_model import load_or_pretrain

    base = load_or_pretrain("nano", seed=0, cache_dir=tmp_path / "base", task="subset_sum", progress=False,
                            steps=4, batch_size=8, corpus_prompts=16, warmup_steps=1)  # fmt: skip
    preset = Preset("nano", (FILTERED_FKL,), steps=1, train_prompts=8, num_generations=4, batch_size=4,
                    learning_rate=1e-4, eval_prompts=2, eval_samples=4, task="subset_sum")  # fmt: skip
    rows = run_frontier(preset, tmp_path / "out", [0], threads=1, base_model=base)
    assert [r["run"] for r in rows] == ["base model", FILTERED_FKL.name]
    summary = json.loads((tmp_path / "out" / "eval" / "base-seed0" / "summary.json").read_text())
    assert summary["dataset"] == "subset_sum" and summary["coverage"] is not None  # enumerable: coverage
    # exact metrics by teacher forcing on the same prompts: for the base model, the sampled validity is an
    # unbiased estimate of the exact one (4 samples of 2 prompts: only a loose check is fair)
    base_row = rows[0]
    assert (
        0.0 <= base_row["exact_validity"] <= 1.0 and base_row["exact_pass@256"] >= base_row["exact_validity"]
    )
    assert abs(base_row["exact_validity"] - base_row["validity"]) <= 0.5
    assert base_row["exact_kl_valid"] == pytest.approx(
        0.0, abs=1e-6
    )  # the base model is its own p*'s proportions
    assert (tmp_path / "out" / "eval" / "base-seed0" / "exact.json").exists()


def test_base_model_flag_takes_a_model_directory_and_refuses_anything_else(tmp_path: Path, capsys) -> None:
    """`--base-model DIR` runs the study on another base (e.g. one pretrained longer); a path without a
    model is a usage error naming the flag, before anything is pretrained or trained."""
    import argparse

    from filtered_rl.cli import main
    from filtered_rl.synthetic.frontier import add_arguments

    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["frontier", "--base-model", str(tmp_path / "not-a-model"), "--output-dir", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert "--base-model" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--base-model", str(tmp_path / "model")]).base_model == tmp_path / "model"


def test_study_arms_run_the_curve_the_exact_partition_and_write_the_study(tmp_path: Path) -> None:
    """A tiny subset_sum study: exact metrics during training (steps 0 and max), the exact-A(x) remedy's
    column equal to the base model's exact validity of each training prompt, and study.md with every family."""
    from filtered_rl.synthetic.base_model import load_or_pretrain
    from filtered_rl.synthetic.exact_curve import CURVE_FILE, read_curve
    from filtered_rl.synthetic.frontier import ARMS

    base = load_or_pretrain("nano", seed=0, cache_dir=tmp_path / "base", task="subset_sum", progress=False,
                            steps=4, batch_size=8, corpus_prompts=16, warmup_steps=1)  # fmt: skip
    column_arm = ARMS[slug("filtered forward KL, exact A(x)")]
    preset = Preset("nano", (ARMS["grpo-beta-0"], column_arm), steps=2, train_prompts=8, num_generations=4,
                    batch_size=4, learning_rate=1e-4, eval_prompts=3, eval_samples=4, task="subset_sum",
                    max_completion_length=32, curve_points=2)  # fmt: skip
    out = tmp_path / "out"
    run_frontier(preset, out, [0], threads=1, base_model=base)
    curve = read_curve(out / "train" / "grpo-beta-0-seed0" / CURVE_FILE)
    assert [p["step"] for p in curve] == [0, 1, 2]
    base_exact = json.loads((out / "eval" / "base-seed0" / "exact.json").read_text())
    assert curve[0]["validity"] == pytest.approx(base_exact["validity"], rel=1e-4)  # step 0 is the base model
    assert len(base_exact["per_prompt"]) == base_exact["num_prompts"]
    (column,) = out.joinpath("train").glob("base_validity-seed0-*.json")
    values = json.loads(column.read_text())
    assert len(values) == 8 and all(0 < v <= 1 for v in values)
    study = (out / "study.md").read_text()
    assert "GRPO + KL" in study and "filtered + remedies" in study and "matched pass@1" in study
    assert "training prompts" in study and "held-out prompts" in study  # both prompt sets, each its tables
    # --report-only summarises what finished and trains nothing: an arm never trained is left out
    more = replace(preset, runs=(*preset.runs, ARMS["mara"]))
    pair = ("grpo-beta-0", "base")
    rows = run_frontier(more, out, [0], threads=1, base_model=base, report_only=True, compare=[pair])
    assert [r["run"] for r in rows] == ["base model", "grpo β=0", column_arm.name]
    study = (out / "study.md").read_text()
    assert study.count("| grpo β=0 − base model | ") == 2  # both prompt sets
    assert not (out / "train" / "mara-beta-0-1-seed0").exists()
    train_exact = json.loads((out / "eval" / "base-seed0" / "exact_train.json").read_text())
    assert train_exact["num_prompts"] == 8 and train_exact["kl_pstar_policy_valid"] == pytest.approx(
        0, abs=1e-9
    )
    assert (out / "study_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "study_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_pstar_arms_sample_their_verified_base_samples_and_distil(
    nano_model_dir: Path, tmp_path: Path
) -> None:
    """The two arms that use samples of p*: `filtered_pstar` draws K = 32 base samples per training prompt
    and keeps the verified ones (every prompt with at least one), `pstar_distill` trains by the exact
    gradient; both are evaluated and curved like the RL arms."""
    from filtered_rl.rehearsal import load_rehearsal
    from filtered_rl.synthetic.exact_curve import CURVE_FILE, read_curve
    from filtered_rl.synthetic.frontier import ARMS, PSTAR_DISTILL

    pstar_arm = ARMS[slug("filtered forward KL + p* samples")]
    preset = Preset("nano", (pstar_arm, PSTAR_DISTILL), steps=2, train_prompts=6, num_generations=4,
                    batch_size=4, learning_rate=1e-4, eval_prompts=2, eval_samples=4, curve_points=2, exact_train_prompts=6)  # fmt: skip
    out = tmp_path / "out"
    rows = run_frontier(preset, out, [0], threads=1, base_model=nano_model_dir)
    assert [r["run"] for r in rows] == ["base model", pstar_arm.name, PSTAR_DISTILL.name]
    stored = load_rehearsal(out / "rehearsal" / "seed0-k32-min1")
    assert stored.info["num_samples"] == 32 and stored.info["min_correct"] == 1
    assert stored.info["near_perfect_prompts"] == len({s["prompt_key"] for s in stored.samples})
    for arm in preset.runs:
        assert [p["step"] for p in read_curve(out / "train" / f"{slug(arm.name)}-seed0" / CURVE_FILE)] == [
            0,
            1,
            2,
        ]
        assert (
            json.loads((out / "eval" / f"{slug(arm.name)}-seed0" / "exact_train.json").read_text())[
                "num_prompts"
            ]
            == 6
        )


def test_rehearsal_samples_the_training_prompts_even_when_the_pool_is_smaller(
    monkeypatch, tmp_path: Path
) -> None:
    """countdown_hard has 581 training prompts: a preset asking for 1,000 trains on 581, and its stored
    samples must be drawn for those 581 (asking the sampler for 1,000 was refused by the eval runner)."""
    from types import SimpleNamespace

    import filtered_rl.rehearsal
    from filtered_rl.synthetic import frontier

    asked = {}
    monkeypatch.setattr(
        filtered_rl.rehearsal, "sample_rehearsal", lambda model, folder, **kw: asked.update(kw)
    )
    monkeypatch.setattr(frontier, "train_task", lambda preset, seed: SimpleNamespace(dataset=[0] * 581))
    preset = replace(frontier.PRESETS["subset-cpu"], train_prompts=1000)
    spec = frontier.prepare_rehearsal(frontier.ARMS[slug("filtered forward KL + p* samples")], Path("base"),
                                      tmp_path, preset, seed=3)  # fmt: skip
    assert asked["num_prompts"] == 581 and asked["num_samples"] == 32 and asked["min_correct"] == 1
    assert spec.options["rehearsal_path"] == str(tmp_path / "rehearsal" / "seed3-k32-min1")


def test_compare_names_arms_of_the_run_and_fails_before_any_model_loads(tmp_path: Path, capsys) -> None:
    """`--compare A:B` takes two arm names (or base); a malformed or unknown pair is a usage error, and an
    arm that is not among the run's arms fails naming the flag and the arms to choose from."""
    from filtered_rl.cli import main

    for bad in ("grpo-beta-0", "grpo-beta-0:nonsense"):
        with pytest.raises(SystemExit) as stop:
            main(["frontier", "--compare", bad, "--output-dir", str(tmp_path / "o")])
        assert stop.value.code == 2 and "--compare" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"--compare mara:base: 'mara' is not an arm of this run.*grpo-beta-0-01"
    ):
        run_frontier("quick", tmp_path / "o", [0], compare=[("mara", "base")])
    assert not (tmp_path / "o").exists()  # refused before pretraining or writing anything
