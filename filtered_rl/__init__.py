"""filtered-rl: fine-tune language models toward the *filtered model* p*(y|x) ∝ a(y|x)·v(x, y).

Heavy submodules (trainers, evaluation) are imported lazily so that the pure math
(`filtered_rl.divergences`, `filtered_rl.control`, `filtered_rl.evaluation.passk`) stays cheap to import.
"""

__version__ = "0.1.0"
