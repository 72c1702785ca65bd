"""``python scripts/make_pairs.py --config FILE [key=value ...]``: as ``diffalign label``."""

from __future__ import annotations

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
