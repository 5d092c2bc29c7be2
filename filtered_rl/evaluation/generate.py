"""Batched sampling for evaluation: many prompts × many samples per decode batch, reproducible per sample.

Why a hand-written decode loop instead of `model.generate`: every sample draws its randomness from its
own generator, seeded from (seed, prompt index, sample index), so a sample does not depend on which
other prompts share its batch, on the process that runs it, or on whether the run was resumed. The loop
also returns log π(y|x) under the distribution actually sampled (temperature and top-p applied), which
the KL(p*‖π) estimate needs.

Per batch: prompts are left-padded and prefilled once, the KV cache is repeated for the samples of each
prompt (what `num_return_sequences` does, without re-encoding the prompt), and rows that reach EOS are
dropped from the batch so the remaining ones decode faster. The KV cache is preallocated for the
prompt plus `max_new_tokens` (`_preallocated_cache`): a decode step writes one position in place instead
of copying the whole cache of every layer (transformers' DynamicCache concatenates), and attention sees
exactly the tensors it would see with the dynamic cache, so the samples are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Sample:
    sample_index: int
    text: str
    token_ids: list[int]  # generated tokens, including the final EOS when finished
    num_tokens: int
    finished: bool  # stopped at EOS; False: cut at max_new_tokens
    logprob: float  # log π(y|x) of the sampled tokens (incl. EOS) under the sampling distribution


def sample_seed(seed: int, prompt_seed: int, sample_index: int) -> int:
    """A 63-bit seed for one sample (splitmix64 finaliser of the three integers)."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_seed * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x >> 1


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else value)
    if not ids:
        raise ValueError(
            "the tokenizer has no eos_token_id; set one (tokenizer.eos_token = ...) so samples can end"
        )
    return sorted(ids)


def _filter_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (per row); renormalise."""
    sorted_lp, order = torch.sort(logprobs, dim=-1, descending=True)
    before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()  # mass strictly above each token
    sorted_lp = sorted_lp.masked_fill(before >= top_p, -math.inf)
    filtered = torch.full_like(logprobs, -math.inf).scatter(-1, order, sorted_lp)
    return torch.log_softmax(filtered, dim=-1)


def _draw(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row r takes the first token whose cumulative probability exceeds u_r."""
    cdf = torch.cumsum(logprobs.exp(), dim=-1)
    u = uniforms.unsqueeze(-1) * cdf[:, -1:]  # scale by the total so rounding never runs past the end
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logprobs.shape[-1] - 1).squeeze(-1)


def _preallocated_cache(config: Any, capacity: int) -> Any:
    """A DynamicCache whose full-attention layers keep their keys and values in buffers of `capacity`
    positions: an update writes the new positions in place and returns views of the filled part, the same
    values and shapes as DynamicCache's concatenation, without copying the cache at every step. Sliding-
    window (or other) layers of the model stay as transformers builds them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.length = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.device = key_states.device
                batch, heads, _, _ = key_states.shape
                self._keys = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
                self._values = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(
                    f"the preallocated KV cache holds {capacity} positions; {end} were written"
                )
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def _views(self) -> None:
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self._keys = self._keys.repeat_interleave(repeats, dim=0)
                self._values = self._values.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices) -> None:
            if self.length:
                self._keys, self._values = self._keys[indices], self._values[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the sampler's preallocated cache is never cropped")

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The sampling settings both backends accept."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")


class HFSampler:
    """Samples from a causal LM held in memory (transformers), in batches of `batch_size` sequences."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
        preallocate_cache: bool = True,
    ) -> None:
        _check_sampling(temperature, top_p, max_new_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.preallocate_cache = preallocate_cache  # False: transformers' DynamicCache (for comparison)
        self.temperature, self.top_p, self.max_new_tokens, self.seed = (
            temperature,
            top_p,
            max_new_tokens,
            seed,
        )
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def sample(
        self, prompt_ids: list[list[int]], prompt_seeds: list[int], sample_indices: range
    ) -> list[list[Sample]]:
        """`len(sample_indices)` samples of each prompt (token ids, already formatted) in one decode batch.

        Sample s of a prompt depends only on the model, (seed, prompt_seed, s) and the sampling settings.
        Returns one list of samples per prompt."""
        from transformers import DynamicCache

        device, m = self.device, len(sample_indices)
        width = max(len(ids) for ids in prompt_ids)
        if min(len(ids) for ids in prompt_ids) == 0:
            raise ValueError("an empty prompt cannot be sampled from (the dataset has a blank prompt)")
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device
        )
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)

        cache = (
            _preallocated_cache(self.model.config, width + self.max_new_tokens)
            if self.preallocate_cache
            else DynamicCache(config=self.model.config)
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].repeat_interleave(m, dim=0)
        cache.batch_repeat_interleave(m)
        mask = mask.repeat_interleave(m, dim=0)
        next_position = positions[:, -1:].repeat_interleave(m, dim=0) + 1

        rows = [(p, s) for p in prompt_seeds for s in sample_indices]
        uniforms = torch.stack(
            [
                torch.rand(
                    self.max_new_tokens, generator=torch.Generator().manual_seed(sample_seed(self.seed, p, s))
                )
                for p, s in rows
            ]
        ).to(device)
        eos = torch.tensor(self.eos_ids, device=device)
        tokens: list[list[int]] = [[] for _ in rows]
        logprob = [0.0] * len(rows)
        finished = [False] * len(rows)
        active = torch.arange(len(rows), device=device)  # original row of each live batch entry

        for step in range(self.max_new_tokens):
            if self.temperature == 0:
                logp = torch.log_softmax(logits.float(), dim=-1)
                chosen = logp.argmax(dim=-1)
                chosen_lp = torch.zeros(len(chosen), device=device)  # greedy: a point mass
            else:
                scaled = logits.float() if self.temperature == 1.0 else logits.float() / self.temperature
                logp = torch.log_softmax(scaled, dim=-1)  # x / 1.0 is x: a pass over the vocabulary saved
                if self.top_p < 1.0:
                    logp = _filter_top_p(logp, self.top_p)
                chosen = _draw(logp, uniforms[active, step])
                chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1)
            done = torch.isin(chosen, eos)
            for row, tok, lp, d in zip(active.tolist(), chosen.tolist(), chosen_lp.tolist(), done.tolist()):
                tokens[row].append(tok)
                logprob[row] += lp
                finished[row] = d
            if done.all() or step == self.max_new_tokens - 1:
                break
            if done.any():  # drop finished rows from the batch
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, chosen, mask, next_position = (
                    active[keep],
                    chosen[keep],
                    mask[keep],
                    next_position[keep],
                )
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=next_position,
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
            next_position = next_position + 1

        samples = [
            Sample(
                s,
                self.tokenizer.decode(toks[:-1] if fin else toks, skip_special_tokens=True),
                toks,
                len(toks),
                fin,
                lp,
            )
            for (_, s), toks, lp, fin in zip(rows, tokens, logprob, finished)
        ]
        return [samples[i * m : (i + 1) * m] for i in range(len(prompt_ids))]


# Most logits (rows × positions × vocabulary) one scoring forward may hold: 2^27 floats, 512 MiB in fp32 (the
# log-softmax doubles it). A character-level model never reaches it; a 49k-token vocabulary (SmolLM2) does
# at ~50 rows of 50 tokens, where a fixed batch of 256 rows would need 5 GiB.
MAX_SCORING_LOGITS = 2**27


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def _rows_within_budget(width: int, vocab: int, batch_size: int, max_logits: int) -> int:
    return max(1, min(batch_size, max_logits // max(1, width * vocab)))


@torch.inference_mode()
def sequence_logprobs(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    completions: list[list[int]],
    batch_size: int = 32,
    max_logits: int = MAX_SCORING_LOGITS,
) -> list[float]:
    """log a(y|x) of given completions (token ids, including any EOS) under `model` at temperature 1.

    Used to score samples under the base/reference model; one forward pass per batch, right padding.
    A batch holds at most `batch_size` rows and at most `max_logits` logits (rows × width × vocabulary),
    so a large vocabulary scores in smaller batches instead of running out of memory.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = _vocab_size(model)
    scores: list[float] = []
    start = 0
    while start < len(prompt_ids):
        widest = max(
            len(p) + len(c)
            for p, c in zip(prompt_ids[start : start + batch_size], completions[start : start + batch_size])
        )
        rows = _rows_within_budget(widest, vocab, batch_size, max_logits)
        batch = list(zip(prompt_ids[start : start + rows], completions[start : start + rows]))
        start += rows
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, (p, c) in enumerate(batch):
            ids[r, : len(p) + len(c)] = torch.tensor(p + c)
            mask[r, : len(p) + len(c)] = 1
            target[r, len(p) : len(p) + len(c)] = True
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores += (token_lp * target[:, 1:]).sum(-1).tolist()
    return scores


@torch.inference_mode()
def shared_prompt_logprobs(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    completions: list[list[list[int]]],
    batch_size: int = 256,
    max_logits: int = MAX_SCORING_LOGITS,
) -> list[list[float]]:
    """log a(y|x) of each prompt's completions, the prompt encoded once: `sequence_logprobs` grouped by prompt.

    Per prompt: one forward over the prompt fills a KV cache and gives the first completion token's
    distribution; the cache is repeated for the completions (as the sampler does), which run in batches of
    at most `batch_size` rows and `max_logits` logits, right-padded. The same values as `sequence_logprobs`
    up to floating-point rounding, at a fraction of the cost when prompts are long and have many
    completions (a chat-templated prompt of ~40 BPE tokens and ~30 answers of ~9: ~4× fewer tokens).
    """
    import copy

    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = _vocab_size(model)
    scores: list[list[float]] = []
    for prompt, group in zip(prompt_ids, completions, strict=True):
        if not group:
            scores.append([])
            continue
        if not prompt or min(len(c) for c in group) == 0:
            raise ValueError("shared_prompt_logprobs needs a non-empty prompt and non-empty completions")
        prefix = DynamicCache(config=model.config)
        out = model(
            input_ids=torch.tensor([prompt], device=device),
            past_key_values=prefix,
            use_cache=True,
            logits_to_keep=1,
        )
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        row_scores: list[float] = []
        start = 0
        while start < len(group):
            width = max(len(c) for c in group[start : start + batch_size]) - 1  # inputs: all but the last
            rows = _rows_within_budget(max(width, 1), vocab, batch_size, max_logits)
            chunk = group[start : start + rows]
            start += rows
            first_lp = first[torch.tensor([c[0] for c in chunk], device=device)]
            width = max(len(c) for c in chunk) - 1
            if width == 0:
                row_scores += first_lp.tolist()
                continue
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            target = torch.zeros((len(chunk), width), dtype=torch.bool)
            for r, c in enumerate(chunk):
                ids[r, : len(c) - 1] = torch.tensor(c[:-1])
                target[r, : len(c) - 1] = True
            labels = torch.full((len(chunk), width), pad, dtype=torch.long)
            for r, c in enumerate(chunk):
                labels[r, : len(c) - 1] = torch.tensor(c[1:])
            ids, target, labels = ids.to(device), target.to(device), labels.to(device)
            cache = copy.deepcopy(prefix) if start < len(group) else prefix  # the last chunk may consume it
            cache.batch_repeat_interleave(len(chunk))
            mask = torch.cat(
                [torch.ones((len(chunk), len(prompt)), dtype=torch.long, device=device), target.long()],
                dim=-1,
            )
            positions = torch.arange(len(prompt), len(prompt) + width, device=device).expand(len(chunk), -1)
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits.float()
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, :, None]).squeeze(-1)
            row_scores += (first_lp + (token_lp * target).sum(-1)).tolist()
        scores.append(row_scores)
    return scores


class VLLMSampler:
    """The same interface on vLLM (used when `--backend vllm` and vllm is installed).

    Each request carries its own seed (from the first sample index of the request), so results do not
    depend on sharding; they are not bit-identical to the HF backend. Not exercised by the test suite
    (no GPU/vLLM in CI).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        seed: int = 0,
        dtype: str = "auto",
    ) -> None:
        _check_sampling(temperature, top_p, max_new_tokens)
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError(
                "--backend vllm needs vLLM: `pip install 'filtered-rl[vllm]'` (CUDA only); or use --backend hf"
            ) from err
        self._sampling_params = SamplingParams
        self.llm = LLM(model=model_path, seed=seed, dtype=dtype, logprobs_mode="processed_logprobs")
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens, self.seed = (
            temperature,
            top_p,
            max_new_tokens,
            seed,
        )

    def sample(
        self, prompt_ids: list[list[int]], prompt_seeds: list[int], sample_indices: range
    ) -> list[list[Sample]]:
        params = [
            self._sampling_params(
                n=len(sample_indices),
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_new_tokens,
                logprobs=0,
                seed=sample_seed(self.seed, p, sample_indices.start),
            )
            for p in prompt_seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [
            [
                Sample(
                    s,
                    c.text,
                    list(c.token_ids),
                    len(c.token_ids),
                    c.finish_reason == "stop",
                    float(c.cumulative_logprob or 0.0),
                )
                for s, c in zip(sample_indices, request.outputs)
            ]
            for request in outputs
        ]
