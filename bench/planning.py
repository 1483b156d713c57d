"""Planning benchmark: `python bench/planning.py --data DIR [--quick]` = `vmad bench planning`."""

from __future__ import annotations

import sys

from vmad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "planning", *sys.argv[1:]]))
