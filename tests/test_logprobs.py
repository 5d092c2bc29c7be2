"""log π_old without the extra forward: recorded during `generate`, taken from vLLM's sampling log-probs
or TRL's `old_per_token_logps`, and the forward only as the fallback (filtered_rl.trainers._logprobs)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _common import CPU

pytest.importorskip("trl")

from filtered_rl.trainers import _base  # noqa: E402
from filtered_rl.trainers._logprobs import GenerateLogprobRecorder, fit_width, sampling_logps  # noqa: E402
from filtered_rl.trainers.filtered import FilteredGRPOConfig, FilteredGRPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from _tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


# ------------------------------------------------------------------ the recorder, against a full forward


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_equal_a_full_forward_at_the_same_temperature(
    nano_model_dir, countdown_data, temperature
):
    """What the recorder keeps at each step is log_softmax(logits / T)[sampled token] of the very forward
    that produced the step: the KV-cached pass and a full teacher-forced pass agree to float tolerance.
    top_k/top_p processors change the sampling but not the recorded quantity (TRL's forward ignores them
    too); the comparison covers every token up to and including EOS, with left-padded prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

    tokenizer = AutoTokenizer.from_pretrained(nano_model_dir)
    model = AutoModelForCausalLM.from_pretrained(nano_model_dir).eval()
    prompts = [countdown_data["test"][i]["prompt"] for i in (0, 5)]  # different lengths: left padding
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    recorder = GenerateLogprobRecorder(temperature)
    handle = model.register_forward_hook(recorder.hook)
    torch.manual_seed(0)
    with torch.no_grad():
        sequences = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=20,
            max_new_tokens=24,
            num_return_sequences=4,
            stopping_criteria=StoppingCriteriaList([recorder]),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    handle.remove()
    recorded = recorder.per_token()
    prompt_length = batch["input_ids"].size(1)
    completion = sequences[:, prompt_length:]
    assert recorded is not None and recorded.shape == completion.shape

    attention = torch.cat(
        [batch["attention_mask"].repeat_interleave(4, dim=0), torch.ones_like(completion)], dim=1
    )
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention).logits[:, prompt_length - 1 : -1]
    expected = torch.log_softmax(logits.float() / temperature, dim=-1).gather(2, completion.unsqueeze(2))[
        ..., 0
    ]
    is_eos = completion == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.size(1))
    mask = torch.arange(completion.size(1)) <= first_eos.unsqueeze(1)
    assert is_eos.any(), "no completion ended: the EOS position is not covered"
    assert torch.allclose(recorded[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_the_record_breaks_rather_than_misaligns():
    recorder = GenerateLogprobRecorder(1.0)
    recorder(torch.zeros(2, 3, dtype=torch.long), None)  # a step without a forward
    assert recorder.broken and recorder.per_token() is None
    recorder = GenerateLogprobRecorder(1.0)
    recorder.hook(None, None, SimpleNamespace(logits=torch.zeros(3, 1, 5)))
    recorder(torch.zeros(2, 3, dtype=torch.long), None)  # batch size changed under it
    assert recorder.per_token() is None
    recorder = GenerateLogprobRecorder(1.0)
    recorder.hook(None, None, SimpleNamespace(hidden_states=torch.zeros(2, 1, 5)))  # no logits
    assert recorder.broken


def test_fit_width_pads_and_truncates_to_trls_width():
    record = torch.tensor([[-1.0, -2.0, -3.0]])
    assert fit_width(record, 5).tolist() == [[-1.0, -2.0, -3.0, 0.0, 0.0]]
    assert fit_width(record, 2).tolist() == [[-1.0, -2.0]]


# ------------------------------------------------------------------ source selection, on a stub trainer


def stub_trainer(forward: torch.Tensor) -> SimpleNamespace:
    calls = []
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), forward_calls=calls)
    trainer.forward = forward
    return trainer


@pytest.fixture()
def fake_forward(monkeypatch):
    """Replace the policy forward by a known tensor and count its calls."""
    calls = []

    def forward(trainer, output, reference):
        calls.append(reference)
        return trainer.forward

    monkeypatch.setattr(_base, "per_token_logps", forward)
    return calls


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
OUTPUT = {"completion_ids": torch.zeros(2, 4, dtype=torch.long)}
FORWARD = torch.full((2, 4), -9.0)


def test_vllm_sampling_logprobs_are_used_exactly_and_nan_is_filled_from_trls_old(fake_forward):
    sampled = torch.tensor([[-0.5, math.nan, -0.25, math.nan], [-1.0, -2.0, 0.0, 0.0]])
    old = torch.full((2, 4), -3.0)
    total, source = sampling_logps(
        stub_trainer(FORWARD),
        {**OUTPUT, "sampling_per_token_logps": sampled, "old_per_token_logps": old},
        MASK,
        None,
    )
    assert source == "sampling" and not fake_forward
    assert total.tolist() == [-0.5 - 3.0 - 0.25, -3.0]  # NaN past the mask is dropped, not propagated


def test_vllm_nan_without_trls_old_falls_back_to_the_forward_there_only(fake_forward):
    sampled = torch.tensor([[-0.5, math.nan, -0.25, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    total, source = sampling_logps(
        stub_trainer(FORWARD), {**OUTPUT, "sampling_per_token_logps": sampled}, MASK, None
    )
    assert fake_forward == [False] and source == "forward"
    assert total.tolist() == [-27.0, -18.0]


def test_trls_old_logprobs_are_reused_and_the_record_is_ignored_then(fake_forward):
    old = torch.tensor([[-1.0, -1.0, -1.0, -7.0], [-2.0, -2.0, -7.0, -7.0]])
    recorded = torch.full((2, 3), -5.0)
    total, source = sampling_logps(
        stub_trainer(FORWARD), {**OUTPUT, "old_per_token_logps": old}, MASK, recorded
    )
    assert (source, total.tolist(), fake_forward) == ("trl_old", [-3.0, -4.0], [])


def test_the_generate_record_is_used_when_trl_has_nothing(fake_forward):
    recorded = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])  # one column short of TRL's width
    total, source = sampling_logps(stub_trainer(FORWARD), OUTPUT, MASK, recorded)
    assert (source, total.tolist(), fake_forward) == ("generate", [-6.0, -9.0], [])


def test_no_source_runs_the_forward(fake_forward):
    total, source = sampling_logps(stub_trainer(FORWARD), OUTPUT, MASK, None)
    assert (source, total.tolist(), fake_forward) == ("forward", [-27.0, -18.0], [False])
    total, source = sampling_logps(stub_trainer(FORWARD), OUTPUT, MASK, torch.zeros(3, 4))  # wrong rows
    assert source == "forward"


# ------------------------------------------------------------------ the trainer, end to end


def make_trainer(tiny_model_dir: Path, tmp_path: Path, peft_config=None, **overrides) -> FilteredGRPOTrainer:
    from _tiny_model import has_digit
    from datasets import Dataset

    values = dict(
        output_dir=str(tmp_path / "out"),
        max_completion_length=8,
        num_generations=4,
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        temperature=0.8,
        seed=0,
        **CPU,
    )
    values.update(overrides)
    rows = [{"prompt": f"q{i}:", "answer": str(i)} for i in range(4)]
    return FilteredGRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=has_digit,
        args=FilteredGRPOConfig(**values),
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
    )


@pytest.fixture()
def spy(monkeypatch):
    """Every `sampling_logps` call of the trainer, with the forward's answer computed beside it."""
    seen = []
    original = _base.sampling_logps

    def record(trainer, output, mask, recorded):
        total, source = original(trainer, output, mask, recorded)
        forward = _base.per_token_logps(trainer, output, reference=False).float()
        seen.append(SimpleNamespace(source=source, total=total, forward=forward * mask))
        return total, source

    monkeypatch.setattr(_base, "sampling_logps", record)
    return seen


def test_the_trainer_records_log_pi_old_during_generate_and_it_equals_the_forward(
    tiny_model_dir, tmp_path, spy
):
    trainer = make_trainer(tiny_model_dir, tmp_path)
    trainer.train()
    assert [call.source for call in spy] == ["generate", "generate"]
    assert trainer.sampling_logps_source == "generate"
    for call in spy:
        assert torch.allclose(call.total, call.forward.sum(dim=1), atol=1e-4, rtol=1e-5)


def test_capture_off_takes_the_forward_and_gives_the_same_training(tiny_model_dir, tmp_path, spy):
    """Recording draws no random numbers: with and without it, the same seed samples the same
    completions and the two runs agree on log π_old (so on every downstream quantity)."""
    recorded_run = make_trainer(tiny_model_dir, tmp_path / "a")
    recorded_run.train()
    forward_run = make_trainer(tiny_model_dir, tmp_path / "b")
    forward_run.capture_sampling_logprobs = False
    forward_run.train()
    assert [call.source for call in spy] == ["generate", "generate", "forward", "forward"]
    for a, b in zip(spy[:2], spy[2:], strict=True):
        assert torch.allclose(a.total, b.total, atol=1e-4, rtol=1e-5)


def test_with_several_iterations_trls_old_logprobs_are_reused(tiny_model_dir, tmp_path, spy):
    trainer = make_trainer(tiny_model_dir, tmp_path, num_iterations=2, max_steps=2)
    trainer.train()
    # one generation serves both iterations; TRL's old log-probs are the policy's at generation time,
    # which is when the spy runs its forward too
    assert [call.source for call in spy] == ["trl_old"]
    assert torch.allclose(spy[0].total, spy[0].forward.sum(dim=1), atol=1e-4, rtol=1e-5)


class StubVLLM:
    """TRL's vLLM generation backend, stubbed: fixed completions with known per-token log-probs, one
    token vLLM could not score (None, as vLLM reports NaN)."""

    def __init__(self, eos_token_id: int, token_id: int):
        self.completions = [[token_id, token_id, eos_token_id], [token_id, eos_token_id]]
        self.logprobs = [[-0.5, None, -0.25], [-1.5, -0.75]]
        self.synced = 0

    def sync_weights(self) -> None:
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler):
        n = len(prompts)  # TRL passes every prompt num_generations times already
        completions = [self.completions[i % 2] for i in range(n)]
        logprobs = [[[lp] for lp in self.logprobs[i % 2]] for i in range(n)]
        return None, completions, logprobs, None


def test_with_a_vllm_backend_its_sampling_logprobs_are_log_pi_old(tiny_model_dir, tmp_path, spy):
    """The vLLM branch, with the generation backend stubbed (vLLM cannot run here): log π_old is the sum of
    the log-probs the backend reported, the unscored token filled from TRL's own old log-probs (which
    TRL computes whenever vLLM is on, for its importance-sampling correction)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    tokenizer = trainer.processing_class
    backend = StubVLLM(tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("7"))
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, backend, -1
    trainer.train()
    assert backend.synced == 1 and [call.source for call in spy] == ["sampling"]
    total, forward = spy[0].total, spy[0].forward
    # rows alternate the two stubbed completions; the first's unscored token is TRL's old log-prob there,
    # i.e. the policy's at generation time, which the spy's forward computed at the same moment
    assert torch.allclose(total[1::2], torch.full_like(total[1::2], -1.5 - 0.75))
    assert torch.allclose(total[0::2], -0.5 - 0.25 + forward[0::2, 1], atol=1e-5)
    assert not torch.allclose(total, forward.sum(dim=1), atol=1e-2)  # not the forward's own answer


def test_under_peft_the_record_is_taken_on_the_adapted_model(tiny_model_dir, tmp_path, spy):
    """With LoRA the decoding loop runs in the base transformers model with the adapter active: the hook
    sits there, and the record equals the forward of the adapted policy (lora_B is zero at init, so
    train one step first to make the adapter matter for the second generation)."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tiny_model_dir, tmp_path, peft_config=lora, learning_rate=0.5)
    trainer.train()
    assert [call.source for call in spy] == ["generate", "generate"]
    for call in spy:
        assert torch.allclose(call.total, call.forward.sum(dim=1), atol=1e-4, rtol=1e-5)
