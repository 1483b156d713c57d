"""The controller's fleet page: HTML and JSON from the registry of a running demo-like
setup (a real controller and trainer, simulated agents streaming over gRPC), opened in a
real headless Chromium (Debian's `chromium`; skipped when absent), which must list every
VM; a screenshot is saved beside the test's files. Network strings are escaped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import yaml

from tests.test_observability import _checkpoint, http_get
from vmad.actions import Action, Decision
from vmad.controller.fleet_page import FleetSettings, fleet_data, render_html
from vmad.controller.registry import Registry
from vmad.launch import free_port, start, wait_serving
from vmad.replay import ReplayAgent, ReplaySeries
from vmad.state import VMState

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VMS = ("vm-web-1", "vm-db-1", "vm-cache-1")


def _series(name: str, n: int, seed: int, anomalous: bool) -> ReplaySeries:
    rng = np.random.default_rng(seed)
    values = rng.normal(30, 3, size=(n, 4)).astype(np.float32)
    labels = np.zeros(n, dtype=np.int8)
    if anomalous:
        values[n // 2:, 1] += 40
        labels[n // 2:] = 1
    return ReplaySeries(name, values, labels, "test")


def test_page_escapes_what_came_over_the_network(tmp_path):
    registry = Registry(tmp_path / "registry.sqlite")
    try:
        hostile = '<script>alert("x")</script>'
        state = VMState(vm_id=hostile, timestamp=time.time(), flagged_share=0.9,
                        summary=(0.1, 4.0, -0.2, 0.0, 1, 1, 1, 1), model_version="v<1>",
                        detector="<img src=x>")
        registry.record_report("node&1", state, Decision(Action.KEEP, 0, "ok <b>"), "rules")
        data = fleet_data(registry, FleetSettings())
        page = render_html(data)
    finally:
        registry.close()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "&lt;img src=x&gt;" in page
    assert data["vms"][0]["verdict"] == "anomalous"
    assert data["vms"][0]["drivers"][0]["metric"] == "memory_percent"
    assert data["trainers"][0]["healthy"]


@pytest.mark.integration
def test_fleet_page_lists_every_vm_in_headless_chromium(tmp_path):
    c_port, t_port, page_port = free_port(), free_port(), free_port()
    (tmp_path / "controller.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{c_port}", "database": str(tmp_path / "registry.sqlite"),
        "metrics": {"listen": None},
        "fleet": {"listen": f"127.0.0.1:{page_port}", "refresh_s": 2},
        "security": {"insecure": True}}))
    (tmp_path / "trainer.yaml").write_text(yaml.safe_dump({
        "trainer_id": "node-1", "listen": f"127.0.0.1:{t_port}",
        "data_dir": str(tmp_path / "trainer-data"),
        "controller": {"address": f"127.0.0.1:{c_port}", "report_interval_s": 0.5},
        "model": {"pretrained": str(_checkpoint(tmp_path / "pretrained"))},
        "metrics": {"listen": None}, "security": {"insecure": True}}))
    controller = start("controller", ["controller", "--config",
                                      str(tmp_path / "controller.yaml")], tmp_path / "logs")
    trainer = start("trainer", ["trainer", "--config", str(tmp_path / "trainer.yaml")],
                    tmp_path / "logs")
    agents = []
    try:
        wait_serving(f"127.0.0.1:{c_port}", 60, process=controller)
        wait_serving(f"127.0.0.1:{t_port}", 120, process=trainer)
        for i, vm_id in enumerate(VMS):
            agent = ReplayAgent(f"127.0.0.1:{t_port}", vm_id,
                                _series(vm_id, 200, i, anomalous=i == 0), batch_size=20)
            agents.append(agent)
            agent.send_until(200)
        deadline = time.monotonic() + 60
        data: dict = {}
        while time.monotonic() < deadline:
            status, body = http_get(f"http://127.0.0.1:{page_port}/fleet.json")
            if status == 200:
                data = json.loads(body)
                if {v["vm_id"] for v in data["vms"]} == set(VMS) and all(
                        v["last_decision"] for v in data["vms"]):
                    break
            time.sleep(0.5)
        assert {v["vm_id"] for v in data["vms"]} == set(VMS), data
        assert data["trainers"][0]["trainer_id"] == "node-1"
        assert all(v["model_version"] and v["flagged_history"] for v in data["vms"])
        # At most 200 samples of the 720 a first fit needs: every detector warms up.
        assert all(re.fullmatch(r"warming up: \d+ of 720 samples, no alarms", v["detector"])
                   for v in data["vms"]), [v["detector"] for v in data["vms"]]
        with urllib.request.urlopen(f"http://127.0.0.1:{page_port}/", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/html")
            assert 'http-equiv="refresh"' in reply.read().decode()

        if CHROMIUM is None:
            pytest.skip("chromium not installed (Debian package `chromium`)")
        url = f"http://127.0.0.1:{page_port}/"
        common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        for vm_id in VMS:
            assert f'data-vm="{vm_id}"' in dom.stdout, vm_id
        assert dom.stdout.count("<svg") >= len(VMS)  # a sparkline per VM
        shot = tmp_path / "fleet-page.png"
        subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,700",
                        "--hide-scrollbars", url], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for agent in agents:
            agent.close()
        trainer.stop()
        controller.stop()


def test_fleet_settings_default_to_loopback():
    assert FleetSettings().listen.startswith("127.0.0.1:")


def test_observability_bench_quick_prints_its_table():
    import sys

    from tests.conftest import REPO_ROOT

    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "observability.py"),
                             "--quick"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith("| 20 | 5 |") and row.count("ms") == 2
