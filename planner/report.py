"""The fleet plan as one HTML page a capacity planner can read and sign.

Summary plots are embedded (base64 PNG) so the page is one file; each VM's plot is a PNG
beside it (``<report>_vms/<vm>.png``), linked from the per-VM table, which sorts by any
column on a click. Every number carries its unit.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vmad.planner.risk_sizing import HEADROOMS, KNOB, WEEK

__all__ = ["write_report"]

_SORT_JS = """
<script>
document.querySelectorAll('table.sortable th').forEach((th, col) => {
  th.style.cursor = 'pointer';
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const rows = Array.from(body.rows);
    const asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    const key = r => { const c = r.cells[col]; const v = c.dataset.v ?? c.textContent;
                       const n = parseFloat(v); return isNaN(n) ? v : n; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
                          return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); });
    rows.forEach(r => body.appendChild(r));
  });
});
</script>
"""


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _vm_plot(fleet, plan, path: Path, unit: str) -> None:
    import matplotlib.pyplot as plt

    from vmad.planner.run_plan import _rolling_choice

    sizes = np.asarray(fleet.config.sizes, dtype=float)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    vm = plan.vm
    # Hourly maxima (every peak stays visible); hours without samples are gaps, not lines.
    hours = vm.timestamps // 3600
    first = int(hours[0])
    peaks = np.full(int(hours[-1]) - first + 1, np.nan)
    np.fmax.at(peaks, hours - first, vm.usage)
    ax.plot(
        [_when((first + h) * 3600) for h in range(peaks.size)],
        peaks,
        lw=0.6,
        color="tab:blue",
        label=f"usage, hourly peak ({unit})",
    )
    if plan.hourly_peaks is not None and plan.point_anomalies is not None:
        hours = plan.first_hour + np.arange(plan.hourly_peaks.size)
        for mask, style, label in (
            (plan.point_anomalies, "x", "point anomaly (WHA; still planned for)"),
            (plan.recurrent_anomalies, "o", "recurrent anomaly (WHA)"),
        ):
            if mask is not None and mask.any():
                ax.plot(
                    [_when(h * 3600) for h in hours[mask]],
                    plan.hourly_peaks[mask],
                    style,
                    ms=4,
                    mfc="none",
                    color="red" if style == "x" else "orange",
                    label=label,
                )
    bt = plan.backtest
    if bt.week.size:
        chosen = sizes[_rolling_choice(fleet, plan)]
        starts = fleet.origin + bt.week * WEEK
        for i, (a, s) in enumerate(zip(starts, chosen, strict=True)):
            ax.hlines(
                s,
                _when(a),
                _when(a + WEEK),
                color="gray",
                lw=1.5,
                label="backtest reservation" if i == 0 else None,
            )
    for k, s in enumerate(plan.sizes):
        a = fleet.plan_start + k * WEEK
        ax.hlines(
            s,
            _when(a),
            _when(a + WEEK),
            color="black",
            lw=2.2,
            label="planned reservation" if k == 0 else None,
        )
    ax.axvline(_when(fleet.plan_start), color="black", ls=":", lw=0.8)
    ax.set_ylabel(unit)
    ax.set_title(f"{plan.name}: " + ("; ".join(plan.warnings) or "no warnings"), fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _summary_plots(fleet, summary, unit: str) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    names = ["always-max", "provisioned\n(trace)", "planned"]
    values = [summary["always_max_cost"], summary["provisioned_cost"], summary["planned_cost"]]
    ax.bar(names, values, color=["gray", "tab:orange", "tab:green"])
    ax.set_ylabel(f"price, next {fleet.config.horizon_weeks} weeks (price units)")
    ax.set_title("Fleet cost")
    ax = axes[1]
    if fleet.weekly:
        ks = [_when(fleet.origin + w[0] * WEEK) for w in fleet.weekly]
        ax.plot(ks, [100 * w[1] for w in fleet.weekly], "o-", label="realised, all usage")
        ax.plot(
            ks, [100 * w[2] for w in fleet.weekly], "s-", label="realised, usage a size could cover"
        )
        ax.axhline(100 * fleet.config.target_risk, color="red", ls="--", label="target")
        ax.set_yscale("symlog", linthresh=0.01)
        fig.autofmt_xdate()
    ax.set_ylabel("time under-provisioned (%)")
    ax.set_title("Backtest: realised risk per week")
    if fleet.weekly:
        ax.legend(fontsize=8)
    ax = axes[2]
    risk = [100 * p.backtest_risk for p in fleet.vms if np.isfinite(p.backtest_risk)]
    saving = [100 * p.backtest_saving for p in fleet.vms if np.isfinite(p.backtest_risk)]
    ax.scatter(risk, saving, s=12)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("backtested time under-provisioned (%)")
    ax.set_ylabel("backtested saving vs always-max (%)")
    ax.set_title("Per VM at the chosen settings")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _knob_spread(fleet) -> str:
    """How the per-VM knobs sit against the fleet's: cheaper, the same, safer."""
    knobs = np.array([p.knob for p in fleet.vms])
    cheaper, safer = int((knobs < fleet.knob).sum()), int((knobs > fleet.knob).sum())
    return (
        f"{cheaper} VMs cheaper than the fleet knob, {safer} safer, "
        f"{knobs.size - cheaper - safer} at it"
    )


def write_report(fleet, summary: dict[str, float], path: Path, unit: str = "GB") -> None:
    import matplotlib

    matplotlib.use("Agg")
    from vmad.planner.run_plan import backtest_text, progress

    unit = unit or "units"
    vm_dir = path.with_name(path.stem + "_vms")
    vm_dir.mkdir(parents=True, exist_ok=True)
    for plan in progress(fleet.vms, "VM plots"):
        _vm_plot(fleet, plan, vm_dir / f"{plan.name}.png", unit)
    cfg = fleet.config
    lam, h = KNOB[fleet.knob]
    knob_text = (
        f"lambda = {lam:.3g}"
        if np.isfinite(lam)
        else f"cover every sample seen x {HEADROOMS[h]:g} (target below what lambda reaches)"
    )
    calibrated_on = (
        f"the fleet's last {cfg.calibration_weeks} weeks"
        if cfg.calibration_weeks
        else "every fleet week so far"
    )
    per_vm = (
        f", each VM's own from its past weeks shrunk toward the fleet's (the fleet's record "
        f"{_prior_text(cfg.vm_prior_weeks)}; {_knob_spread(fleet)})"
        if cfg.vm_prior_weeks is not None
        else ""
    )
    warned = [p for p in fleet.vms if p.warnings]
    counts: dict[str, int] = {}
    for p in warned:
        for w in p.warnings:
            kind = w.split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
    rows = []
    for p in fleet.vms:
        prov = "" if p.provisioned_gb is None else f"{p.provisioned_gb:.2f}"
        point = "" if p.point_anomalies is None else str(int(p.point_anomalies.sum()))
        rows.append(
            "<tr>"
            f"<td><a href='{vm_dir.name}/{html.escape(p.name)}.png'>{html.escape(p.name)}</a></td>"
            f"<td data-v='{p.backtest_saving}'>{100 * p.backtest_saving:.1f} %</td>"
            f"<td data-v='{p.backtest_risk}'>{100 * p.backtest_risk:.3f} %</td>"
            f"<td>{p.backtest.week.size}</td>"
            f"<td>{prov}</td>"
            f"<td>{', '.join(f'{s:g}' for s in p.sizes)}</td>"
            f"<td>{float(p.vm.usage.max()):.2f}</td>"
            f"<td>{point}</td>"
            f"<td style='text-align:left'>{html.escape('; '.join(p.warnings))}</td></tr>"
        )
    weekly = "".join(
        f"<tr><td>{_when(fleet.origin + k * WEEK):%Y-%m-%d}</td><td>{n}</td>"
        f"<td>{100 * r:.3f} %</td><td>{100 * c:.3f} %</td><td>{100 * cfg.target_risk:g} %</td></tr>"
        for k, r, c, n in fleet.weekly
    )
    start = _when(fleet.plan_start)
    prov_line = (
        f"{100 * summary['saving_vs_provisioned']:.1f} % below what was provisioned "
        f"(mem_capacity_kb, {int(summary['provisioned_vms'])} VMs)"
        if np.isfinite(summary["saving_vs_provisioned"])
        else "no provisioned capacity in the data"
    )
    page = f"""<!doctype html><html><head><meta charset='utf-8'>
<title>Fleet reservation plan</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;font-size:14px}}
td,th{{padding:2px 8px;text-align:right}} table{{border-collapse:collapse}}
tr:nth-child(even){{background:#f4f4f4}} th{{background:#ddd}} .kpi{{font-size:18px}}</style>
</head><body>
<h1>Fleet reservation plan: {len(fleet.vms)} VMs, {cfg.horizon_weeks} weeks from
{start:%Y-%m-%d %H:%M} UTC</h1>
<p class='kpi'>Planned cost <b>{summary["planned_cost"]:g}</b> price units:
<b>{100 * summary["saving_vs_max"]:.1f} %</b> below always the largest size
({summary["always_max_cost"]:g}); {prov_line}.<br>
Target risk <b>{100 * cfg.target_risk:g} %</b> of time under-provisioned;
{backtest_text(summary)} (each week at the setting calibrated on the weeks before it;
usage above the largest size, {cfg.sizes[-1]:g} {unit}, is missed whatever is reserved:
those VMs are flagged <i>capped</i>).</p>
<p><b>Settings:</b> sizes {", ".join(f"{s:g}" for s in cfg.sizes)} {unit}; prices
{", ".join(f"{p:g}" for p in cfg.price_table())} per week; fleet knob {knob_text},
calibrated on {calibrated_on} (backtested risk there {100 * fleet.knob_risk:.3f} %){per_vm};
usage distribution from the last {cfg.lookback_h / 24:g} days,
half-life {cfg.half_life_h / 24:g} days; trend guard {"on" if cfg.trend_guard else "off"};
month guard {"on" if cfg.month_guard else "off"}; cold start under {cfg.cold_start_h / 24:g}
days of history: {cfg.cold_start_factor:g} x the peak seen. Sizing uses all real usage
(WHA only marks anomalies); {fleet.excluded} samples excluded by the operator.</p>
<p><b>Warnings</b> ({len(warned)} VMs): {
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
    }.</p>
<img alt='fleet cost, weekly realised risk, per-VM saving and risk'
 src='data:image/png;base64,{_summary_plots(fleet, summary, unit)}'>
<h2>Per VM (click a header to sort; the name opens the VM's plot)</h2>
<table class='sortable'><thead><tr><th>VM</th><th>backtest saving vs always-max</th>
<th>backtest time under-provisioned</th><th>weeks backtested</th>
<th>provisioned ({unit})</th><th>planned ({unit}, per week)</th><th>peak seen ({unit})</th>
<th>WHA point anomalies (hours)</th><th>warnings</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Realised risk per backtest week</h2>
<table><tr><th>week from (UTC)</th><th>VMs</th><th>realised, all usage</th>
<th>realised, usage a size could cover</th><th>target</th></tr>{weekly}</table>
{_SORT_JS}</body></html>"""
    path.write_text(page)


def _prior_text(prior: float | str) -> str:
    if prior == "auto":
        return (
            "weighing as many of the VM's weeks as the spread between the fleet's VMs says, "
            "empirical Bayes"
        )
    return f"weighing as {float(prior):g} week of the VM's"
