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
    python benchmarks/bench_eval_throughput.py --model filtered-rl:smollm2-135m --prompts 8 --samples 16 \
        --max-new-tokens 32 --threads 2 --rounds 2       # a named model, as `filtered-rl train/eval` take

On a CPU it prints a compute floor instead of the roofline: the time of the model's linear layers alone
(every `nn.Linear`, the LM head included, one matmul each) for as many rows as the sampler decodes per
step, measured in the same rounds; the sampler's tokens/s as a fraction of that floor says how much of
its time is matrix multiplication and how much anything else (attention, norms, the KV cache, sampling,
Python). `--profile` adds torch.profiler's table of one sampler batch (self CPU time per op).

With `--rounds N` the three contestants run in turn N times (sampler, loop, generate, sampler, ...), so a
change in the machine's load hits all of them; the ratios are of the summed tokens and seconds, and each
round's ratios are printed too. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument(
        "--model",
        default=None,
        help="model directory, hub name or `filtered-rl:<name>` (default: the pretrained nano model)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of the three contestants")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one sampler batch")
    parser.add_argument(
        "--compare-cache",
        action="store_true",
        help="also run the sampler with transformers' DynamicCache (the sampler's cache before issue #23)",
    )
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
    load_before = os.getloadavg()
    if args.model is None:
        from filtered_rl.synthetic.base_model import load_or_pretrain

        args.model = str(load_or_pretrain("nano", seed=0))
    else:
        from filtered_rl.models import resolve_model

        args.model = resolve_model(args.model)  # `filtered-rl:smollm2-135m` → its cached directory
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    rows = make_countdown_dataset(0, args.prompts, seed=1)["test"]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in rows["prompt"]]
    seeds = [prompt_seed(pid) for pid in rows["prompt_id"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Batched sampler, as `filtered-rl eval` runs it.
    sampler = HFSampler(model, tokenizer, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    sampler.sample(encoded[:1], seeds[:1], range(2))  # warm-up
    sync()
    shape = {"steps": 0, "rows_tokens": 0, "tokens": 0}

    dynamic_sampler = HFSampler(
        model,
        tokenizer,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        seed=0,
        preallocate_cache=False,
    )

    def batched_dynamic() -> int:  # the same samples, through transformers' DynamicCache
        tokens = 0
        for positions, sample_range in plan_batches([len(e) for e in encoded], args.samples, args.batch_size):
            groups = dynamic_sampler.sample(
                [encoded[i] for i in positions], [seeds[i] for i in positions], sample_range
            )
            tokens += sum(s.num_tokens for g in groups for s in g)
        return tokens

    def batched() -> int:
        tokens, shape["steps"], shape["rows_tokens"] = 0, 0, 0
        for positions, sample_range in plan_batches([len(e) for e in encoded], args.samples, args.batch_size):
            groups = sampler.sample(
                [encoded[i] for i in positions], [seeds[i] for i in positions], sample_range
            )
            lengths = [s.num_tokens for g in groups for s in g]
            tokens += sum(lengths)
            shape["steps"] += max(lengths)
            shape["rows_tokens"] += sum(len(encoded[i]) * len(sample_range) for i in positions)
        shape["tokens"] = tokens
        return tokens

    def hf_sample(input_ids: torch.Tensor, n: int) -> torch.Tensor:  # plain multinomial sampling, n rows
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=pad_id,
        )

    def loop() -> int:  # per-request loop: one generate call per sample
        loop_tokens = 0
        for ids in encoded:
            input_ids = torch.tensor([ids], device=device)
            for _ in range(args.baseline_samples):
                out = hf_sample(input_ids, 1)
                completion = out[0, input_ids.shape[1] :]
                # a single row stops at its first EOS (included): no padding to discount
                loop_tokens += len(completion)
        return loop_tokens

    def hf_generate() -> int:  # HF generate with num_return_sequences (batched per prompt)
        hf_tokens = 0
        for ids in encoded:
            input_ids = torch.tensor([ids], device=device)
            out = hf_sample(input_ids, args.samples)
            completion = out[:, input_ids.shape[1] :]
            # count up to and including the first EOS (the rest is padding)
            eos = torch.tensor(sampler.eos_ids, device=device)
            is_eos = torch.isin(completion, eos)
            ended = is_eos.int().cumsum(-1)
            hf_tokens += int(((ended == 0) | ((ended == 1) & is_eos)).sum())
        return hf_tokens

    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def matmul_floor() -> int:  # the linear layers alone, for the sampler's mean live rows, as many steps
        rows = max(1, round(shape["tokens"] / max(1, shape["steps"])))
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=dtype) for w in linears}
        with torch.inference_mode():
            for _ in range(shape["steps"]):
                for w in linears:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)
        return rows * shape["steps"]

    contestants = {"batched": batched, "loop": loop, "generate": hf_generate}
    if args.compare_cache:
        contestants["dynamic"] = batched_dynamic
    if device.type == "cpu":
        contestants["floor"] = matmul_floor
    totals = {name: [0, 0.0] for name in contestants}  # tokens, seconds
    per_round = []
    for _ in range(args.rounds):
        rates = {}
        for name, run in contestants.items():
            sync()
            start = time.perf_counter()
            count = run()
            sync()
            seconds = time.perf_counter() - start
            totals[name][0] += count
            totals[name][1] += seconds
            rates[name] = count / seconds
        per_round.append(rates)
    (tokens, batched_s), (loop_tokens, loop_s), (hf_tokens, hf_s) = list(totals.values())[:3]
    batched_rate, loop_rate, hf_rate = tokens / batched_s, loop_tokens / loop_s, hf_tokens / hf_s
    steps, rows_tokens = shape["steps"], shape["rows_tokens"]  # of the last round's batched run

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.model} ({params / 1e6:.2f} M parameters, {dtype}), device: {device}"
        f"{'' if device.type == 'cuda' else f', {args.threads} CPU thread(s)'}; {args.rounds} round(s); "
        f"torch {torch.__version__}"
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
    for i, rates in enumerate(per_round, 1):
        floor = f", {rates['batched'] / rates['floor']:.1%} of the matmul floor" if "floor" in rates else ""
        if "dynamic" in rates:
            floor += f"; preallocated / dynamic cache {rates['batched'] / rates['dynamic']:.2f}x"
        print(
            f"  round {i}: {rates['batched']:.1f} / {rates['loop']:.1f} / {rates['generate']:.1f} tokens/s: "
            f"{rates['batched'] / rates['loop']:.1f}x loop, {rates['batched'] / rates['generate']:.2f}x generate{floor}"
        )
    if "dynamic" in totals:
        dynamic_tokens, dynamic_s = totals["dynamic"]
        print(
            f"sampler with transformers' DynamicCache: {dynamic_tokens:6d} tokens in {dynamic_s:7.2f} s = "
            f"{dynamic_tokens / dynamic_s:9.1f} tokens/s; the preallocated cache is "
            f"{batched_rate / (dynamic_tokens / dynamic_s):.2f}x"
        )
    if "floor" in totals:
        floor_tokens, floor_s = totals["floor"]
        print(
            f"CPU compute floor: the {len(linears)} linear layers alone (LM head included) at "
            f"{round(shape['tokens'] / max(1, steps))} rows, {steps} steps: {floor_tokens / floor_s:9.1f} tokens/s; the "
            f"sampler reached {batched_rate / (floor_tokens / floor_s):.1%} of it (the rest: attention, norms, "
            "rotary, the KV cache, sampling, Python)"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        positions, sample_range = next(
            iter(plan_batches([len(e) for e in encoded], args.samples, args.batch_size))
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sampler.sample([encoded[i] for i in positions], [seeds[i] for i in positions], sample_range)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    load_after = os.getloadavg()
    print(
        f"load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
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
