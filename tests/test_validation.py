"""Settings that cannot work are refused before any data or model loads, naming the field (issue #22, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from filtered_rl.train import parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--use_cpu", "true", "--bf16", "false"]


@pytest.mark.parametrize("algorithm", ["grpo", "filtered"])
@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", "0"),
        ("learning_rate", "-1e-5"),
        ("learning_rate", "nan"),
        ("per_device_train_batch_size", "0"),
        ("gradient_accumulation_steps", "0"),
        ("max_completion_length", "0"),
        ("temperature", "0"),
        ("temperature", "nan"),
        ("num_generations", "0"),
        ("beta", "-0.1"),
        ("save_steps", "0"),
        ("max_steps", "0"),
        ("countdown_train_prompts", "0"),
    ],
)
def test_bad_setting_is_refused_at_parse_time_naming_the_field(
    algorithm: str, field: str, value: str, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(
            ["--algorithm", algorithm, "--output_dir", str(tmp_path), *CPU, f"--{field}={value}"]
        )
    assert f"{field}={value}" in str(exit_info.value) or field in str(exit_info.value)
    assert "e.g." in str(exit_info.value)


def test_a_bad_setting_in_a_yaml_section_is_refused_too(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: filtered\nfiltered:\n  num_generations: 0\n")
    with pytest.raises(SystemExit, match="num_generations=0"):
        parse_recipe_args(["--config", str(config), "--output_dir", str(tmp_path), *CPU])


def test_more_countdown_prompts_than_the_task_has_are_refused_naming_the_maximum(
    tmp_path: Path, monkeypatch
) -> None:
    import transformers

    from filtered_rl.train import main

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(
        SystemExit, match=r"countdown_train_prompts=100000.*only 638 .*countdown_train_prompts: 638"
    ):
        main(["--dataset_name", "countdown", "--countdown_train_prompts", "100000", "--output_dir",
              str(tmp_path / "run"), "--model_name_or_path", "filtered-rl:nano", *CPU])  # fmt: skip


def test_shipped_countdown_recipes_ask_for_no_more_prompts_than_the_task_has() -> None:
    import yaml

    from filtered_rl.synthetic.tasks.countdown import prompt_pool_size

    pool = prompt_pool_size()["train"]
    for config in sorted((ROOT / "recipes" / "configs").glob("countdown-*.yaml")):
        asked = yaml.safe_load(config.read_text()).get("countdown_train_prompts")
        assert asked is None or asked <= pool, f"{config.name}: countdown_train_prompts {asked} > {pool}"


def test_sectioned_yaml_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = ROOT / "recipes" / "configs" / "countdown-nano-cpu.yaml"
    parse_recipe_args(["--config", str(config), "--output_dir", str(tmp_path / "run"), *CPU])
    with pytest.raises(SystemExit):
        parse_recipe_args(["--config", str(config), "--learning_rate", "0", *CPU])
    assert list(tmp_path.glob("filtered-rl-*.yaml")) == []
