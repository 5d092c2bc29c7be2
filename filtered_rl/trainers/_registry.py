"""The algorithm registry: each trainable algorithm is one entry, registered by its own module."""

from __future__ import annotations

from dataclasses import dataclass

from filtered_rl.registry import Registry


@dataclass(frozen=True)
class Algorithm:
    """What the recipe, the `filtered-rl train` command and the frontier need to run an algorithm.

    `accepts_controller`: the β-from-μ callback (`target_validity` in a recipe) may drive its `beta`.
    """

    name: str
    summary: str
    trainer_class: type
    config_class: type
    accepts_controller: bool = False


ALGORITHMS: Registry[Algorithm] = Registry("algorithm", discover="filtered_rl.trainers")


def register_algorithm(
    name: str, config_class: type, summary: str, accepts_controller: bool = False
):  # -> decorator of the trainer class
    """Class decorator: register the decorated trainer as algorithm `name` with its config dataclass."""

    def add(trainer_class: type) -> type:
        ALGORITHMS.register(name, Algorithm(name, summary, trainer_class, config_class, accepts_controller))
        return trainer_class

    return add
