"""The fleet page: a read-only view of the controller's registry for people, as HTML at
`/` and the same data as JSON at `/fleet.json`, served on `fleet.listen` (loopback by
default: it names every VM; on Kubernetes, `kubectl port-forward`).

Per VM: the verdict from its latest state report (the share of its recent windows the
agent flagged), a sparkline of that share over `fleet.history_hours`, the metrics
furthest from the model's normal in the recent data (the state's per-metric summary:
normalized mean, in robust units), the model version and its quality on labelled
windows, what its detector is (warming up, or which fit runs and its estimated
quality), and the latest decision with the policy's Q-values. Per trainer: seconds since
its last report, and whether that is longer than `fleet.stale_after_s`.

Plain server-side HTML with inline SVG and a meta refresh: no script, no build step.
Every value that came over the network is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import threading
import time
from typing import Any

from pydantic import Field

from vmad.actions import CONTROL_ACTIONS
from vmad.config import StrictModel
from vmad.controller.registry import Registry
from vmad.http_endpoint import HttpEndpoint, open_endpoint
from vmad.schema import DEFAULT_METRICS

__all__ = ["FleetSettings", "fleet_data", "open_fleet_page", "render_html"]

# Verdict bands of the flagged share in the latest report.
ALARMING_SHARE = 0.5
# Per-metric deviations (robust units) worth naming as driving the score.
NOTABLE_DEVIATION = 1.0
SPARK_POINTS = 120
# Reports read per VM for its sparkline: 6 h at one report every 30 s. Reading and
# parsing them is most of a page's cost (docs/operations.md has the measurement).
HISTORY_ROWS = 720


class FleetSettings(StrictModel):
    """The controller's fleet page (`fleet:` in controller.yaml)."""

    listen: str | None = Field("127.0.0.1:50073", description="host:port; null = off")
    history_hours: float = Field(6.0, gt=0, le=168, description="sparkline span")
    stale_after_s: float = Field(120.0, gt=0,
                                 description="a trainer silent this long is shown as stale")
    refresh_s: int = Field(10, ge=2, le=3600, description="the page reloads itself this often")


def _verdict(share: float | None) -> str:
    if share is None:
        return "no report"
    if share >= ALARMING_SHARE:
        return "anomalous"
    return "flagging" if share > 0 else "normal"


def _drivers(summary: list[float]) -> list[dict[str, Any]]:
    """Metrics whose recent normalized mean is furthest from the model's normal."""
    m = len(summary) // 2
    if m == 0 or 2 * m != len(summary):
        return []
    names = DEFAULT_METRICS if m == len(DEFAULT_METRICS) else tuple(f"metric {i}"
                                                                     for i in range(m))
    ranked = sorted(((abs(v), name, v) for name, v in zip(names, summary[:m], strict=True)
                     if math.isfinite(v)), reverse=True)
    return [{"metric": name, "deviation": round(v, 2)} for size, name, v in ranked
            if size >= NOTABLE_DEVIATION][:3]


def fleet_data(registry: Registry, settings: FleetSettings,
               now: float | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-ready data."""
    now = time.time() if now is None else now
    since = now - settings.history_hours * 3600
    trainers = [{"trainer_id": t.trainer_id, "address": t.address,
                 "last_report_age_s": round(max(0.0, now - t.last_seen), 1),
                 "healthy": now - t.last_seen <= settings.stale_after_s}
                for t in registry.trainers()]
    vms = []
    for vm in registry.vms():
        recent = registry.decisions(vm.vm_id, limit=HISTORY_ROWS)  # newest first
        latest = recent[:1]
        history = [d for d in reversed(recent) if d.at >= since]
        if len(history) > SPARK_POINTS:
            step = len(history) / SPARK_POINTS
            history = [history[int(i * step)] for i in range(SPARK_POINTS - 1)] + [history[-1]]
        decision = None
        if latest:
            d = latest[0].decision
            q_values = {a.label: round(q, 4)
                        for a, q in zip(CONTROL_ACTIONS, d.q_values, strict=False)}
            decision = {"at": latest[0].at, "action": d.label, "reason": d.reason,
                        "policy": latest[0].policy, "q_values": q_values}
        state = vm.state
        share = state.flagged_share if state is not None else None
        vms.append({
            "vm_id": vm.vm_id, "trainer_id": vm.trainer_id,
            "last_report_age_s": round(max(0.0, now - vm.last_seen), 1),
            "verdict": _verdict(share),
            "flagged_share": share,
            "flagged_history": [[round(d.at, 1), round(d.state.flagged_share, 4)]
                                for d in history],
            "drivers": _drivers(list(state.summary)) if state is not None else [],
            "model_version": vm.model_version,
            "detector": state.detector if state is not None else "",
            "finetuned": state.finetuned if state is not None else None,
            "f1": state.f1 if state is not None and state.labelled_windows else None,
            "labelled_windows": state.labelled_windows if state is not None else 0,
            "reports": vm.reports,
            "last_decision": decision,
        })
    return {"generated_at": now, "history_hours": settings.history_hours,
            "trainers": trainers, "vms": vms,
            "counts": {"vms": len(vms), "trainers": len(trainers),
                       "anomalous": sum(v["verdict"] == "anomalous" for v in vms)}}


def _sparkline(points: list[list[float]], width: int = 160, height: int = 28) -> str:
    if not points:
        return '<span class="muted">no history</span>'
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0) or 1.0
    xy = " ".join(f"{(t - t0) / span * (width - 2) + 1:.1f},"
                  f"{(1 - v) * (height - 2) + 1:.1f}" for t, v in points)
    last = points[-1][1]
    colour = "#c0392b" if last >= ALARMING_SHARE else "#2c7fb8"
    return (f'<svg class="spark" width="{width}" height="{height}" role="img" '
            f'aria-label="flagged share, last {len(points)} reports">'
            f'<line x1="0" y1="{(1 - ALARMING_SHARE) * (height - 2) + 1:.1f}" x2="{width}" '
            f'y2="{(1 - ALARMING_SHARE) * (height - 2) + 1:.1f}" class="limit"/>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{xy}"/></svg>')


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f4f4f4}
.anomalous{background:#fadbd8;font-weight:600}
.flagging{background:#fdf2d0}
.normal{background:#e3f4e1}
.stale{background:#fadbd8}
.muted{color:#888}
.spark .limit{stroke:#ccc;stroke-dasharray:2 2}
code{font-size:12px}
"""


def render_html(data: dict[str, Any], refresh_s: int = 10) -> str:
    e = html.escape
    counts = data["counts"]
    rows = []
    for vm in data["vms"]:
        share = vm["flagged_share"]
        drivers = ", ".join(f"{e(d['metric'])} {d['deviation']:+.1f}" for d in vm["drivers"])
        decision = vm["last_decision"]
        if decision:
            q = " ".join(f"{e(a)}={v:.2f}" for a, v in decision["q_values"].items())
            decided = (f"<b>{e(decision['action'])}</b> <span class='muted'>"
                       f"{e(decision['reason'])}</span><br><code>{q or 'no Q-values (rules)'}"
                       "</code>")
        else:
            decided = '<span class="muted">none yet</span>'
        f1 = "" if vm["f1"] is None else f"F1 {vm['f1']:.2f} on {vm['labelled_windows']}"
        rows.append(
            f'<tr class="vm" data-vm="{e(vm["vm_id"])}"><td>{e(vm["vm_id"])}</td>'
            f'<td class="{e(vm["verdict"])}">{e(vm["verdict"])}</td>'
            f'<td>{"" if share is None else f"{share:.0%}"}</td>'
            f'<td>{_sparkline(vm["flagged_history"])}</td>'
            f'<td>{drivers or "<span class=muted>none notable</span>"}</td>'
            f'<td><code>{e(vm["model_version"])}</code>'
            f'{" (fine-tuned)" if vm["finetuned"] else ""}<br>'
            f'<span class="muted">{e(vm["detector"])}</span>'
            f'{"<br>" if f1 and vm["detector"] else ""}<span class="muted">{f1}</span></td>'
            f'<td>{decided}</td><td>{e(vm["trainer_id"])}<br>'
            f'<span class="muted">{vm["last_report_age_s"]:.0f} s ago</span></td></tr>')
    trainers = "".join(
        f'<tr><td>{e(t["trainer_id"])}</td><td><code>{e(t["address"])}</code></td>'
        f'<td class="{"normal" if t["healthy"] else "stale"}">'
        f'{"reporting" if t["healthy"] else "stale"}</td>'
        f'<td>{t["last_report_age_s"]:.0f} s</td></tr>' for t in data["trainers"])
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(data["generated_at"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_s)}">
<title>vmad fleet: {counts['anomalous']} anomalous of {counts['vms']}</title>
<style>{_STYLE}</style></head><body>
<h1>vmad fleet</h1>
<p>{counts['vms']} VMs, {counts['anomalous']} anomalous, {counts['trainers']} trainers;
generated {generated}, refreshes every {int(refresh_s)} s.
Same data: <a href="fleet.json">fleet.json</a>.</p>
<table id="vms"><thead><tr><th>VM</th><th>verdict</th><th>flagged</th>
<th>flagged share, last {data['history_hours']:g} h</th><th>metrics off normal</th>
<th>model</th><th>last decision (Q-values)</th><th>trainer</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Trainers</h2>
<table id="trainers"><thead><tr><th>trainer</th><th>address</th><th>health</th>
<th>last report</th></tr></thead><tbody>{trainers}</tbody></table>
<p class="muted">verdict: share of the VM's recent windows its agent flagged, from the
latest state report (anomalous from {ALARMING_SHARE:.0%}). Metrics off normal: recent
normalized mean in robust units, from the same report. Per-window scores are in
Prometheus (vmad_agent_anomaly_score).</p>
</body></html>
"""


def open_fleet_page(registry: Registry, settings: FleetSettings) -> HttpEndpoint | None:
    """Serve the page on `settings.listen` (None when off or the port is taken)."""

    lock = threading.Lock()
    cached: dict[str, Any] = {"at": -math.inf, "data": None}

    def current() -> dict[str, Any]:
        """At most one registry read per refresh interval, however many viewers."""
        with lock:
            if time.monotonic() - cached["at"] >= settings.refresh_s:
                cached["data"] = fleet_data(registry, settings)
                cached["at"] = time.monotonic()
            return cached["data"]

    def page() -> tuple[int, str, bytes]:
        body = render_html(current(), settings.refresh_s)
        return 200, "text/html; charset=utf-8", body.encode()

    def as_json() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps(current()).encode()

    return open_endpoint(settings.listen, None, what="fleet page",
                         pages={"/": page, "/fleet": page, "/fleet.json": as_json})
