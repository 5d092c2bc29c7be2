"""Generated tokens/s of the evaluation sampler vs a per-request loop, measured in one run.

The baseline is what lm-eval's `repeats` amounts to for pass@k: one `model.generate` call per sample.
The evaluation tool instead prefills each prompt once, decodes many prompts × samples per batch, and
drops finished rows. Both sample the same prompts at temperature 1 with the same max_new_tokens; the
ratio of generated tokens per second is printed (the baseline runs on fewer samples per prompt to keep
the run short: a rate is a rate).

On a GPU it also prints the fraction of the decode memory-bandwidth roofline: every decode step reads
all weights once plus the KV cache of every live row, so tokens/s ≤ rows · bandwidth / (weight bytes
+ KV bytes); the KV term uses the mean context length of the run.

    python benchmarks/bench_eval_throughput.py                # pretrained nano model (cached), CPU
    python benchmarks/bench_eval_throughput.py --model PATH --prompts 32 --samples 64
"""

from __future__ import annotations

import argparse
import time

import torch

# Peak HBM bandwidth, bytes/s (vendor figures), matched against torch.cuda.get_device_name().
BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100-SXM4-40GB": 1.56e12,
    "A100": 1.94e12,
    "L40S": 0.864e12,
    "A10G": 0.6e12,
    "L4": 0.3e12,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: the pretrained nano model)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt for the batched sampler")
    parser.add_argument("--baseline-samples", type=int, default=4, help="samples per prompt for the loop")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per decode batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)"
    )
    parser.add_argument(
        "--bandwidth", type=float, default=None, help="GPU memory bandwidth in GB/s (override)"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from filtered_rl.evaluation.generate import HFSampler
    from filtered_rl.evaluation.runner import plan_batches, prompt_seed
    from filtered_rl.synthetic.countdown import make_countdown_dataset

    torch.set_num_threads(args.threads)
    if args.model is None:
        from filtered_rl.synthetic.base_model import load_or_pretrain

        args.model = str(load_or_pretrain("nano", seed=0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    rows = make_countdown_dataset(0, args.prompts, seed=1)["test"]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in rows["prompt"]]
    seeds = [prompt_seed(pid) for pid in rows["prompt_id"]]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Batched sampler, as `filtered-rl eval` runs it.
    sampler = HFSampler(model, tokenizer, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    sampler.sample(encoded[:1], seeds[:1], range(2))  # warm-up
    sync()
    start, tokens, steps, rows_tokens = time.perf_counter(), 0, 0, 0
    for positions, sample_range in plan_batches([len(e) for e in encoded], args.samples, args.batch_size):
        groups = sampler.sample([encoded[i] for i in positions], [seeds[i] for i in positions], sample_range)
        lengths = [s.num_tokens for g in groups for s in g]
        tokens += sum(lengths)
        steps += max(lengths)
        rows_tokens += sum(len(encoded[i]) * len(sample_range) for i in positions)
    sync()
    batched_s = time.perf_counter() - start
    batched_rate = tokens / batched_s

    # Per-request loop: one generate call per sample.
    start, loop_tokens = time.perf_counter(), 0
    for ids in encoded:
        input_ids = torch.tensor([ids], device=device)
        for _ in range(args.baseline_samples):
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            loop_tokens += out.shape[1] - input_ids.shape[1]
    sync()
    loop_s = time.perf_counter() - start
    loop_rate = loop_tokens / loop_s

    # Reference point: HF generate with num_return_sequences (batched per prompt, not reproducible per sample).
    start, hf_tokens = time.perf_counter(), 0
    for ids in encoded:
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.samples,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion = out[:, input_ids.shape[1] :]
        # count up to and including the first EOS (the rest is padding)
        ended = (completion == tokenizer.eos_token_id).int().cumsum(-1)
        hf_tokens += int(((ended == 0) | ((ended == 1) & (completion == tokenizer.eos_token_id))).sum())
    sync()
    hf_s = time.perf_counter() - start
    hf_rate = hf_tokens / hf_s

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.model} ({params / 1e6:.2f} M parameters, {dtype}), device: {device}"
        f"{'' if device.type == 'cuda' else f', {args.threads} CPU thread(s)'}"
    )
    print(
        f"batched sampler : {tokens:6d} tokens in {batched_s:7.2f} s = {batched_rate:9.1f} tokens/s "
        f"({args.prompts} prompts x {args.samples} samples, batch {args.batch_size})"
    )
    print(
        f"per-request loop: {loop_tokens:6d} tokens in {loop_s:7.2f} s = {loop_rate:9.1f} tokens/s "
        f"({args.prompts} prompts x {args.baseline_samples} samples, one generate call each)"
    )
    print(
        f"HF generate, num_return_sequences={args.samples} per prompt: {hf_tokens:6d} tokens in {hf_s:7.2f} s = "
        f"{hf_rate:9.1f} tokens/s"
    )
    print(
        f"speed-up (tokens/s ratio): {batched_rate / loop_rate:.1f}x vs the per-request loop, "
        f"{batched_rate / hf_rate:.2f}x vs generate(num_return_sequences)"
    )

    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        bandwidth = (
            args.bandwidth * 1e9
            if args.bandwidth
            else next((bw for key, bw in BANDWIDTH.items() if key in name), None)
        )
        if bandwidth is None:
            print(f"roofline: unknown bandwidth for {name}; pass --bandwidth GB/s")
            return
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize
        weight_bytes = params * dtype.itemsize
        # Mean live context per generated token ≈ prompt + half the completion.
        total_rows = args.prompts * args.samples
        mean_context = rows_tokens / total_rows + tokens / total_rows / 2
        rows_per_step = tokens / max(1, steps)
        bytes_per_step = weight_bytes + rows_per_step * mean_context * kv_per_token
        roofline = rows_per_step * bandwidth / bytes_per_step
        print(
            f"roofline ({name}, {bandwidth / 1e12:.2f} TB/s): {roofline:,.0f} tokens/s at {rows_per_step:.0f} "
            f"live rows/step; achieved {batched_rate / roofline:.1%} of it"
        )


if __name__ == "__main__":
    main()
