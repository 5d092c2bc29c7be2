"""Every Python block of the README runs, as a user would paste it, on the cached test model.

Each block runs in its own interpreter (a fresh registry, cwd in a temporary directory, so `runs/` lands
there) with two changes, both stated here: `load_or_pretrain(...)` returns the session's cached nano
model instead of pretraining the full one (~2 min), and every `max_steps=N` becomes `max_steps=2`. After
a block that built a `trainer`, the run must have taken its optimizer steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

PRELUDE = """
import os, pathlib, torch
torch.set_num_threads(1)
import filtered_rl.synthetic.base_model as _base_model
_base_model.load_or_pretrain = lambda *args, **kwargs: pathlib.Path(os.environ["README_TEST_MODEL"])
"""
EPILOGUE = """
if "trainer" in globals():
    assert trainer.state.global_step == 2, trainer.state.global_step
    print("README-TRAINED", trainer.state.global_step)
"""

# What some blocks must print (beyond running): the values their comments promise.
EXPECTED_OUTPUT = {
    "CodeVerifier, MathVerifier": lambda out: out.count("[1.0]") == 2,
    'get_task("countdown")': lambda out: (
        "('countdown', 'countdown_hard', 'subset_sum')" in out and "True True" in out
    ),
    "ALGORITHMS,": lambda out: "'mara'" in out and "'forward_kl'" in out,
    'register_algorithm("verdict_loo"': lambda out: "VerdictLeaveOneOutTrainer" in out,
}


def readme_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_every_expectation_meets_one():
    blocks = readme_blocks()
    assert len(blocks) >= 6
    for marker in EXPECTED_OUTPUT:
        assert any(marker in block for block in blocks), f"no README block contains {marker!r}"
    leftovers = re.findall(r"^[A-Z][A-Z0-9_]{5,}$", README.read_text(encoding="utf-8"), re.M)
    assert not leftovers, f"unfilled placeholders in the README: {leftovers}"


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs(index, nano_model_dir, tmp_path):
    block = readme_blocks()[index]
    code = PRELUDE + re.sub(r"max_steps=\d+", "max_steps=2", block) + EPILOGUE
    env = {
        **os.environ,
        "README_TEST_MODEL": str(nano_model_dir),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert result.returncode == 0, f"README block {index}:\n{block}\n--- stderr:\n{result.stderr[-3000:]}"
    if "trainer = " in block:
        assert "README-TRAINED 2" in result.stdout
    for marker, check in EXPECTED_OUTPUT.items():
        if marker in block:
            assert check(result.stdout), f"README block {index} printed:\n{result.stdout[-2000:]}"
