"""Binary verifiers usable directly as TRL reward functions (installed as `filtered_rl.verifiers`).

Every verifier is a callable object `reward(prompts, completions, **columns) -> list[float | None]`:
1.0 valid, 0.0 invalid, None where the gold itself is unusable (TRL then ignores that reward).
Importing this package loads neither sympy nor math-verify: the math verifier does its parsing in
helper processes, so a pathological answer cannot hang the trainer. `make_verifier("math", ...)` builds
one by its name in `VERIFIERS`.
"""

from ._registry import VERIFIERS, make_verifier, register_verifier
from .base import BinaryVerifier, completion_to_text
from .code import CodeVerifier, extract_code
from .math import MathVerifier, extract_gold, extract_prediction, verify_math
from .sandbox import ExecutionResult, SandboxLimits, SandboxPool, run_code

__all__ = [
    "BinaryVerifier",
    "CodeVerifier",
    "ExecutionResult",
    "MathVerifier",
    "SandboxLimits",
    "SandboxPool",
    "VERIFIERS",
    "completion_to_text",
    "extract_code",
    "extract_gold",
    "extract_prediction",
    "make_verifier",
    "register_verifier",
    "run_code",
    "verify_math",
]
