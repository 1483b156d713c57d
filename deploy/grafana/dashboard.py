"""The vmad Grafana dashboard, as code (grafanalib). `python dashboard.py` rewrites
vmad.json beside it; import that file in Grafana (Dashboards -> Import) or provision it.
tests/test_observability.py checks that every query names a metric the processes export
or a recording rule of deploy/prometheus/rules.yml, and that vmad.json is up to date.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    TimeSeries,
)

DATASOURCE = "${datasource}"
WIDTH, HEIGHT = 8, 7
# Joins the agent's vm_id label onto an agent series (vmad_agent_info{vm_id} = 1).
BY_VM = "* on (job, instance) group_left (vm_id) vmad_agent_info"

# (row title, [(panel title, kind, unit, [(expr, legend)], description)])
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], str]]]] = [
    ("Fleet", [
        ("VMs alarming now", "stat", "none",
         [("vmad:vms_alarming:count", "")],
         "VMs whose newest window is anomalous."),
        ("Fleet anomaly rate", "timeseries", "percentunit",
         [("vmad:fleet_anomaly_rate:ratio_rate5m", "anomalous windows")],
         "Share of scored windows that were anomalous, fleet-wide, over 5 minutes."),
        ("Anomaly score per VM", "timeseries", "none",
         [("vmad:vm_anomaly_score", "{{vm_id}}")],
         "Each VM's newest window score; the bundle's threshold is usually 0.5."),
    ]),
    ("Agents", [
        ("Agent CPU (share of a core)", "timeseries", "percentunit",
         [("vmad:agent_cpu_cores:rate5m", "{{vm_id}}")],
         "The agent's own CPU; its budget is 1 % of a core."),
        ("Agent resident memory", "timeseries", "bytes",
         [("vmad:agent_resident_bytes", "{{vm_id}}")],
         "The agent's RSS (target 80 MB; container limit 128 MiB)."),
        ("Spool depth and drops", "timeseries", "none",
         [(f"vmad_agent_spool_depth {BY_VM}", "{{vm_id}} waiting"),
          (f"increase(vmad_agent_spool_dropped_total[15m]) {BY_VM}", "{{vm_id}} dropped")],
         "Samples waiting to be acknowledged by the trainer, and samples dropped from a "
         "full spool in the last 15 minutes."),
        ("Bundle versions running", "timeseries", "none",
         [("count by (version) (vmad_agent_model_info)", "{{version}}")],
         "How many agents run each model bundle version."),
        ("Bundles rejected", "timeseries", "none",
         [(f"increase(vmad_agent_bundles_rejected_total[1h]) {BY_VM}", "{{vm_id}}")],
         "Pushed bundles that failed verification (checksum or shape), last hour."),
        ("Agents streaming", "timeseries", "none",
         [("sum(vmad_agent_trainer_connected)", "agents connected to a trainer"),
          ("sum(vmad_trainer_agents_connected)", "streams open at trainers")],
         "Agents with a live telemetry stream, as agents and trainers see it."),
    ]),
    ("Trainers", [
        ("Trainer intake (samples/s)", "timeseries", "none",
         [("vmad:trainer_samples:rate5m", "{{instance}}")],
         "New telemetry samples stored per second."),
        ("Trainer refusals", "timeseries", "none",
         [("vmad:trainer_batches_refused:rate5m", "{{instance}} {{reason}}"),
          ("sum by (instance, reason) (rate(vmad_trainer_calls_unauthenticated_total[5m]))",
           "{{instance}} token: {{reason}}")],
         "Batches refused (by reason) and calls refused for their token, per second."),
        ("Duplicate and lost samples", "timeseries", "none",
         [("sum by (instance) (rate(vmad_trainer_samples_duplicate_total[5m]))",
           "{{instance}} duplicates"),
          ("sum by (instance) (rate(vmad_trainer_samples_lost_total[5m]))",
           "{{instance}} lost")],
         "Replayed samples the trainer already had, and sequence gaps that never arrived."),
        ("State report latency (p95)", "timeseries", "s",
         [("histogram_quantile(0.95, sum by (le, instance) "
           "(rate(vmad_trainer_report_seconds_bucket[5m])))", "{{instance}}")],
         "Trainer -> controller state report round trip."),
        ("Model actions (p95 seconds)", "timeseries", "s",
         [("histogram_quantile(0.95, sum by (le, action) "
           "(rate(vmad_trainer_action_seconds_bucket[30m])))", "{{action}}")],
         "Time per fine-tune or reset."),
        ("Bundles pushed", "timeseries", "none",
         [("sum by (instance) (increase(vmad_trainer_bundles_pushed_total[1h]))",
           "{{instance}}")],
         "New bundles sent to agents, last hour."),
        ("VMs warming up, and thresholds raised by labels", "timeseries", "none",
         [("count by (instance) (vmad_trainer_vm_adapted == 0)", "{{instance}} warming up"),
          ("count by (instance) (vmad_trainer_vm_threshold_label_raise > 1)",
           "{{instance}} raised by labels")],
         "VMs whose agents raise no alarm yet (their first hour), and VMs whose labels of "
         "normal raised their threshold."),
        ("Lowest estimated recall", "timeseries", "percentunit",
         [("bottomk(5, vmad_trainer_vm_injected_recall)", "{{vm_id}}")],
         "Share of faults injected into a VM's own history that its current fit flags: the "
         "estimate made without labels, the five lowest VMs."),
    ]),
    ("Controller", [
        ("Decisions per hour by action", "timeseries", "none",
         [("vmad:controller_decisions:increase1h", "{{action}}")],
         "What the policy decided (keep, fine-tune, reset)."),
        ("Reward (mean of recent transitions)", "timeseries", "none",
         [("vmad_controller_reward_recent", "reward")],
         "R = a1 R1 + a2 R2 + a3 R3 (docs/control.md), newest 100 transitions."),
        ("Q-values of the latest decision", "timeseries", "none",
         [("vmad_controller_q_value", "{{action}}")],
         "The DQN policy's value of each action for the latest state it decided."),
        ("Registry size", "timeseries", "none",
         [("vmad_controller_registry_rows", "{{table}}")],
         "Rows in the controller's SQLite registry."),
        ("Seconds since each trainer reported", "timeseries", "s",
         [("vmad_controller_trainer_report_age_seconds", "{{trainer_id}}")],
         "A trainer silent for several report intervals is down or cut off."),
        ("Reports answered per second", "timeseries", "none",
         [("rate(vmad_controller_reports_total[5m])", "reports")],
         "State reports the controller answered."),
    ]),
]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [(title, expr) for _, panels in ROWS for title, _, _, targets, _ in panels
            for expr, _ in targets]


def build() -> Dashboard:
    panels = []
    y = 0
    for row_title, row_panels in ROWS:
        panels.append(RowPanel(title=row_title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, (title, kind, unit, targets, description) in enumerate(row_panels):
            position = GridPos(h=HEIGHT, w=WIDTH, x=(i % 3) * WIDTH, y=y + (i // 3) * HEIGHT)
            queries = [Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + n),
                              datasource=DATASOURCE)
                       for n, (expr, legend) in enumerate(targets)]
            if kind == "stat":
                panels.append(Stat(title=title, description=description, targets=queries,
                                   dataSource=DATASOURCE, gridPos=position, format=unit,
                                   reduceCalc="lastNotNull", graphMode="none"))
            else:
                panels.append(TimeSeries(title=title, description=description,
                                         targets=queries, dataSource=DATASOURCE,
                                         gridPos=position, unit=unit))
        y += ((len(row_panels) + 2) // 3) * HEIGHT
    return Dashboard(
        title="vmad fleet", uid="vmad-fleet", tags=["vmad"], timezone="utc",
        refresh="30s", panels=panels,
        templating=Templating(list=[Template(name="datasource", label="Prometheus",
                                             query="prometheus", type="datasource")]),
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2,
                      sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("vmad.json")
    out.write_text(render())
    print(f"wrote {out} ({len(panel_queries())} queries)")
