"""`filtered-rl study`: a tiny study end to end, resumed, its refusals before any model loads, and (slow) seeds
as two worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from filtered_rl.cli import main
from filtered_rl.study.config import StudyConfigError, build_config, expand_arms
from filtered_rl.study.sampled import distinct_among_valid, prompt_values

TINY = """\
steps: 2
train_prompts: 8
eval_prompts: 3
eval_samples: 6
num_generations: 4
batch_size: 4
learning_rate: 1.0e-4
curve_points: 2
exact_train_prompts: 3
distinct_m: 2
arms:
  grpo: {beta: 0.2}
  filtered: {divergence: forward_kl}
"""


def _study(tmp_path: Path, model: Path, *extra: str, config: str = TINY) -> tuple[int, Path]:
    path = tmp_path / "arms.yaml"
    path.write_text(config)
    out = tmp_path / "out"
    argv = ["study", "--model", str(model), "--task", "countdown", "--config", str(path)]
    return main([*argv, "--output-dir", str(out), "--threads", "1", *extra]), out


def test_arms_expand_sweeps_and_name_each_arm() -> None:
    arms = expand_arms(
        {"grpo": {"beta": [0, 0.04, 0.2]}, "filtered": {"divergence": "forward_kl"}, "mara": {}}
    )
    assert [a.name for a in arms] == [
        "grpo beta=0", "grpo beta=0.04", "grpo beta=0.2", "filtered divergence=forward_kl", "mara"
    ]  # fmt: skip
    assert arms[1].options == {"beta": 0.04} and arms[1].family_name == "grpo"
    listed = expand_arms([{"filtered": {"divergence": "alpha", "alpha": [0.5, 0.9], "family": "f"}},
                          {"filtered_pstar": {"name": "fkl + p*"}}, {"rloo": {"target_validity": 0.8}}])  # fmt: skip
    assert [a.family_name for a in listed[:2]] == ["f", "f"] and listed[1].options["alpha"] == 0.9
    assert listed[2].rehearsal_samples == 32 and listed[2].rehearsal_min_correct == 1  # p* draws: K = 32, ≥ 1
    assert listed[3].target_validity == 0.8 and "target_validity" not in listed[3].options  # the controller
    with pytest.raises(StudyConfigError, match="unknown algorithm 'grpoo'; choose from .*grpo.*filtered"):
        expand_arms({"grpoo": {}})
    with pytest.raises(StudyConfigError, match="two arms are named"):
        expand_arms([{"grpo": {"beta": 0.2}}, {"grpo": {"beta": 0.2}}])
    config = build_config(
        {"arms": {"mara": {}}, "task": "countdown"}, overrides={"steps": 7, "settings": {"x": 1}}
    )
    assert config.steps == 7 and config.settings == {"x": 1} and config.learning_rate == 3e-4  # own model


def test_distinct_among_m_valid_does_not_grow_with_validity() -> None:
    assert distinct_among_valid(["a", "a", "b", "b"], 2) == pytest.approx(1 + 4 / 6)  # 1 − C(2,2)/C(4,2) each
    assert distinct_among_valid(["a"], 2) is None
    # the same answer distribution twice as often valid: the same value (distinct among n samples doubles)
    rare = prompt_values([1, 1, 0, 0, 0, 0, 0, 0], ["a", "b", None, None, None, None, None, None], 2)
    often = prompt_values([1, 1, 1, 1, 0, 0, 0, 0], ["a", "b", "a", "b", None, None, None, None], 2)
    assert rare["distinct_m_valid"] == 2.0 and often["distinct_m_valid"] == pytest.approx(1 + 4 / 6)
    assert often["pass@1"] == 0.5 and often["distinct_valid"] == 2 and often["entropy_valid"] > 0


def test_a_tiny_study_end_to_end_then_resumed(nano_model_dir: Path, tmp_path: Path) -> None:
    """Two arms through filtered-rl train's code path, the sampled and exact evaluations, study.md with both;
    a second call reuses every finished arm and evaluation (no model retrained), and --compare adds a table."""
    code, out = _study(tmp_path, nano_model_dir)
    assert code == 0
    study = (out / "study.md").read_text()
    assert (
        "## On the held-out prompts, sampled" in study and "distinct answers among m valid samples" in study
    )
    assert "## On the held-out prompts" in study and "exact coverage@256" in study  # countdown enumerates
    assert "| grpo beta=0.2 | grpo | grpo | beta=0.2 |" in study  # the arms, as configured
    for name in (
        "study_frontier_sampled.png",
        "study_frontier.png",
        "study_curves.png",
        "study_train_curves.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    arm = out / "train" / "grpo-beta-0-2-seed0"
    config = (arm / "train_config.yaml").read_text()  # a filtered-rl train config of its own
    assert "algorithm: grpo" in config and "beta: 0.2" in config and "max_steps: 2" in config
    sampled = json.loads((out / "eval" / "grpo-beta-0-2-seed0" / "sampled.json").read_text())
    assert sampled["num_samples"] == 6 and len(sampled["per_prompt"]) == 3
    finished = {p: p.stat().st_mtime_ns for p in out.glob("**/final/config.json")}
    summaries = {p: p.stat().st_mtime_ns for p in out.glob("eval/*/summary.json")}
    assert len(finished) == 2 and len(summaries) == 3

    # a killed arm: its final model gone, its checkpoint kept → it resumes from the checkpoint
    killed = out / "train" / "filtered-divergence-forward-kl-seed0"
    import shutil

    shutil.rmtree(killed / "final")
    shutil.rmtree(out / "eval" / "filtered-divergence-forward-kl-seed0")
    code, _ = _study(tmp_path, nano_model_dir, "--compare", "filtered-divergence-forward-kl:base")
    assert code == 0
    assert (arm / "final" / "config.json").stat().st_mtime_ns == finished[arm / "final" / "config.json"]
    for path, stamp in summaries.items():
        if "forward-kl" not in str(path):
            assert path.stat().st_mtime_ns == stamp  # evaluations reused
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [e["step"] for e in log if "loss" in e]
    assert steps.count(1) == 1  # step 1 not trained again: the arm resumed from its checkpoint
    assert "| filtered divergence=forward_kl − base model |" in (out / "study.md").read_text()
    # --report-only trains nothing more
    code, _ = _study(tmp_path, nano_model_dir, "--report-only")
    assert code == 0 and (out / "study.md").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "ARMS", "--model", "MODEL", "--task", "sudoku"], "--task 'sudoku'"),
        (
            ["--config", "BAD", "--model", "MODEL", "--task", "countdown"],
            "unknown algorithm 'grpoo'; choose from",
        ),
        (
            ["--config", "KEY", "--model", "MODEL", "--task", "countdown"],
            "arm 'grpo bogus_key=3' (grpo): Unknown arguments",
        ),
        (["--config", "ARMS", "--model", "filtered-rl:tiny", "--task", "countdown"], "filtered-rl:nano"),
        (["--config", "ARMS", "--model", "./no/such/dir", "--task", "countdown"], "no such model directory"),
        (
            ["--config", "ARMS", "--model", "MODEL", "--task", "countdown", "--compare", "grpo:x"],
            "choose from base",
        ),
        (
            ["--config", "ARMS", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--task", "gsm8k"],
            "the hub is offline",
        ),
        (["--config", "ARMS", "--model", "MODEL", "--task", "gsm8k"], "--task 'gsm8k'"),
    ],
)
def test_bad_arms_settings_tasks_and_models_are_refused_before_any_model_loads(
    argv: list[str], expected: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Each refusal is one line naming the choice (exit 2, no traceback), and nothing is written or loaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = {"ARMS": "arms: {grpo: {}}", "BAD": "arms: {grpoo: {}}", "KEY": "arms: {grpo: {bogus_key: 3}}"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "MODEL").mkdir()
    (tmp_path / "MODEL" / "config.json").write_text("{}")  # no weights: loading it would fail loudly
    argv = [str(tmp_path / a) if a in (*files, "MODEL") else a for a in argv]
    monkeypatch.chdir(tmp_path)
    code = main(["study", *argv, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_documented_hub_command_parses_and_is_refused_cleanly(tmp_path: Path) -> None:
    """The README's Qwen + GSM8K command, as a user runs it here (no hub): a clear one-line error."""
    (tmp_path / "arms.yaml").write_text(
        "arms: {grpo: {beta: [0, 0.2]}, filtered: {divergence: forward_kl}}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "filtered_rl.cli", "study", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--task",
         "gsm8k", "--config", "arms.yaml", "--steps", "200", "--seeds", "0", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "filtered-rl study: --model 'Qwen/Qwen2.5-0.5B-Instruct'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_seeds_as_two_worker_processes(nano_model_dir: Path, tmp_path: Path) -> None:
    """--jobs 2: each seed trains and evaluates in its own process into one output directory; the parent
    writes one study.md over both seeds."""
    code, out = _study(tmp_path, nano_model_dir, "--seeds", "0", "1", "--jobs", "2")
    assert code == 0
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["seed0.log", "seed1.log"]
    for seed in (0, 1):
        assert (out / "train" / f"grpo-beta-0-2-seed{seed}" / "final" / "config.json").exists()
    study = (out / "study.md").read_text()
    assert "Seeds: 0, 1." in study and "| grpo beta=0.2 | grpo | 2 |" in study


LORA_CHAT = """\
steps: 2
train_prompts: 4
eval_prompts: 2
eval_samples: 4
num_generations: 4
batch_size: 4
learning_rate: 1.0e-3
conversational: true
curve_points: 0
exact_train_prompts: 2
settings: {use_peft: true, lora_r: 4, lora_alpha: 8, lora_target_modules: all-linear}
arms:
  grpo: {beta: 0.2}
"""


def test_a_lora_study_on_chat_prompts_evaluates_a_merged_model(nano_model_dir: Path, tmp_path: Path) -> None:
    """Regression (the real-model study, docs/results.md §4g): a LoRA arm's final model is a plain model
    directory (the adapter merged), which the evaluators load and a rerun reuses; the exact metrics run on chat
    prompts (lists of messages, once unhashable in the base-score cache)."""
    code, out = _study(tmp_path, nano_model_dir, config=LORA_CHAT)
    assert code == 0
    final = out / "train" / "grpo-beta-0-2-seed0" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    exact = json.loads((out / "eval" / "grpo-beta-0-2-seed0" / "exact.json").read_text())
    assert len(exact["per_prompt"]) == 2 and 0.0 < exact["validity"] <= 1.0
    stamp = (final / "config.json").stat().st_mtime_ns
    code, _ = _study(tmp_path, nano_model_dir, config=LORA_CHAT)
    assert code == 0 and (final / "config.json").stat().st_mtime_ns == stamp  # reused, not retrained
