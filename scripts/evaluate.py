"""``python scripts/evaluate.py --config FILE [key=value ...]``: as ``diffalign eval``."""

from __future__ import annotations

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
