"""Experiments: the exact toy and the real-LM frontier."""
