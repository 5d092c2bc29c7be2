"""Thin launcher of `filtered-rl train` for `accelerate launch` (which wants a script path).

accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/train.py --config recipes/configs/X.yaml
"""

import sys

from filtered_rl.train import main

if __name__ == "__main__":
    sys.exit(main())
