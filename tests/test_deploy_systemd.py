"""deploy/systemd: the units start what install.sh installs (ExecStart in its venv, the
`vmad` user from the sysusers.d file, Documentation= files it copies), systemd finds
nothing wrong in them, and their hardening keeps an exposure level of 2.0 or better."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SYSTEMD = REPO_ROOT / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("vmad-*.service"))
ANALYZE = shutil.which("systemd-analyze")


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _all(path: Path, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", path.read_text(), flags=re.MULTILINE)


def test_units_run_what_install_sh_installs_as_the_sysusers_user():
    install = (SYSTEMD / "install.sh").read_text()
    prefix = re.search(r'PREFIX="\$\{PREFIX:-([^}]+)\}"', install).group(1)
    sysusers = (SYSTEMD / "vmad.sysusers.conf").read_text()
    assert re.search(r"^u vmad ", sysusers, flags=re.MULTILINE)
    assert "sysusers.d/vmad.conf" in install and "systemd-sysusers" in install
    assert len(UNITS) == 3
    for path in UNITS:
        unit = _unit(path)
        service = unit["Service"]
        assert service["User"] == "vmad" and service["Group"] == "vmad"
        for command in (service["ExecStart"], service["ExecStartPre"]):
            assert command.split()[0] == f"{prefix}/bin/vmad", path.name
        role = path.stem.removeprefix("vmad-")
        assert service["ExecStart"].split()[1] == role
        docs = _all(path, "Documentation")
        assert docs, path.name
        for uri in docs:
            assert uri.startswith(f"file://{prefix}/share/doc/vmad/"), uri
            assert (REPO_ROOT / "docs" / Path(uri).name).is_file(), uri
    assert 'install -m 0644 "$repo"/docs/*.md "$PREFIX/share/doc/vmad/"' in install


def test_install_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(SYSTEMD / "install.sh")], check=True)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_verifies_the_units_and_rates_their_hardening():
    result = subprocess.run([ANALYZE, "verify", *map(str, UNITS)], capture_output=True,
                            text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "/opt/vmad/bin/vmad is not executable" not in line]
    assert not problems, problems
    for path in UNITS:
        result = subprocess.run([ANALYZE, "security", "--offline=true", str(path)],
                                capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        if match is None:
            pytest.skip("this systemd-analyze cannot rate units offline")
        assert float(match.group(1)) <= 2.0, f"{path.name}: {match.group(1)}"
