"""Slow: every diversity-collapse baseline trains 2 steps with `accelerate launch` on 2 CPU processes (gloo)
through recipes/train.py and the countdown nano recipe; DPH-RL's offline sampling runs sharded first."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from _launch import free_port, run_launch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "configs" / "countdown-nano-cpu.yaml"
ALGORITHMS = [
    "mara",
    "dph",
    "unlikeliness",
    "passk",
    "inverse_success",
    "tilted",
    "rft",
    "raft",
    "reinforce_rej",
    "nsr",
    "f_grpo",
    "rs_grpo",
    "pkpo",
    "clip_cov",
    "kl_cov",
    "sage",
]
STORED_SAMPLES = ("dph", "rft")  # read the offline set (the fixture's keeps every verified sample: rft's too)


def launch(target: list[str], cwd: Path) -> object:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()), *target,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return run_launch(command, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def rehearsal_dir(nano_model_dir: Path, tmp_path_factory) -> Path:
    """The offline step on 2 processes: 32 of the 64 training prompts, K = 8, near-perfect = ≥ 1 correct."""
    out = tmp_path_factory.mktemp("rehearsal") / "set"
    result = launch(
        ["-m", "filtered_rl.rehearsal", "--model", str(nano_model_dir), "--dataset", "countdown",
         "--num-prompts", "32", "--num-samples", "8", "--min-correct", "1", "--max-new-tokens", "24",
         "--output-dir", str(out), "--no-progress"],
        out.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "rehearsal_info.json").read_text())
    assert info["rehearsal_samples"] > 0 and info["prompts"] == 32
    assert not list(out.glob("samples.rank*.jsonl"))  # the shards were merged
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_process_cpu_run_trains(algorithm: str, nano_model_dir: Path, tmp_path: Path, request) -> None:
    out = tmp_path / "run"
    stored = algorithm in STORED_SAMPLES
    extra = ["--rehearsal_path", str(request.getfixturevalue("rehearsal_dir"))] if stored else []
    result = launch(
        [str(ROOT / "recipes" / "train.py"), "--config", str(RECIPE), "--algorithm", algorithm,
         "--model_name_or_path", str(nano_model_dir), "--output_dir", str(out), "--countdown_train_prompts", "64",
         "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", *extra],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    prefix = {"tilted": "filtered"}.get(algorithm, algorithm)  # tilted is FilteredGRPOTrainer
    # raft/reinforce_rej/nsr/kl_cov's recipe sections generate once per 4 optimizer steps (ratio and clip act)
    generated = logs[:1] if algorithm in ("raft", "reinforce_rej", "nsr", "kl_cov") else logs
    assert all(f"{prefix}/validity" in entry for entry in generated)
    if algorithm == "dph":
        assert all(entry["dph/rehearsal_loss"] >= 0 for entry in logs)
    if algorithm == "rft":
        assert all(entry["rft/nll"] > 0 for entry in logs)
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_frontier_runs_baseline_arms_with_the_rehearsal_drawn_first(
    nano_model_dir: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from filtered_rl.synthetic.frontier import DPH_FKL, MARA, Preset, run_frontier

    dph = replace(DPH_FKL, rehearsal_min_correct=1)  # enough near-perfect prompts among 16 on nano
    preset = Preset("nano", (MARA, dph), steps=2, train_prompts=16, num_generations=4, batch_size=8,
                    learning_rate=1e-4, eval_prompts=4, eval_samples=4)  # fmt: skip
    rows = run_frontier(preset, tmp_path, [0], threads=1, base_model=nano_model_dir)
    assert [r["run"] for r in rows] == ["base model", MARA.name, DPH_FKL.name]
    info = json.loads((tmp_path / "rehearsal" / "seed0-min1" / "rehearsal_info.json").read_text())
    assert info["prompts"] == 16 and info["rehearsal_samples"] > 0
