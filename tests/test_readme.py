"""Every Python block of the README and of the docs/ pages runs, as a user would paste it, on the cached test model.

The README is the front door; its reference sections live in docs/ (training, controller, verifiers,
synthetic tasks, development, ...), and their blocks run here exactly as the README's do. Every relative
link of the README and of docs/ must reach an existing file and, with a `#anchor`, an existing heading.

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

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")

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


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def readme_blocks() -> list[tuple[str, str]]:
    """(document, block) for every Python block of the README and of every docs/ page, in order."""
    return [
        (_name(doc), block) for doc in DOCUMENTS for block in BLOCK.findall(doc.read_text(encoding="utf-8"))
    ]


def test_the_readme_has_python_blocks_and_every_expectation_meets_one():
    blocks = readme_blocks()
    assert len(blocks) >= 6
    readme = [block for doc, block in blocks if doc == "README.md"]
    assert any("FilteredGRPOTrainer(" in block and "trainer = " in block for block in readme), (
        "the README lost its drop-in trainer example"
    )
    for marker in EXPECTED_OUTPUT:
        assert any(marker in block for _, block in blocks), f"no README or docs/ block contains {marker!r}"
    for doc in DOCUMENTS:
        leftovers = re.findall(r"^[A-Z][A-Z0-9_]{5,}$", doc.read_text(encoding="utf-8"), re.M)
        assert not leftovers, f"unfilled placeholders in {_name(doc)}: {leftovers}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_name)
def test_every_relative_link_reaches_a_file_and_heading(doc: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"{_name(doc)}: broken links {broken}"


def _block_ids() -> list[str]:
    blocks, ids = readme_blocks(), []
    for index, (doc, _) in enumerate(blocks):
        ids.append(f"{doc}-{sum(d == doc for d, _ in blocks[:index])}")
    return ids


@pytest.mark.parametrize("index", range(len(readme_blocks())), ids=_block_ids())
def test_readme_block_runs(index, nano_model_dir, tmp_path):
    doc, block = readme_blocks()[index]
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
    assert result.returncode == 0, f"{doc} block {index}:\n{block}\n--- stderr:\n{result.stderr[-3000:]}"
    if "trainer = " in block:
        assert "README-TRAINED 2" in result.stdout
    for marker, check in EXPECTED_OUTPUT.items():
        if marker in block:
            assert check(result.stdout), f"{doc} block {index} printed:\n{result.stdout[-2000:]}"
