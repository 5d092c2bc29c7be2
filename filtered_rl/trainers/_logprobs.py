"""The sampling policy's per-token log-probs, without a second forward pass where they already exist.

Every post-scoring objective needs log π_old(y|x), the sequence log-prob of each completion under the
policy that sampled it (importance weights p/π_old, the partition estimate Z(x)). TRL computes it only
in some configurations; on the fully on-policy transformers path it computes nothing, and a no-grad
forward of the policy over prompt + completion costs ~10–20 % of a CPU training step. This module takes
it, in order of preference, from:

1. `sampling_per_token_logps` — with vLLM (or a `rollout_func` returning log-probs) TRL keeps the
   log-probs of the distribution the tokens were actually drawn from. They are the right denominators
   for importance weights of samples drawn by vLLM, which is not bit-identical to the trainer's policy.
   TRL's own `vllm_importance_sampling_correction` is a different correction that still applies: it
   reweights the *policy gradient* per token by π_trainer/π_vLLM (clipped), turning an expectation
   under vLLM's samples into one under the trainer's policy, while these log-probs enter the
   *advantages* (Z(x) and the weights of the samples that were drawn). Keep TRL's default (on).
   Tokens vLLM could not score (NaN) are filled from TRL's `old_per_token_logps`, else from a forward.
2. `old_per_token_logps` — TRL's own forward at generation time (`num_iterations > 1`, generation not
   aligned with gradient accumulation, or vLLM's correction): reused as is.
3. Log-probs recorded during `model.generate` (transformers path): `GenerateLogprobRecorder` reads each
   step's raw logits (a forward hook on the model) and, once the step's token is appended, stores
   log_softmax(logits / T)[token]. That is exactly the quantity TRL's forward computes (temperature-
   scaled, before top-p/top-k/min-p/repetition-penalty processors, which TRL's forward ignores too), up
   to the numerics of a KV-cached incremental pass versus a full one. No TRL generation code is copied:
   the model's `generate` is wrapped for the duration of TRL's own call, adding a stopping criterion
   that never stops.
4. Otherwise a no-grad forward of the policy (`per_token_logps`), as before.

The decision to run the forward is made jointly over processes (one flag all-gathered), because under
ZeRO-3/FSDP a forward is a collective that every rank must enter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

SOURCES = ("sampling", "trl_old", "generate", "forward")


class GenerateLogprobRecorder(StoppingCriteria):
    """Records log π(token) of each sampled token while `generate` runs; never stops generation.

    `hook` is a forward hook on the causal LM: it keeps the latest step's last-position logits.
    `__call__` (a stopping criterion, called once per step right after the sampled token is appended to
    `input_ids`) turns them into the token's temperature-scaled log-prob. Why a hook and not the
    criterion's `scores`: those are processed (top-k/top-p set −inf, repetition penalty rescales),
    while TRL's loss and reference use the unprocessed logits / T; the hook gives the same quantity.
    Anything unexpected (no logits on the output, a step without a forward, a batch-size change) marks
    the record `broken`, and the caller falls back to the forward.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.steps: list[torch.Tensor] = []
        self.broken = False
        self._logits: torch.Tensor | None = None

    def hook(self, module: Any, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            self.broken = True
            return
        self._logits = logits[:, -1]  # a view; released at the next criterion call

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        logits, self._logits = self._logits, None
        if logits is None or logits.size(0) != input_ids.size(0):
            self.broken = True
        elif not self.broken:
            logits = logits.to(device=input_ids.device, dtype=torch.float32) / self.temperature
            token = input_ids[:, -1:]
            self.steps.append(logits.gather(1, token).squeeze(1) - torch.logsumexp(logits, dim=-1))
        return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    def per_token(self) -> torch.Tensor | None:
        """(B, steps) log-probs, step j = completion position j; None if broken or empty."""
        if self.broken or not self.steps:
            return None
        return torch.stack(self.steps, dim=1)


def generate_capture_applies(trainer: Any, images: Any, multimodal_fields: dict | None) -> bool:
    """Whether recording during `generate` is worth doing and valid for this generation call.

    Only the plain transformers path (`model.generate`): vLLM returns its own log-probs and continuous
    batching calls `generate_batch`. Not with tools (completions are spliced with tool outputs over
    several calls) nor multimodal inputs (kept conservative). Not when TRL will compute
    `old_per_token_logps` itself anyway (its condition, read from `_generate_and_score_completions`).
    """
    if not getattr(trainer, "capture_sampling_logprobs", True):
        return False
    if trainer.use_vllm or getattr(trainer, "use_transformers_continuous_batching", False):
        return False
    if getattr(trainer, "tools", None) or images is not None or multimodal_fields:
        return False
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    return trainer.args.gradient_accumulation_steps % generate_every == 0


@contextmanager
def record_generate_logprobs(trainer: Any) -> Iterator[GenerateLogprobRecorder]:
    """Wrap the unwrapped policy's `generate` (the object TRL calls) to record sampled tokens' log-probs.

    The wrapper appends a `GenerateLogprobRecorder` to `stopping_criteria` and registers its hook on the
    transformers model that runs the decoding loop (the base model under PEFT), for one call only; a
    second `generate` call within the context marks the record broken (rows would not line up).
    """
    recorder = GenerateLogprobRecorder(trainer.temperature)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    # a PeftModel decodes in its base model; duck-typed, since accelerate's `is_peft_model` costs ~4 ms a call
    get_base_model = getattr(unwrapped, "get_base_model", None)
    decoder = get_base_model() if callable(get_base_model) else unwrapped
    original = unwrapped.generate
    calls = 0

    def generate(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            recorder.broken = True
            return original(*args, **kwargs)
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(recorder)
        handle = decoder.register_forward_hook(recorder.hook)
        try:
            return original(*args, stopping_criteria=criteria, **kwargs)
        finally:
            handle.remove()
            recorder._logits = None

    shadowed = "generate" in vars(unwrapped)
    previous = vars(unwrapped).get("generate")
    unwrapped.generate = generate
    try:
        yield recorder
    finally:
        if shadowed:
            unwrapped.generate = previous
        else:
            del unwrapped.generate


def fit_width(per_token: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad with zeros or truncate (B, S) to (B, width): TRL pads completions to its own width
    (the longest kept completion, maybe rounded up by `pad_to_multiple_of`), the record has one column
    per decoding step (one more on backends that defer the stop check)."""
    if per_token.size(1) >= width:
        return per_token[:, :width]
    return torch.nn.functional.pad(per_token, (0, width - per_token.size(1)))


def sampling_logps(
    trainer: Any, output: dict[str, Any], mask: torch.Tensor, recorded: torch.Tensor | None
) -> tuple[torch.Tensor, str]:
    """(B,) sequence log-probs under the sampling policy, and which source gave them (see `SOURCES`).

    `recorded` is the (B, steps) record from `generate`, or None. The no-grad forward runs only when no
    source covers every masked token, decided jointly over processes (see the module doc).
    """
    from filtered_rl.trainers._base import per_token_logps

    width = output["completion_ids"].size(1)
    sampled = output.get("sampling_per_token_logps")
    old = output.get("old_per_token_logps")
    if recorded is not None and recorded.size(0) != mask.size(0):
        recorded = None
    source, per_token = "forward", None
    if sampled is not None:
        source, per_token = "sampling", sampled.float()
        missing = torch.isnan(per_token) & mask.bool()
        if missing.any() and old is not None:
            per_token = torch.where(missing, old.float(), per_token)
        elif missing.any():
            per_token = None
    elif old is not None:
        source, per_token = "trl_old", old.float()
    elif recorded is not None:
        source, per_token = "generate", fit_width(recorded.float(), width).to(mask.device)
    if _any_process(trainer, per_token is None):
        forward = per_token_logps(trainer, output, reference=False).float()
        if per_token is None:
            source, per_token = "forward", forward
        elif source == "sampling":  # another process lacks some tokens: fill ours where NaN only
            per_token = torch.where(torch.isnan(per_token), forward, per_token)
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))  # NaN · 0 would be NaN
    return masked.sum(dim=1), source


def _any_process(trainer: Any, flag: bool) -> bool:
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.gather(value).max().item() > 0)
