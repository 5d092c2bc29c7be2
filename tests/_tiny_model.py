"""Test scaffolding shared by several test files and by tests/_ddp_filtered_step.py (run as a script).

A random Qwen2 with the project's character tokenizer: the trainer, controller and evaluation
mechanics need a real model directory but no training.
"""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(
    directory: Path,
    *,
    hidden_size: int = 16,
    intermediate_size: int = 32,
    max_position_embeddings: int = 128,
    max_new_tokens: int | None = None,
) -> Path:
    """A random 2-layer Qwen2 (seed 0) saved with the tokenizer as a Hugging Face directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from filtered_rl.synthetic.base_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if max_new_tokens is not None:
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def has_digit(completions, **kwargs):
    """Toy verifier: valid iff the completion contains a digit (a fair share of a random model's samples)."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]
