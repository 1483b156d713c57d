"""What `pip install` puts on a host: one top-level package, `vmad`, with everything its
console commands need (shipped models, the .proto contracts, the typing marker)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO_ROOT


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("vmad-*.whl")
    return wheel


def test_wheel_installs_one_top_level_package_with_its_data(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_build_wheel(tmp_path)).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"vmad"}, sorted(top)
    for subpackage in ("edge_agent", "trainer", "controller", "planner", "protos"):
        assert f"vmad/{subpackage}/__init__.py" in names
    for required in ("vmad/py.typed", "vmad/default_bundle/bundle.json",
                     "vmad/protos/vmad/v1/telemetry.proto",
                     "vmad/protos/vmad/v1/telemetry_pb2.py",
                     "vmad/edge_agent/overhead.py"):
        assert required in names, required
    assert any(n.startswith("vmad/trainer/default_checkpoint/") for n in names)
    assert any(n.startswith("vmad/controller/default_policy/") for n in names)
