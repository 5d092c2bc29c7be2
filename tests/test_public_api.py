"""The public API: every exported name resolves, and `import filtered_rl` stays cheap (no torch, no TRL)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import filtered_rl


def test_import_is_cheap_and_names_resolve_lazily():
    code = (
        "import sys, filtered_rl\n"
        "from filtered_rl import pass_at_k\n"
        "assert 'torch' not in sys.modules and 'trl' not in sys.modules, sorted(m for m in sys.modules if m in ('torch', 'trl'))\n"
        "from filtered_rl.evaluation import pass_at_k as p2\n"
        "assert p2 is pass_at_k and 'torch' not in sys.modules\n"
        "print(pass_at_k(4, 1, 2))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(0.5)


@pytest.mark.parametrize("name", [n for n in filtered_rl.__all__ if n != "__version__"])
def test_every_public_name_resolves(name):
    assert name in filtered_rl._EXPORTS
    value = getattr(filtered_rl, name)
    assert value is not None and name in dir(filtered_rl)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'FilteredTrainer'"):
        filtered_rl.FilteredTrainer  # noqa: B018


def test_readme_import_line_works():
    from filtered_rl import (  # noqa: F401
        BetaFromValidityCallback,
        FilteredGRPOConfig,
        FilteredGRPOTrainer,
        MathVerifier,
        end_run,
        load_task,
    )
    from filtered_rl.trainers import ALGORITHMS

    assert FilteredGRPOTrainer is ALGORITHMS["filtered"].trainer_class
    assert FilteredGRPOConfig is ALGORITHMS["filtered"].config_class


def test_the_product_never_imports_the_demo():
    """Importing every product module (all but filtered_rl.synthetic) loads nothing of the synthetic demo."""
    code = (
        "import sys, importlib, pathlib, filtered_rl\n"
        "root = pathlib.Path(filtered_rl.__file__).parent\n"
        "files = [p.relative_to(root.parent).with_suffix('') for p in root.rglob('*.py')]\n"
        "names = sorted('.'.join(f.parts[:-1] if f.name == '__init__' else f.parts) for f in files\n"
        "               if 'synthetic' not in f.parts)\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('filtered_rl.synthetic'))\n"
        "assert not loaded, loaded\n"
        "print(len(names))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) > 20  # the walk found the product's modules
