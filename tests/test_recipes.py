"""The training recipe: every YAML parses for every algorithm, and a 2-process CPU run trains and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _launch import free_port, run_launch

from filtered_rl.train import check_before_loading, parse_recipe_args, resolve_config
from filtered_rl.trainers import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false"]  # the GPU configs, parsed on this CPU machine


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_every_config_parses_for_every_algorithm(config: Path, algorithm: str) -> None:
    chosen, (script_args, training_args, model_args, *controller) = parse_recipe_args(
        ["--config", str(config), "--algorithm", algorithm, *CPU_FLAGS]
    )
    assert chosen == algorithm
    assert training_args.temperature == 1.0
    assert model_args.model_name_or_path
    assert isinstance(training_args, ALGORITHMS[algorithm].config_class)
    if algorithm == "filtered":
        assert training_args.divergence in {"forward_kl", "js", "tv", "alpha"}
    if ALGORITHMS[algorithm].accepts_controller:
        assert training_args.beta > 0, "the controller needs the reference model TRL builds only for beta > 0"
    else:
        assert not controller


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_has_a_section_for_every_registered_algorithm(config: Path) -> None:
    import yaml

    sections = {k for k, v in yaml.safe_load(config.read_text()).items() if isinstance(v, dict)}
    assert set(ALGORITHMS.names()) <= sections, (
        f"add sections {set(ALGORITHMS.names()) - sections} to {config.name}"
    )


def test_yaml_section_naming_no_algorithm_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: grpo\ngrpoo:\n  beta: 0.1\n")
    with pytest.raises(SystemExit, match="'grpoo'.*name no registered algorithm"):
        resolve_config(["--config", str(config)])


def test_bad_settings_fail_before_any_model_is_loaded(tmp_path: Path) -> None:
    from datasets import Dataset

    from filtered_rl.data import Task
    from filtered_rl.verifiers import MathVerifier

    with pytest.raises(SystemExit, match="target_validity=1.5"):
        parse_recipe_args(
            ["--algorithm", "grpo_klr", "--target_validity", "1.5", "--output_dir", str(tmp_path), *CPU_FLAGS]
        )
    with pytest.raises(SystemExit, match="controller_estimator"):
        parse_recipe_args(
            ["--algorithm", "rloo", "--controller_estimator", "x", "--output_dir", str(tmp_path), *CPU_FLAGS]
        )
    with pytest.raises(SystemExit, match="target_validity"):
        parse_recipe_args(
            [
                "--algorithm",
                "filtered",
                "--target",
                "tilted",
                "--target_validity",
                "2",
                "--output_dir",
                str(tmp_path),
                *CPU_FLAGS,
            ]
        )
    # TRL's GRPO (k3 KL in the loss) has no p_β fixed point: the controller is refused before any model loads
    with pytest.raises(SystemExit, match="not available for algorithm 'grpo'.*grpo_klr"):
        parse_recipe_args(["--algorithm", "grpo", "--target_validity", "0.8", *CPU_FLAGS])
    yaml_config = tmp_path / "grpo.yaml"
    yaml_config.write_text("algorithm: grpo\ngrpo:\n  beta: 0.04\n  target_validity: 0.8\n")
    with pytest.raises(SystemExit, match="not available for algorithm 'grpo'.*rloo"):
        parse_recipe_args(["--config", str(yaml_config), *CPU_FLAGS])
    _, (_, training_args, _, controller) = parse_recipe_args(
        [
            "--algorithm",
            "grpo_klr",
            "--beta",
            "0",
            "--target_validity",
            "0.8",
            "--output_dir",
            str(tmp_path),
            *CPU_FLAGS,
        ]
    )
    task = Task(
        name="t",
        dataset=Dataset.from_list([{"prompt": "1+1=", "solution": "2"}]),
        verifier=MathVerifier(),
        conversational=False,
    )
    with pytest.raises(SystemExit, match="needs beta > 0"):
        check_before_loading(task, training_args, controller)
    training_args.beta = 0.04
    with pytest.raises(SystemExit, match="lacks a column its verifier reads.*answer"):
        check_before_loading(task, training_args, controller)
    task.dataset = Dataset.from_list([{"prompt": "1+1=", "answer": "2"}])
    check_before_loading(task, training_args, controller)  # a dataset with the gold column passes


def test_algorithm_section_wins_and_flags_win_over_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "algorithm: filtered\nlearning_rate: 0.5\nfiltered:\n  learning_rate: 0.25\ngrpo:\n  beta: 0.1\n"
    )
    algorithm, argv = resolve_config(["--config", str(config)])
    assert algorithm == "filtered"
    import yaml

    flat = yaml.safe_load(Path(argv[1]).read_text())
    assert flat["learning_rate"] == 0.25 and "grpo" not in flat and "beta" not in flat
    assert resolve_config(["--config", str(config), "--algorithm", "grpo"])[0] == "grpo"


def test_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="algorithm='ppo' is not supported.*grpo"):
        resolve_config(["--algorithm", "ppo"])


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "recipes" / "train.py"), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return run_launch(command, env=env, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["filtered", "grpo_klr"])
def test_two_process_cpu_run_trains_and_resumes(algorithm: str, nano_model_dir: Path, tmp_path: Path) -> None:
    """The CI smoke test: accelerate + gloo, 2 steps, checkpoint, resume to step 3 with the same state."""
    out = tmp_path / "run"
    common = [
        "--config", str(ROOT / "recipes" / "configs" / "countdown-nano-cpu.yaml"),
        "--algorithm", algorithm, "--model_name_or_path", str(nano_model_dir), "--output_dir", str(out),
        "--countdown_train_prompts", "64", "--save_steps", "2", "--logging_steps", "1",
    ]  # fmt: skip
    first = _launch([*common, "--max_steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if algorithm == "grpo_klr":  # the β-from-μ controller's state travels in the checkpoint
        assert "BetaFromValidityCallback" in state["stateful_callbacks"]

    second = _launch([*common, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint)], tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    final = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in final["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3], steps  # resumed at step 3, not restarted
    if algorithm == "grpo_klr":
        assert any("kl_control/beta" in entry for entry in final["log_history"])


@pytest.mark.parametrize(
    "config", sorted((ROOT / "recipes" / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem
)
def test_evaluation_configs_become_valid_eval_flags(config: Path) -> None:
    import argparse

    import yaml
    from run_eval import yaml_to_flags

    from filtered_rl.evaluation.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = yaml_to_flags(yaml.safe_load(config.read_text()))
    args = parser.parse_args([*flags, "--model", "some/model", "--num-samples", "8", "--k", "1", "8"])
    assert args.dataset in {"countdown", "gsm8k"} and args.model == "some/model"
    assert args.num_samples == 8 and args.k == [1, 8]  # flags after the YAML win
    assert yaml_to_flags({"chat_template": False, "k": [1, 2]}) == ["--no-chat-template", "--k", "1", "2"]


VLLM_CONFIGS = {
    "gsm8k-qwen2.5-0.5b-vllm-colocate": "colocate",
    "gsm8k-qwen2.5-0.5b-vllm-server": "server",
}


@pytest.mark.parametrize("name", sorted(VLLM_CONFIGS))
@pytest.mark.parametrize("algorithm", ALGORITHMS.names())
def test_vllm_configs_parse_with_trl_vllm_generation(name: str, algorithm: str) -> None:
    """TRL's vLLM fields reach every algorithm's config through parse_recipe_args (what recipes/train.py runs).

    TRL 1.16's GRPOConfig/RLOOConfig do not check that vllm is importable when parsed (only the trainer
    does, when built), so nothing is patched: no model and no vllm (absent here) are loaded.
    """
    mode = VLLM_CONFIGS[name]
    _, (_, training_args, model_args, *_) = parse_recipe_args(
        ["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml"), "--algorithm", algorithm, *CPU_FLAGS]
    )
    assert isinstance(training_args, ALGORITHMS[algorithm].config_class)
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert training_args.use_vllm is True and training_args.vllm_mode == mode
    if mode == "colocate":
        assert training_args.vllm_gpu_memory_utilization == 0.3
        assert training_args.vllm_tensor_parallel_size == 1
    else:
        assert training_args.vllm_server_base_url is None  # host + port are used
        assert training_args.vllm_server_host == "127.0.0.1" and training_args.vllm_server_port == 8000
    # left at TRL's default (on); RLOOConfig has no such field in TRL 1.16
    assert getattr(training_args, "vllm_importance_sampling_correction", True) is True


def test_multi_node_accelerate_config_is_two_nodes_of_eight() -> None:
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = ROOT / "accelerate_configs" / "multi_node.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["num_machines"] == 2 and raw["machine_rank"] == 0
    assert raw["num_processes"] == 16  # accelerate's convention: the total over all machines
    assert raw["main_process_ip"] and isinstance(raw["main_process_port"], int)
    assert DistributedType(raw["distributed_type"]) is DistributedType.MULTI_GPU
    loaded = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads
    assert loaded.distributed_type is DistributedType.MULTI_GPU
    assert (loaded.num_machines, loaded.num_processes) == (2, 16)
