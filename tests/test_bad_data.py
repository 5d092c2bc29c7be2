"""Bad data and bad inputs get clear errors naming the file, line, row or flag (issue #22, item 10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest




def test_run_code_accepts_tests_as_a_list_of_statements() -> None:
    from filtered_rl.verifiers.sandbox import SandboxPool, run_code

    pool = SandboxPool(workers=1)
    try:
        program = "def add(a, b):\n    return a + b\n"
        assert run_code(program, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], pool=pool).passed
        assert not run_code(program, ("assert add(1, 2) == 3", "assert add(1, 1) == 3"), pool=pool).passed
        results = pool.run_many([(program, ["assert add(2, 2) == 4"]), (program, "assert add(2, 2) == 5")])
        assert [r.passed for r in results] == [True, False]
    finally:
        pool.close()
