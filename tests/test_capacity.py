"""The capacity check (docs/results.md §4f): the micro size builds and pretrains, and the capacity preset is a
valid study at every size (its arms through `filtered-rl train`'s parser), without training to convergence."""

from __future__ import annotations

from pathlib import Path

import pytest

from filtered_rl.synthetic.base_model import (
    SIZES,
    build_model,
    build_tokenizer,
    count_parameters,
    load_or_pretrain,
    make_config,
)


def test_micro_is_a_larger_nano_with_nanos_pretraining_recipe() -> None:
    tokenizer = build_tokenizer()
    nano = count_parameters(build_model("nano", tokenizer))
    micro = count_parameters(build_model("micro", tokenizer))
    assert 0.9e6 < micro < 1.2e6 and micro > 3 * nano  # 1.02 M against 0.26 M
    assert SIZES["micro"]["num_hidden_layers"] == SIZES["nano"]["num_hidden_layers"]  # wider, not deeper
    # only the size differs from the nano base the study compares against (and so the cache key)
    nano_config = make_config("nano", task="countdown_hard", steps=2400)
    micro_config = make_config("micro", task="countdown_hard", steps=2400)
    assert {k: v for k, v in vars(micro_config).items() if k != "size"} == {
        k: v for k, v in vars(nano_config).items() if k != "size"
    }
    assert micro_config.cache_key() != nano_config.cache_key()


def test_micro_pretrains_a_few_steps_and_generates(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = load_or_pretrain("micro", seed=0, cache_dir=tmp_path, task="countdown_hard", progress=False,
                            steps=2, batch_size=4, corpus_prompts=8, warmup_steps=1)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert count_parameters(model) == count_parameters(build_model("micro", build_tokenizer()))
    ids = tokenizer("3 4 5 6 -> 24:", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in out[0].tolist()


@pytest.mark.parametrize("size", ["nano", "micro"])
@pytest.mark.parametrize("name", ["countdown-hard-capacity", "countdown-hard-capacity-long"])
def test_capacity_preset_is_a_valid_study_at_each_size(name: str, size: str) -> None:
    from filtered_rl.study.cli import check_arms
    from filtered_rl.synthetic.frontier import PRESETS, select_size

    preset = select_size(PRESETS[name], size)
    assert preset.steps == {"countdown-hard-capacity": 300, "countdown-hard-capacity-long": 1200}[name]
    assert preset.base_size == size and preset.task == "countdown_hard" and preset.base_steps == 2400
    # the plateau experiment's arms (§4c) and the representability check (§4d), the same at every size
    assert [spec.algorithm for spec in preset.runs] == ["pstar_distill", "filtered_pstar", "grpo", "grpo"]
    assert sorted(spec.options.get("beta") for spec in preset.runs if spec.algorithm == "grpo") == [0.0, 0.2]
    assert preset.curve_points > 0 and preset.exact  # the curve says whether an arm has plateaued
    check_arms(preset)  # every RL arm's filtered-rl train config parses and passes its checks


def test_an_unknown_size_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from filtered_rl.cli import main
    from filtered_rl.synthetic.frontier import PRESETS, run_frontier, select_size

    assert select_size(PRESETS["countdown-hard-capacity"], None) is PRESETS["countdown-hard-capacity"]
    with pytest.raises(ValueError, match=r"--size huge: unknown; choose from .*micro.*nano"):
        run_frontier("countdown-hard-capacity", tmp_path / "o", [0], size="huge")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as stop:
        main(["frontier", "--size", "huge", "--output-dir", str(tmp_path / "o")])
    assert stop.value.code == 2 and "--size" in capsys.readouterr().err and not (tmp_path / "o").exists()
