"""Evaluation tool: task loading, the sampler, resume, data parallelism, the summary and the plot."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from _launch import free_port, run_launch
from _tiny_model import save_tiny_model

from filtered_rl.data import CODE_SYSTEM_PROMPT, MATH_SYSTEM_PROMPT, build_prompt, load_task, render_prompt
from filtered_rl.evaluation.generate import HFSampler, _filter_top_p, sample_seed, sequence_logprobs
from filtered_rl.evaluation.runner import EvalConfig, plan_batches, prompt_seed, run_eval

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 with the project's character tokenizer (validity ~0, fast)."""
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-model"),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=256,
        max_new_tokens=6,
    )


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _logprob_t1(model, prompt, completion):
    with torch.no_grad():
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1 :].sum().item()


def _without_run(summary):
    return {k: v for k, v in summary.items() if k != "run"}


# Floats computed by another process, thread count or torch build differ in the last digits (a log-prob
# differed in the 8th digit between 1 and 2 processes with torch 2.14.1): they are compared to this
# tolerance, everything else (completions, verdicts, answer keys, token counts) exactly.
FLOAT_TOLERANCE = {"rel": 1e-5, "abs": 1e-6}


def assert_same_results(actual, expected, where="result"):
    """Equal JSON trees: the same keys, lengths, strings, ints and booleans; floats to FLOAT_TOLERANCE."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same_results(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_results(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), where
        assert actual == pytest.approx(expected, nan_ok=True, **FLOAT_TOLERANCE), where
    else:
        assert type(actual) is type(expected) and actual == expected, where


def _exact_fields(records):
    """What must not differ at all between two runs of the same samples: which sample, its text, its verdict."""
    return [
        (r["prompt_id"], r["sample_index"], r["completion"], r["verdict"], r["answer_key"], r["num_tokens"])
        for r in records
    ]


def test_assert_same_results_tolerates_last_digits_only():
    row = {"completion": "3*8", "verdict": 1.0, "logprob": -33.49458408355713, "tokens": [1, 2]}
    assert_same_results({**row, "logprob": -33.49458360671997}, row)  # the 8th digit (1 vs 2 processes)
    for changed in ({"logprob": -33.4}, {"completion": "8*3"}, {"verdict": 0.0}, {"tokens": [1, 3]}):
        with pytest.raises(AssertionError):
            assert_same_results({**row, **changed}, row)
    with pytest.raises(AssertionError):
        assert_same_results({**row, "extra": 1}, row)


# --- batching and sampling ---------------------------------------------------------------------------


def test_plan_batches_groups_similar_lengths_and_splits_large_n():
    batches = plan_batches([3, 9, 5, 9, 1], num_samples=4, batch_size=8)
    assert batches == [([1, 3], range(4)), ([2, 0], range(4)), ([4], range(4))]
    big = plan_batches([2, 7], num_samples=10, batch_size=4)
    assert big == [
        ([1], range(0, 4)),
        ([1], range(4, 8)),
        ([1], range(8, 10)),
        ([0], range(0, 4)),
        ([0], range(4, 8)),
        ([0], range(8, 10)),
    ]


def test_sample_seeds_differ():
    seeds = {sample_seed(0, p, s) for p in range(20) for s in range(20)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)
    assert prompt_seed("a") != prompt_seed("b")


def test_top_p_keeps_the_smallest_set_reaching_p():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _filter_top_p(logp, 0.8).exp()
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    kept = _filter_top_p(logp, 0.81).exp()
    assert (kept > 0).sum() == 3


def test_samples_do_not_depend_on_the_batch_and_logprobs_match_the_model(tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir)
    sampler = HFSampler(model, tokenizer, temperature=0.9, top_p=1.0, max_new_tokens=10, seed=3)
    a = tokenizer("make 24 with 3 5 7 9:")["input_ids"]
    b = tokenizer("make 7 with 1 2:")["input_ids"]
    together = sampler.sample([a, b], [11, 22], range(4))
    alone = sampler.sample([b], [22], range(2, 4))[0]
    assert [s.token_ids for s in together[1][2:]] == [s.token_ids for s in alone]
    assert len({tuple(s.token_ids) for s in together[0]}) > 1  # different samples per index
    # log π(y|x) of the sampler = teacher-forced log-probs of the same tokens at the same temperature
    flat = [(a, s) for s in together[0]] + [(b, s) for s in together[1]]
    with torch.no_grad():
        for prompt, s in flat:
            ids = torch.tensor([prompt + s.token_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1] / 0.9, dim=-1)
            target = ids[0, 1:]
            expected = logp.gather(-1, target[:, None]).squeeze(-1)[len(prompt) - 1 :].sum().item()
            assert s.logprob == pytest.approx(expected, abs=1e-3)
    assert sequence_logprobs(model, tokenizer, [a], [together[0][0].token_ids])[0] == pytest.approx(
        _logprob_t1(model, a, together[0][0].token_ids), abs=1e-4
    )
    flat = [s for _, s in flat]
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in flat if not s.finished]
    assert texts == [s.text for s in flat if not s.finished]


def test_the_preallocated_kv_cache_samples_exactly_what_the_dynamic_cache_samples(tiny_model_dir):
    """The sampler's preallocated KV cache (in-place writes, views of the filled part) against transformers'
    DynamicCache: the same tokens and bit-identical log-probs, with left padding and rows dropped as they
    finish (a third of the vocabulary made to end a sample, so rows drop at many steps)."""
    model, tokenizer = _load(tiny_model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("make 24 with 3 5 7 9:", "make 7 with 1 2:", "9:")]
    results = []
    for preallocate in (True, False):
        sampler = HFSampler(
            model, tokenizer, temperature=1.0, max_new_tokens=12, seed=5, preallocate_cache=preallocate
        )
        sampler.eos_ids = list(range(0, len(tokenizer), 3))
        results.append([s for group in sampler.sample(prompts, [1, 2, 3], range(6)) for s in group])
    fast, dynamic = results
    assert [(s.token_ids, s.logprob, s.finished) for s in fast] == [
        (s.token_ids, s.logprob, s.finished) for s in dynamic
    ]
    lengths = {s.num_tokens for s in fast}
    assert any(s.finished for s in fast) and len(lengths) > 2  # rows dropped at several steps


# --- tasks --------------------------------------------------------------------------------------------


def _reference_completion(name, row):
    """A correct completion built from the dataset's own solution."""
    if name in ("gsm8k", "math500"):
        return f"So the answer is \\boxed{{{row['answer']}}}."
    if name == "humaneval":
        return row["canonical_solution"]  # the body: the verifier prepends the code prompt
    return f"Here it is:\n```python\n{row['code']}\n```"


@pytest.mark.parametrize("name", ["gsm8k", "math500", "humaneval", "mbpp"])
def test_builtin_tasks_load_from_local_files_and_verify_their_solutions(name):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"no local copy of {name} at {folder}")
    task = load_task(name, data_files=folder, limit=3)
    assert len(task.dataset) == 3
    assert len(set(task.dataset["prompt_id"])) == 3
    rows = task.dataset.to_list()
    prompt = rows[0]["prompt"]
    assert prompt[0] == {
        "role": "system",
        "content": MATH_SYSTEM_PROMPT if task.kind == "math" else CODE_SYSTEM_PROMPT,
    }
    assert prompt[1]["role"] == "user" and len(prompt[1]["content"]) > 20
    if name == "gsm8k":
        assert rows[0]["answer"] == "18"  # "... #### 18" → the final number
    if name == "mbpp":  # the released file holds all splits; "test" is task_id 11-510, as on the hub
        assert len(load_task(name, data_files=folder).dataset) == 257 and rows[0]["prompt_id"] == "mbpp-11"
    # the verifier, called as TRL calls it, accepts the reference solutions and rejects a wrong answer
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    good = [_reference_completion(name, r) for r in rows]
    assert task.verifier(prompts=[r["prompt"] for r in rows], completions=good, **columns) == [1.0] * 3
    bad = ["\\boxed{-987654}" if task.kind == "math" else "```python\nraise SystemExit(1)\n```"] * 3
    assert task.verifier(prompts=[r["prompt"] for r in rows], completions=bad, **columns) == [0.0] * 3
    plain = load_task(name, data_files=folder, limit=1, conversational=False, system_prompt=None)
    expected = plain.dataset[0]["code_prompt"] if name == "humaneval" else prompt[1]["content"]
    assert isinstance(plain.dataset[0]["prompt"], str) and plain.dataset[0]["prompt"] == expected


def test_countdown_task_and_valid_answers():
    task = load_task("countdown", limit=4)
    row = task.dataset[0]
    assert task.kind == "countdown" and not task.conversational
    from filtered_rl.synthetic.countdown import make_countdown_dataset

    assert (
        row["prompt"] == make_countdown_dataset(0, 4, seed=0)["test"][0]["prompt"]
    )  # plain text, as generated
    answers = task.valid_answers(row)
    assert len(answers) == row["num_solutions"] >= 4
    answer = sorted(answers)[0]
    assert task.verifier([row["prompt"]], [answer], **{k: [v] for k, v in row.items()}) == [1.0]
    assert task.verifier.answer_key(answer, row) == answer


def test_custom_dataset_with_prompt_column_and_named_verifier(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(5)))
    task = load_task(str(path), prompt_column="q", verifier="countdown", gold_column="answer", limit=2)
    assert task.dataset["prompt"] == ["What is 0+0?", "What is 1+1?"]
    assert task.dataset["prompt_id"] == ["questions-test-0", "questions-test-1"]
    assert task.verifier.gold_column == "answer"
    with pytest.raises(ValueError, match="--prompt-column"):
        load_task(str(path))
    with pytest.raises(ValueError, match="no column 'question'"):
        load_task(str(path), prompt_column="question", verifier="math")
    with pytest.raises(FileNotFoundError, match="--data-files"):
        load_task("gsm8k", data_files=tmp_path)
    with pytest.raises(ValueError, match="unknown verifier 'regex'"):
        load_task(str(path), prompt_column="q", verifier="regex")


def test_prompt_formatting_with_and_without_chat_template(tiny_model_dir):
    _, tokenizer = _load(tiny_model_dir)
    messages = build_prompt("2+2?", "Be brief.", conversational=True)
    text = render_prompt(messages, tokenizer)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        render_prompt(build_prompt("2+2?", "Be brief.", conversational=False), tokenizer)
        == "Be brief.\n\n2+2?\n"
    )
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="--no-chat-template"):
        render_prompt(messages, tokenizer)


# --- runs ---------------------------------------------------------------------------------------------


class _Interrupting:
    """Wraps a sampler; raises KeyboardInterrupt on call number `stop_at` (a kill mid-run)."""

    def __init__(self, sampler, stop_at=None):
        self.sampler, self.stop_at, self.calls = sampler, stop_at, []

    def sample(self, prompt_ids, prompt_seeds, sample_indices):
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        self.calls.append((tuple(prompt_seeds), sample_indices))
        return self.sampler.sample(prompt_ids, prompt_seeds, sample_indices)


def test_resume_after_interrupt_gives_the_same_samples_and_summary(tiny_model_dir, tmp_path):
    model, tokenizer = _load(tiny_model_dir)
    make = lambda: HFSampler(model, tokenizer, temperature=1.0, max_new_tokens=6, seed=0)
    config = lambda out: EvalConfig(
        model=str(tiny_model_dir),
        output_dir=str(out),
        num_prompts=6,
        num_samples=4,
        batch_size=8,
        progress=False,
        bootstrap=200,
    )
    full = _Interrupting(make())
    reference = run_eval(config(tmp_path / "full"), sampler=full)
    assert len(full.calls) == 3

    first = _Interrupting(make(), stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config(tmp_path / "resumed"), sampler=first)
    shard = _lines(tmp_path / "resumed" / "samples.rank0.jsonl")
    assert len(shard) == 16 and not (tmp_path / "resumed" / "summary.json").exists()
    with open(tmp_path / "resumed" / "samples.rank0.jsonl", "a") as handle:
        handle.write('{"prompt_id": "cut sho')  # a line cut by the kill

    second = _Interrupting(make())
    with pytest.warns(RuntimeWarning, match="samples.rank0.jsonl: dropped its last line"):
        resumed = run_eval(config(tmp_path / "resumed"), sampler=second)
    assert len(second.calls) == 1  # only the unfinished batch is redone
    assert_same_results(_without_run(resumed), _without_run(reference))
    assert resumed["run"]["new_samples"] == 8
    lines = _lines(tmp_path / "resumed" / "samples.jsonl")
    assert len(lines) == 24 == len({(r["prompt_id"], r["sample_index"]) for r in lines})
    full_lines = _lines(tmp_path / "full" / "samples.jsonl")
    assert _exact_fields(lines) == _exact_fields(full_lines)
    assert_same_results(lines, full_lines)
    assert not list((tmp_path / "resumed").glob("samples.rank*"))
    # nothing left to do: a third run samples nothing and reproduces the summary
    third = _Interrupting(make())
    assert_same_results(
        _without_run(run_eval(config(tmp_path / "resumed"), sampler=third)), _without_run(reference)
    )
    assert third.calls == []
    with pytest.raises(ValueError, match="temperature: 1.0 → 0.5"):
        run_eval(
            EvalConfig(
                model=str(tiny_model_dir),
                output_dir=str(tmp_path / "resumed"),
                num_prompts=6,
                num_samples=4,
                temperature=0.5,
                progress=False,
            )
        )


def test_cli_eval_then_plot_writes_summary_and_png(tiny_model_dir, tmp_path, capsys):
    from filtered_rl.cli import main

    for seed in (0, 1):
        code = main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                "countdown",
                "--num-prompts",
                "3",
                "--num-samples",
                "4",
                "--k",
                "1",
                "4",
                "--seed",
                str(seed),
                "--max-new-tokens",
                "4",
                "--no-progress",
                "--output-dir",
                str(tmp_path / f"run{seed}"),
            ]
        )
        assert code == 0
    printed = capsys.readouterr().out
    assert "pass@k" in printed and "distinct valid answers" in printed
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert summary["ks"] == [1, 4] and summary["num_prompts"] == 3 and summary["num_samples"] == 4
    assert summary["mean_completion_tokens"] <= 4
    assert len(_lines(tmp_path / "run0" / "samples.jsonl")) == 12
    png = tmp_path / "plots" / "passk.png"
    assert (
        main(
            [
                "plot",
                str(tmp_path / "run0" / "summary.json"),
                str(tmp_path / "run1"),
                "-o",
                str(png),
                "--labels",
                "a",
                "b",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="one label per summary"):
        main(["plot", str(tmp_path / "run0"), "-o", str(png), "--labels", "a", "b"])


def test_two_processes_give_the_same_results_as_one(tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) vs a plain run: the same samples (texts, verdicts
    exactly; log-probs to FLOAT_TOLERANCE, as two processes may round differently) and summary."""
    common = [
        "--model",
        str(tiny_model_dir),
        "--num-prompts",
        "5",
        "--num-samples",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
        "--bootstrap",
        "100",
        "--threads",
        "1",
    ]
    from filtered_rl.cli import main

    assert main(["eval", *common, "--output-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "filtered_rl.cli",
        "eval",
        *common,
        "--output-dir",
        str(tmp_path / "two"),
    ]
    result = run_launch(launch, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["run"]["num_processes"] == 2 and one["run"]["num_processes"] == 1
    assert_same_results(_without_run(two), _without_run(one))
    lines_one, lines_two = (
        _lines(tmp_path / "one" / "samples.jsonl"),
        _lines(tmp_path / "two" / "samples.jsonl"),
    )
    assert len(lines_one) == 20 and _exact_fields(lines_two) == _exact_fields(lines_one)
    assert_same_results(lines_two, lines_one)


def test_nano_model_validity_diversity_coverage_and_kl(nano_model_dir, tmp_path):
    """On the pretrained base model, scored against itself as the base: KL(p*‖a) = −log A exactly
    per prompt (self-normalised weights are then v/Â), and every valid answer key is an enumerated one."""
    from filtered_rl.synthetic.countdown import enumerate_solutions

    config = EvalConfig(
        model=str(nano_model_dir),
        output_dir=str(tmp_path),
        num_prompts=12,
        num_samples=32,
        batch_size=128,
        base_model=str(nano_model_dir),
        progress=False,
        bootstrap=200,
    )
    summary = run_eval(config)
    records = _lines(tmp_path / "samples.jsonl")
    assert 0 < summary["validity"] < 1
    counts = {}
    rows = {r["prompt_id"]: r for r in load_task("countdown", limit=12).dataset}
    for r in records:
        assert r["base_logprob"] == pytest.approx(r["logprob"], abs=1e-3)
        if r["verdict"] == 1.0:
            row = rows[r["prompt_id"]]
            assert r["answer_key"] in enumerate_solutions(row["numbers"], row["target"])
        counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + (r["verdict"] == 1.0)
    kl = summary["kl_pstar_to_policy"]
    expected = [-math.log(c / 32) for c in counts.values() if c]
    assert kl["prompts"] == len(expected)
    assert kl["mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-3)
    assert kl["mean_base_validity_estimate"] == pytest.approx(
        sum(c / 32 for c in counts.values() if c) / len(expected), abs=1e-3
    )
    cov = summary["coverage"]
    assert 0 < cov["fraction_of_valid_answers_hit"] <= 1 and 0 < cov["pstar_mass_hit"] <= 1
    keys = {}
    for r in records:
        if r["verdict"] == 1.0:
            keys.setdefault(r["prompt_id"], set()).add(r["answer_key"])
    assert summary["diversity"]["distinct_valid_answers"] == pytest.approx(sum(map(len, keys.values())) / 12)
    assert summary["diversity"]["prompts_with_valid"] == len(keys) == kl["prompts"]
    assert summary["pass_at_k"]["32"]["mean"] >= summary["pass_at_k"]["1"]["mean"]
