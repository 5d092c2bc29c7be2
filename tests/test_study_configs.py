"""The shipped study configs (recipes/study/*.yaml) parse through `filtered-rl study`'s config reader, every arm
resolves to a registered algorithm and passes `filtered-rl train`'s parser and checks, and the task loads;
a broken copy is refused. Nothing trains and no model loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from filtered_rl.study.cli import add_arguments, check_arms, check_task, load_study
from filtered_rl.study.config import StudyConfigError
from filtered_rl.study.runner import StudyError
from filtered_rl.trainers import ALGORITHMS

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "study"
STUDY_CONFIGS = sorted(RECIPES.glob("*.yaml"))
REAL_MODEL_ARMS = {
    "grpo β=0": "grpo",
    "grpo β=0.2": "grpo",
    "rloo μ=0.8": "rloo",
    "filtered forward KL + p* samples": "filtered_pstar",
    "mara β=0.1": "mara",
}
GPU_ONLY_REMEDIES = {"nsr", "f_grpo", "rs_grpo", "pkpo", "clip_cov", "kl_cov", "sage"}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_study_configs_are_shipped() -> None:
    names = {path.name for path in STUDY_CONFIGS}
    assert {"smollm2-countdown.yaml", "smollm2-countdown-gpu.yaml"} <= names, names


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_a_shipped_study_config_parses_and_every_arm_passes_train_checks(path: Path) -> None:
    config, seeds = load_study(_args("--config", str(path)))
    assert config.runs and seeds
    for spec in config.runs:
        assert spec.algorithm in ALGORITHMS.names(), spec
    check_arms(config)  # each arm's `filtered-rl train` config through its parser and checks
    check_task(config)  # the training and held-out prompts load (a synthetic task: no hub, no model)


def test_the_real_model_configs_run_the_key_arms_and_differ_only_in_budget() -> None:
    cpu, cpu_seeds = load_study(_args("--config", str(RECIPES / "smollm2-countdown.yaml")))
    gpu, gpu_seeds = load_study(_args("--config", str(RECIPES / "smollm2-countdown-gpu.yaml")))
    assert {s.name: s.algorithm for s in cpu.runs} == REAL_MODEL_ARMS
    # The GPU config runs the CPU config's arms first, then the rivals and the 2025-26 remedies.
    assert gpu.runs[: len(cpu.runs)] == cpu.runs
    assert {"rft", "raft", "reinforce_rej"} | GPU_ONLY_REMEDIES == {
        s.algorithm for s in gpu.runs[len(cpu.runs) :]
    }
    for config in (cpu, gpu):
        assert config.model == "filtered-rl:smollm2-135m-countdown" and config.task == "countdown_hard"
        assert config.conversational is True  # the prompts the base was fine-tuned on
        assert config.settings["use_peft"] is True
        pstar = next(s for s in config.runs if s.algorithm == "filtered_pstar")
        assert (pstar.rehearsal_samples, pstar.rehearsal_min_correct) == (32, 1)  # stored draws of p*
        rloo = next(s for s in config.runs if s.algorithm == "rloo")
        assert rloo.target_validity == 0.8 and "target_validity" not in rloo.options  # β from μ
    assert cpu.settings == gpu.settings
    assert (cpu.learning_rate, cpu.num_generations) == (gpu.learning_rate, gpu.num_generations)
    assert gpu.steps * gpu.batch_size >= 10 * cpu.steps * cpu.batch_size and len(gpu_seeds) > len(cpu_seeds)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("mara: {mara_beta: 0.1,", "maraa: {mara_beta: 0.1,"), "unknown algorithm 'maraa'"),
        (("  dtype: float32", "  dtype: float32\n  bogus_key: 3"), "bogus_key"),
        (("rloo: {beta: 0.04,", "grpo: {beta: 0.04,"), "target_validity"),  # TRL's GRPO: no β from μ
        (("seeds: [0]", "seeds: [zero]"), "seeds"),
    ],
)
def test_a_broken_copy_of_the_cpu_config_is_refused(
    edit: tuple[str, str], expected: str, tmp_path: Path
) -> None:
    text = (RECIPES / "smollm2-countdown.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "arms.yaml"
    path.write_text(text.replace(*edit))
    with pytest.raises((StudyConfigError, StudyError), match=expected):
        config, _ = load_study(_args("--config", str(path)))
        check_arms(config)
