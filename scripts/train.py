"""Train any diffalign method from a YAML config.

    accelerate launch scripts/train.py --config configs/diffusion_dpo/sd15.yaml [key=value ...]

Prints the output directory and the final metrics as JSON.
"""

from __future__ import annotations

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
