"""Agent overhead: `python bench/agent_overhead.py [--quick]` = `vmad bench agent-overhead`."""

from __future__ import annotations

import sys

from vmad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "agent-overhead", *sys.argv[1:]]))
