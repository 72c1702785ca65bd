"""``python scripts/demo.py [--method M] [--objective O] [key=value ...]``: as ``diffalign demo``."""

from __future__ import annotations

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
