"""Control benchmark: `python bench/control.py [--quick]` = `vmad bench control`."""

from __future__ import annotations

import sys

from vmad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "control", *sys.argv[1:]]))
