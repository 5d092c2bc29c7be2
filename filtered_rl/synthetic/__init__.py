"""The synthetic demo: tasks whose base model the project pretrains itself, and the experiments on them.

Apart from the product (trainers, divergences, control, verifiers, evaluation), which never imports it.
"""
