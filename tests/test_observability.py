"""Watching vmad as operators do: real processes (controller, trainer, two agents) on
loopback expose /metrics that `promtool check metrics` finds clean; deploy/prometheus's
rules and configs pass promtool; a real Prometheus server scraping them fires
VmadVMAlarming for the VM whose agent alarms and not for the quiet one; every query of
the Grafana dashboard names a metric these processes export (or a recording rule).

promtool and prometheus are Debian's `prometheus` package (.ci/run installs it); the
tests that need them skip cleanly where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.agent_fixtures import tiny_bundle
from tests.conftest import REPO_ROOT
from vmad.edge_agent.detector import BundleSlot
from vmad.edge_agent.sampler import METRICS
from vmad.launch import Process, free_port, start, wait_serving
from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(Debian package `prometheus`)")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


@dataclass
class Fleet:
    controller: Process
    trainer: Process
    agents: dict[str, Process]
    metrics: dict[str, int]  # job/instance name -> metrics port
    grpc: dict[str, int]

    def endpoints(self) -> dict[str, str]:
        return {name: f"127.0.0.1:{port}" for name, port in self.metrics.items()}


def _checkpoint(folder: Path) -> Path:
    from vmad.trainer.checkpoint import Checkpoint, save_checkpoint
    from vmad.trainer.models import build_model
    from vmad.windows import Normalizer

    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit(rng.normal(30, 3, size=(200, len(DEFAULT_METRICS))))
    save_checkpoint(folder, Checkpoint(build_model("mlp", len(DEFAULT_METRICS), 8), "mlp",
                                       DEFAULT_METRICS, 8, normalizer, 0.5))
    return folder


def wait_http(port: int, process: Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.alive(), f"{process.name}:\n{process.log_text()[-3000:]}"
        if http_get(f"http://127.0.0.1:{port}/readyz", 1.0)[0] == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{process.name}: /readyz never answered\n{process.log_text()[-2000:]}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """A controller, a trainer and two standalone agents: `vm-alarming` runs a bundle
    that scores every window anomalous, `vm-quiet` one that scores none."""
    tmp = tmp_path_factory.mktemp("fleet")
    ports = {name: free_port() for name in
             ("controller", "trainer", "controller-grpc", "trainer-grpc", "controller-fleet",
              "vm-alarming", "vm-quiet")}
    logs = tmp / "logs"
    (tmp / "controller.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{ports['controller-grpc']}",
        "database": str(tmp / "registry.sqlite"),
        "metrics": {"listen": f"127.0.0.1:{ports['controller']}"},
        "security": {"insecure": True}}))
    (tmp / "trainer.yaml").write_text(yaml.safe_dump({
        "trainer_id": "node-1", "listen": f"127.0.0.1:{ports['trainer-grpc']}",
        "data_dir": str(tmp / "trainer-data"),
        "controller": {"address": f"127.0.0.1:{ports['controller-grpc']}",
                       "report_interval_s": 0.5},
        "model": {"pretrained": str(_checkpoint(tmp / "pretrained"))},
        "metrics": {"listen": f"127.0.0.1:{ports['trainer']}"},
        "security": {"insecure": True}}))
    processes: list[Process] = []
    try:
        controller = start("controller", ["controller", "--config",
                                          str(tmp / "controller.yaml")], logs)
        processes.append(controller)
        trainer = start("trainer", ["trainer", "--config", str(tmp / "trainer.yaml")], logs)
        processes.append(trainer)
        agents = {}
        for vm_id, bias in (("vm-alarming", 50.0), ("vm-quiet", -50.0)):
            folder = tmp / vm_id
            BundleSlot(folder / "bundles", METRICS, DEFAULT_WINDOW).install(
                *tiny_bundle(f"{vm_id}-rule", bias=bias))
            (folder / "agent.yaml").write_text(yaml.safe_dump({
                "vm_id": vm_id, "interval_s": 0.1, "bundle_dir": str(folder / "bundles"),
                "trainer": {"address": None}, "spool": {"path": str(folder / "spool.db")},
                "metrics": {"listen": f"127.0.0.1:{ports[vm_id]}"},
                "inject": {"labels_file": str(folder / "labels.jsonl")},
                "security": {"insecure": True}}))
            agents[vm_id] = start(vm_id, ["agent", "--config", str(folder / "agent.yaml")],
                                  logs)
            processes.append(agents[vm_id])
        wait_serving(f"127.0.0.1:{ports['controller-grpc']}", 60, process=controller)
        wait_serving(f"127.0.0.1:{ports['trainer-grpc']}", 120, process=trainer)
        for name, process in (("controller", controller), ("trainer", trainer)):
            wait_http(ports[name], process)
        yield Fleet(controller, trainer, agents,
                    {k: ports[k] for k in ("controller", "trainer", "vm-alarming",
                                           "vm-quiet")},
                    {"controller": ports["controller-grpc"], "trainer": ports["trainer-grpc"],
                     "fleet": ports["controller-fleet"]})
    finally:
        for process in reversed(processes):
            process.stop()


def scrape(port: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        if status == 200:
            return body.decode()
        time.sleep(0.2)
    raise AssertionError(f"no /metrics on port {port}")


SERIES = {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count"),
          "summary": ("_sum", "_count"), "info": ("_info",)}


def exported_names(text: str) -> set[str]:
    """Series names in an exposition: those with samples, and those a `# TYPE` line
    declares (a labelled metric has no sample before its first event)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name + suffix for suffix in SERIES.get(kind, ("",))} | {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# -- the processes' own metrics ---------------------------------------------------------


def test_every_process_exports_its_metrics_and_process_collectors(fleet):
    texts = {name: scrape(port) for name, port in fleet.metrics.items()}
    for name, text in texts.items():
        names = exported_names(text)
        assert "process_resident_memory_bytes" in names, name
        assert "process_cpu_seconds_total" in names, name
    agent = exported_names(texts["vm-alarming"])
    assert {"vmad_agent_spool_dropped_total", "vmad_agent_bundles_rejected_total",
            "vmad_agent_info", "vmad_agent_anomalous"} <= agent
    assert "# TYPE vmad_agent_spool_dropped_total counter" in texts["vm-alarming"]
    assert 'vmad_agent_info{vm_id="vm-alarming"} 1.0' in texts["vm-alarming"]
    trainer = exported_names(texts["trainer"])
    assert {"vmad_trainer_agents_connected", "vmad_trainer_bundles_pushed_total",
            "vmad_trainer_report_seconds_count", "vmad_trainer_vms",
            "vmad_trainer_label_refits_total", "vmad_trainer_vm_adapted"} <= trainer
    controller = exported_names(texts["controller"])
    assert {"vmad_controller_reports_total", "vmad_controller_registry_rows",
            "vmad_controller_registry_bytes"} <= controller


def test_health_endpoints_answer_and_unknown_paths_are_404(fleet):
    for port in fleet.metrics.values():
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert http_get(f"http://127.0.0.1:{port}/nothing-here")[0] == 404


@needs_promtool
def test_promtool_check_metrics_is_clean_on_every_process(fleet):
    for name, port in fleet.metrics.items():
        result = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(port),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and not result.stdout.strip(), \
            f"{name}: {result.stdout}{result.stderr}"


# -- rules and configs ------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_rules_unit_tests_and_scrape_configs():
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "tests.yml"],
                 ["check", "config", "prometheus-static.yml"]):
        result = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}: {result.stdout}" \
                                       f"{result.stderr}"
    result = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"],
                            cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_named_failures_and_have_summaries():
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {"VmadTargetDown", "VmadVMAlarming", "VmadSpoolDropping", "VmadTrainerRefusing",
            "VmadBundleRejected"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert["annotations"]["summary"], alert["alert"]


# -- a real Prometheus ------------------------------------------------------------------


def _prometheus_config(tmp_path: Path, fleet: Fleet) -> Path:
    """The shipped rules with every `for:` shortened to 2 s (the test cannot wait 5
    minutes), scraping the fleet every second."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    endpoints = fleet.endpoints()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yml")],
        "scrape_configs": [
            {"job_name": "vmad-agent", "static_configs": [
                {"targets": [endpoints["vm-alarming"], endpoints["vm-quiet"]]}]},
            {"job_name": "vmad-trainer", "static_configs": [
                {"targets": [endpoints["trainer"]]}]},
            {"job_name": "vmad-controller", "static_configs": [
                {"targets": [endpoints["controller"]]}]},
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _api(port: int, path: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/{path}{query}")
    assert status == 200, body[:500]
    return json.loads(body)["data"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_real_prometheus_fires_vm_alarming_for_the_alarming_vm_only(fleet, tmp_path):
    port = free_port()
    config = _prometheus_config(tmp_path, fleet)
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        firing: list[dict] = []
        up: dict[str, float] = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            if http_get(f"http://127.0.0.1:{port}/-/ready", 1.0)[0] == 200:
                up = {r["metric"]["instance"]: float(r["value"][1])
                      for r in _api(port, "query", query="up")["result"]}
                firing = [a for a in _api(port, "alerts")["alerts"]
                          if a["labels"]["alertname"] == "VmadVMAlarming"
                          and a["state"] == "firing"]
                if firing and len(up) == 4:
                    break
            time.sleep(1)
        assert up and all(v == 1.0 for v in up.values()), up
        assert [a["labels"]["vm_id"] for a in firing] == ["vm-alarming"], firing
        alarming = _api(port, "query", query="vmad:vms_alarming:count")["result"]
        assert float(alarming[0]["value"][1]) == 1.0
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# -- the Grafana dashboard --------------------------------------------------------------


def test_every_dashboard_and_rule_query_names_an_exported_metric(fleet):
    sys.path.insert(0, str(REPO_ROOT / "deploy" / "grafana"))
    try:
        from dashboard import panel_queries
    finally:
        sys.path.pop(0)
    exported: set[str] = set()
    for port in fleet.metrics.values():
        exported |= exported_names(scrape(port))
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    queries = panel_queries()
    assert len(queries) >= 10
    # The rules too: promtool checks their syntax, not whether their metrics exist.
    queries += [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"]
                for r in g["rules"] if "up{" not in r["expr"]]
    for title, expr in queries:
        bare = re.sub(r"\{[^}]*\}", "", expr)  # label matchers name jobs, not metrics
        names = set(re.findall(r"\b((?:vmad|process)[a-z0-9_:]*)", bare))
        assert names, f"{title}: {expr} names no vmad metric"
        unknown = {n for n in names if n not in exported | recorded}
        assert not unknown, f"panel {title!r}: {sorted(unknown)} not exported"


def test_committed_dashboard_json_is_what_the_code_generates():
    sys.path.insert(0, str(REPO_ROOT / "deploy" / "grafana"))
    try:
        from dashboard import render
    finally:
        sys.path.pop(0)
    committed = (REPO_ROOT / "deploy" / "grafana" / "vmad.json").read_text()
    assert committed == render(), "run: python deploy/grafana/dashboard.py"
