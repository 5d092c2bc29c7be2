"""Binary verifiers usable directly as TRL reward functions (installed as `filtered_rl.verifiers`).

Every verifier is a callable object `reward(prompts, completions, **columns) -> list[float | None]`:
1.0 valid, 0.0 invalid, None where the gold itself is unusable (TRL then ignores that reward).
"""

from .base import BinaryVerifier, completion_to_text

__all__ = ["BinaryVerifier", "completion_to_text"]
