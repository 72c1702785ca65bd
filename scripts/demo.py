"""``python scripts/demo.py [--method ...] [--objective ...] [key=value ...]``: the same as ``diffalign demo``."""

from __future__ import annotations

import sys

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
