"""The math verifier: extraction, the TRL reward contract, thread safety, bounded time, and real data."""

from __future__ import annotations

import json
import pickle
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from _launch import alive

import filtered_rl.verifiers.math as math_module
from filtered_rl.verifiers.math import MathVerifier, extract_gold, extract_prediction, verify_math
from filtered_rl.verifiers.pool import WorkerPool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATHOLOGICAL = [
    r"\boxed{10^{10^{10^{10}}}}",
    "The answer is 10^10^10^10",
    r"\boxed{9999999!}",
    r"\boxed{(10^{9})!}",
    r"\boxed{3^{3^{20}}-5}",
    r"\boxed{" + r"\frac{1}{" * 60 + "2" + "}" * 60 + "}",
]


HUGE = r"\boxed{10^{10^{10^{10^{10}}}}}"


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier(timeout=5.0, workers=2)


@contextmanager
def counted_requests():
    """The completion texts the math helpers are asked to judge while the block runs."""
    sent: list[str] = []
    original = WorkerPool.map

    def counting(pool, requests, deadline_s):
        sent.extend(r["pred"] for r in requests)
        return original(pool, requests, deadline_s)

    WorkerPool.map = counting
    try:
        yield sent
    finally:
        WorkerPool.map = original


def load_jsonl(relative: str) -> list[dict]:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ extraction


def test_gold_extraction_styles():
    assert extract_gold("She sells 3 + 4 = <<3+4=7>>7.\n#### 1,234")[0] == 1234
    assert str(extract_gold(r"\frac{3}{4}")[0]) == "3/4"  # MATH-500 `answer` field
    assert extract_gold(r"So $x = \boxed{5}$ and we are done.")[0] == 5  # full solution
    assert extract_gold("42", style="gsm8k") == []  # gsm8k style needs ####
    assert extract_gold("") == [] and extract_gold(None) == []
    with pytest.raises(ValueError, match="gold_style"):
        extract_gold("1", style="latex-ish")


def test_prediction_prefers_last_box_then_hashes_then_anchors():
    assert extract_prediction(r"First \boxed{\frac{1}{2}}, no wait: \boxed{3}.")[0] == 3
    assert str(extract_prediction(r"\boxed{\frac{\sqrt{2}}{2}}")[0]) == "sqrt(2)/2"
    assert extract_prediction("Reasoning 5 + 6 = 11\n#### 1,001")[0] == 1001
    assert extract_prediction("The answer is 42. Note that 43 would be wrong.")[0] == 42
    assert extract_prediction("3 apples and then 17 pears")[0] == 17
    assert extract_prediction("no numbers here") == []


def test_verify_is_gold_first_and_semantic():
    assert verify_math(r"so \boxed{0.5}", r"\frac{1}{2}")
    assert verify_math(r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)")
    assert verify_math("The answer is 18.", "Janet makes 9 * 2 = 18.\n#### 18")
    assert not verify_math("The answer is 19.", "#### 18")
    assert not verify_math("I do not know.", "#### 18")


# ------------------------------------------------------------------ reward contract


def test_reward_function_contract(verifier):
    assert verifier.__name__ == "math"
    rewards = verifier(
        prompts=["q"] * 5,
        completions=[
            r"\boxed{18}",
            [{"role": "assistant", "content": "Total: 18.\n#### 18"}],
            "The answer is 17",
            "The answer is 4",
            "The answer is 4",
        ],
        completion_ids=[[1]] * 5,
        answer=["#### 18"] * 3 + ["", None],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
    )
    assert rewards == [1.0, 1.0, 0.0, None, None]
    custom = MathVerifier(gold_column="solution", workers=2)
    assert custom(prompts=["q"], completions=[r"\boxed{7}"], solution=[r"so \boxed{7}"]) == [1.0]
    with pytest.raises(KeyError, match="gold_column"):
        custom(prompts=["q"], completions=["1"], answer=["1"])
    with pytest.raises(ValueError, match="gold_style"):
        MathVerifier(gold_style="nope")


def test_answer_key_equal_for_equivalent_answers(verifier):
    keys = verifier.answer_keys(
        [r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", "so it is 1/2", r"\boxed{\frac{1}{3}}", "nothing"]
    )
    assert keys[0] == keys[1] == keys[2] == "1/2"
    assert keys[3] != keys[0] and keys[4] is None
    assert verifier.answer_key(r"\boxed{x+1}", {}) == verifier.answer_key(r"\boxed{1 + x}", {})
    # Keys of scored completions are kept, so an evaluation loop's per-sample answer_key is free.
    assert verifier(prompts=["q"], completions=[r"so \boxed{0.25}"], answer=[r"\frac{1}{4}"]) == [1.0]
    with counted_requests() as sent:
        assert verifier.answer_key(r"so \boxed{0.25}", {}) == "1/4"
    assert sent == []


# ------------------------------------------------------------------ threads and pathological input


def test_safe_from_worker_threads(verifier):
    cases = [(rf"\boxed{{{n}}}", f"#### {n}", 1.0) for n in range(8)] + [
        (rf"\boxed{{{n + 1}}}", f"#### {n}", 0.0) for n in range(8)
    ]

    def one(case):
        completion, gold, expected = case
        return verifier(prompts=["q"], completions=[completion], answer=[gold])[0] == expected

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, cases))
    # The in-process helpers also work off the main thread (math-verify's alarm is skipped there).
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(gold=extract_gold(r"\frac{1}{2}"), pred=extract_prediction(r"\boxed{2}"))
    )
    thread.start()
    thread.join()
    assert str(out["gold"][0]) == "1/2" and out["pred"][0] == 2


def test_pathological_inputs_are_bounded_from_a_thread():
    verifier = MathVerifier(timeout=2.0, workers=2)
    out = {}

    def run():
        started = time.monotonic()
        out["rewards"] = verifier(
            prompts=["q"] * len(PATHOLOGICAL), completions=PATHOLOGICAL, answer=["#### 5"] * len(PATHOLOGICAL)
        )
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the verifier hung on a pathological input"
    assert out["rewards"] == [0.0] * len(PATHOLOGICAL)
    # Two helpers, each item bounded by ~timeout (+ restart of a killed helper): far below a hang.
    assert out["seconds"] < 2.0 * len(PATHOLOGICAL) + 15
    assert verifier(prompts=["q"], completions=[r"\boxed{5}"], answer=["#### 5"]) == [1.0]


def test_hard_deadline_kills_a_stuck_helper_and_recovers(monkeypatch):
    """Work that ignores the helper's own timer (stuck in C code) is stopped by the pool's deadline.
    Giving the helper a timer past the deadline makes any slow answer such work."""
    monkeypatch.setattr(math_module, "HELPER_TIME_SHARE", 20.0)
    verifier = MathVerifier(timeout=0.6, workers=1)
    assert verifier(prompts=["q"], completions=[r"\boxed{5}"], answer=["#### 5"]) == [1.0]  # warm
    helpers = math_module._pool(verifier.workers, verifier.memory_bytes)
    before = helpers.pids()
    started = time.monotonic()
    assert verifier(prompts=["q"], completions=[r"\boxed{10^{10^{10^{10}}}}"], answer=["#### 5"]) == [0.0]
    assert time.monotonic() - started < 3.0
    assert len(before) == 1 and before[0] not in helpers.pids()
    deadline = time.monotonic() + 5
    while alive(before[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(before[0]), "the helper that missed its deadline is still computing"
    assert verifier(prompts=["q"], completions=[r"\boxed{5}"], answer=["#### 5"]) == [1.0]  # a fresh helper


def test_a_slow_answer_is_cut_by_the_helper_itself_within_the_timeout():
    """One timer bounds the whole judgement (not math-verify's whole-second alarm per parse call, which
    it swallows): the helper answers before the pool's deadline and is not replaced."""
    verifier = MathVerifier(timeout=2.0, workers=1)
    assert verifier.verify(r"\boxed{5}", "#### 5")  # warm
    helpers = math_module._pool(verifier.workers, verifier.memory_bytes)
    before = helpers.pids()
    started = time.monotonic()
    assert verifier(prompts=["q"], completions=[HUGE], answer=["#### 5"]) == [0.0]
    assert time.monotonic() - started < 1.6 * verifier.timeout + 1.0
    assert helpers.pids() == before, "the helper was killed instead of stopping the judgement itself"
    assert verifier.verify(r"\boxed{5}", "#### 5")


def test_a_verdict_is_computed_once_per_completion_and_gold():
    """An evaluation loop scores a batch, then asks each sample's answer key: an answer that ran out of
    time must not cost its timeout again. Repeats within a batch are judged once too."""
    verifier = MathVerifier(timeout=2.0, workers=2)
    batch = [HUGE, r"\boxed{5}", HUGE, r"\boxed{6}"]
    row = {"answer": "#### 5"}
    with counted_requests() as sent:
        assert verifier(prompts=["q"] * 4, completions=batch, answer=["#### 5"] * 4) == [0.0, 1.0, 0.0, 0.0]
        assert sorted(sent) == sorted({HUGE, r"\boxed{5}", r"\boxed{6}"})
        assert [verifier.answer_key(text, row) for text in batch] == [None, "5", None, "6"]
        assert verifier.answer_keys(batch) == [None, "5", None, "6"]
        assert verifier.score(HUGE, "#### 5", row) == 0.0 and not verifier.verify(HUGE, "#### 5")
        assert len(sent) == 3, sent  # nothing was judged again (the request count, not a clock)
        assert verifier(prompts=["q"], completions=[HUGE], answer=["#### 7"]) == [0.0]  # another gold
        assert len(sent) == 4


def test_the_verdict_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(MathVerifier, "cache_size", 4)
    verifier = MathVerifier(workers=2)
    texts = [rf"\boxed{{{n}}}" for n in range(10)]
    assert verifier(prompts=None, completions=texts, answer=["#### 3"] * 10) == [
        float(n == 3) for n in range(10)
    ]
    assert len(verifier._cache) <= 4
    assert verifier.answer_keys(texts) == [str(n) for n in range(10)]  # forgotten ones are recomputed
    copy = pickle.loads(pickle.dumps(verifier))  # e.g. sent to a data-loader process: the cache stays
    assert len(copy._cache) == 0 and copy.verify(r"\boxed{3}", "#### 3")


# ------------------------------------------------------------------ real data


def gsm8k_cases(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(completion, gold, variant): the gold solution as written, and with its last line rephrased."""
    cases = []
    for row in rows:
        body, _, number = row["answer"].rpartition("####")
        number = number.strip()
        cases += [
            (row["answer"], row["answer"], "####"),
            (f"{body}The answer is {number}.", row["answer"], "text"),
            (f"{body}So the answer is $\\boxed{{{number}}}$.", row["answer"], "boxed"),
        ]
    return cases


def perturbations(answer: str) -> list[str]:
    """Wrong answers: off by one, wrong sign, swapped fraction (for integer and simple fraction answers)."""
    answer = answer.strip().replace(",", "")
    wrong = []
    if re.fullmatch(r"-?\d+", answer):
        n = int(answer)
        wrong += [str(n + 1)] + ([str(-n)] if n else [])
    fraction = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", answer)
    if fraction and fraction.group(2) != fraction.group(3):
        sign, num, den = fraction.groups()
        wrong += [rf"{sign}\frac{{{den}}}{{{num}}}", rf"{'' if sign else '-'}\frac{{{num}}}{{{den}}}"]
    return wrong


def check_real_data(gsm: list[dict], math500: list[dict]) -> None:
    verifier = MathVerifier(timeout=10.0)
    cases = gsm8k_cases(gsm) + [(row["solution"], row["answer"], "math500") for row in math500]
    rewards = verifier(prompts=None, completions=[c[0] for c in cases], answer=[c[1] for c in cases])
    exceptions = [
        (variant, gold[-40:], completion[-80:])
        for (completion, gold, variant), r in zip(cases, rewards)
        if r != 1.0
    ]
    rate = 1 - len(exceptions) / len(cases)
    print(
        f"gold solutions judged valid: {len(cases) - len(exceptions)}/{len(cases)} ({rate:.2%}); "
        f"exceptions: {exceptions}"
    )
    assert rate >= 0.995, exceptions

    golds = [row["answer"].rpartition("####")[2] for row in gsm] + [row["answer"] for row in math500]
    full_golds = [row["answer"] for row in gsm] + [row["answer"] for row in math500]
    wrong = [
        (rf"The answer is $\boxed{{{w}}}$.", full)
        for g, full in zip(golds, full_golds)
        for w in perturbations(g)
    ]
    rewards = verifier(prompts=None, completions=[w[0] for w in wrong], answer=[w[1] for w in wrong])
    accepted = [w for w, r in zip(wrong, rewards) if r != 0.0]
    print(
        f"perturbed answers judged invalid: {len(wrong) - len(accepted)}/{len(wrong)}; accepted: {accepted}"
    )
    assert len(wrong) > len(golds) and accepted == []


def test_real_data_sample():
    """Every 10th GSM8K test problem and every 5th MATH-500 problem (all of them: the slow test)."""
    check_real_data(load_jsonl("gsm8k/test.jsonl")[::10], load_jsonl("math500/test.jsonl")[::5])


@pytest.mark.slow
def test_real_data_full():
    check_real_data(load_jsonl("gsm8k/test.jsonl"), load_jsonl("math500/test.jsonl"))


# ------------------------------------------------------------------ packaging


def test_the_latex_parser_runtime_is_pinned_without_extras():
    """math-verify's LaTeX parser needs the ANTLR runtime it was generated for. pyproject.toml names that
    runtime directly instead of asking math-verify for an extra: its `antlr4-13-2` extra forwards to
    `latex2sympy2_extended[antlr4_13_2]`, which pip 23.2 fails to match and warns "does not provide the
    extra" at every install. No extra means no such warning, whatever pip the user has."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(line).name.lower(): Requirement(line) for line in project["dependencies"]}
    assert not requirements["math-verify"].extras, "ask math-verify for no extra (pip < 23.3 warns about it)"
    antlr = requirements["antlr4-python3-runtime"]
    assert antlr.specifier.contains(version("antlr4-python3-runtime")), "reinstall: the ANTLR runtime drifted"
    # The pinned runtime really parses LaTeX (a wrong runtime raises or returns nothing here).
    assert str(extract_prediction(r"\boxed{\frac{\sqrt{2}}{2}}")[0]) == "sqrt(2)/2"
