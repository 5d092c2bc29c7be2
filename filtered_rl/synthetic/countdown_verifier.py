"""Old import path of the countdown verifier, kept for existing code: see `filtered_rl.synthetic.tasks.countdown`."""

from filtered_rl.synthetic.tasks.countdown import CountdownVerifier, verify_countdown

__all__ = ["CountdownVerifier", "verify_countdown"]
