"""What watching costs the controller: time to build the fleet page (HTML and JSON)
and to answer a Prometheus scrape, for a registry of V VMs with R state reports each.

The registry is filled through the controller's own Registry (one transaction per
report, as the service does), then the page and the scrape are timed (best of 3, after
one warm-up). Prints a table.

    .venv/bin/python bench/observability.py --quick          # 20 VMs x 5 reports
    .venv/bin/python bench/observability.py --vms 200 --reports 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest

from vmad.actions import CONTROL_ACTIONS, Action, Decision
from vmad.controller.fleet_page import FleetSettings, fleet_data, render_html
from vmad.controller.metrics import ControllerMetrics
from vmad.controller.registry import Registry
from vmad.state import VMState


def _best(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def run(vms: int, reports: int, folder: Path) -> dict[str, float]:
    registry = Registry(folder / "registry.sqlite")
    now = time.time()
    q_values = tuple(0.1 * i for i in range(len(CONTROL_ACTIONS)))
    started = time.perf_counter()
    for r in range(reports):
        at = now - (reports - r) * 30.0
        for v in range(vms):
            state = VMState(vm_id=f"vm-{v}", timestamp=at, flagged_share=0.05,
                            summary=(0.2, 1.5, 0.0, -0.3, 1.0, 1.0, 1.0, 1.0),
                            model_version=f"zoom-cnn-vm-{v}-ft1", labelled_windows=64)
            registry.record_report(f"node-{v % 8}", state,
                                   Decision(Action.KEEP, 0, "ok", q_values), "dqn",
                                   reward_of=lambda d, s: 0.5, now=at)
    fill = time.perf_counter() - started
    settings = FleetSettings()
    page = _best(lambda: render_html(fleet_data(registry, settings)))
    size = len(render_html(fleet_data(registry, settings)))
    metrics = ControllerMetrics(registry, folder / "registry.sqlite", None)
    scrape = _best(lambda: generate_latest(metrics.registry))
    registry.close()
    return {"fill_s": fill, "page_s": page, "page_kb": size / 1e3, "scrape_s": scrape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--reports", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="20 VMs x 5 reports")
    args = parser.parse_args()
    vms, reports = (20, 5) if args.quick else (args.vms, args.reports)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(vms, reports, Path(tmp))
    print("| VMs | reports each | fleet page (HTML + data) | page size | /metrics scrape |")
    print("|---|---|---|---|---|")
    print(f"| {vms} | {reports} | {result['page_s'] * 1000:.0f} ms | "
          f"{result['page_kb']:.0f} kB | {result['scrape_s'] * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
