"""Trainers of the post-scoring family, one algorithm a file, registered in `ALGORITHMS`.

`PostScoringTrainer` (in `_base`) is the base: an objective supplies advantages from a scored batch.
Importing this package imports no trainer module; `ALGORITHMS` discovers them on first lookup.
"""

from filtered_rl.trainers._registry import ALGORITHMS, Algorithm, register_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "register_algorithm"]
