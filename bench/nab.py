"""NAB benchmark of LA, DLA, WHA: `python bench/nab.py [--data DIR]` = `vmad bench nab`."""

from __future__ import annotations

import sys

from vmad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "nab", *sys.argv[1:]]))
