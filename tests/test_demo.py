"""`vmad demo`, the README's first command, run as a user runs it (one simulated VM fewer):
real controller, trainer and edge agent on loopback with production training defaults
(`assume_normal_unlabelled: false`), the shipped checkpoint, and a real
`vmad inject memory-leak` after the agent's label-free warm-up. The demo must finish,
ship no stream errors, and flag the real leak."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_uses_production_training_defaults() -> None:
    shipped = yaml.safe_load((REPO_ROOT / "deploy" / "demo" / "trainer.yaml").read_text())
    assert shipped["training"]["assume_normal_unlabelled"] is False


def test_demo_runs_and_flags_the_real_leak(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vmad.cli", "demo", "--synthetic", "1", "--smd", "0",
         "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=420, cwd=REPO_ROOT)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    written = yaml.safe_load((tmp_path / "trainer.yaml").read_text())
    assert written["training"]["assume_normal_unlabelled"] is False
    leak = re.search(r"real memory leak \[\d+ s\]: (\w+)", output)
    assert leak is not None, output[-4000:]
    assert leak.group(1) == "flagged", output[-4000:]
    assert "stream errors 0" in output, output[-4000:]
    # Each VM's faults and false alarms add up to the totals.
    totals = re.search(r"faults (\d+) detected / \d+ missed of (\d+); false alarms (\d+);",
                       output)
    by_vm = re.search(r"by VM \(faults detected/of, false alarms\): (.*)", output)
    assert totals is not None and by_vm is not None, output[-4000:]
    rows = [re.fullmatch(r"\S+ (\d+)/(\d+) (\d+)", part) for part in by_vm.group(1).split(", ")]
    simulated = re.search(r"(\d+) simulated VMs", output)
    assert simulated is not None and all(rows), by_vm.group(0)
    assert len(rows) == int(simulated.group(1)), by_vm.group(0)
    assert [sum(int(row.group(k)) for row in rows) for k in (1, 2, 3)] == \
        [int(totals.group(k)) for k in (1, 2, 3)], output[-4000:]
