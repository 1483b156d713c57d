"""The agent runs on every customer VM: importing it must never load PyTorch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import vmad.edge_agent
from tests.conftest import REPO_ROOT


def test_edge_agent_never_imports_torch() -> None:
    modules = ["vmad.edge_agent", "vmad.bundle", "vmad.windows", "vmad.series", "vmad.cli"]
    modules += [f"vmad.edge_agent.{m.name}" for m in pkgutil.iter_modules(vmad.edge_agent.__path__)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from vmad.cli import build_parser\n"
        "build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, f'torch was imported: {loaded[:5]}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
