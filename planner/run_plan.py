"""`vmad plan`: weekly reservations for one VM or a folder of VMs, with a backtest.

1. Backtest every VM over the fleet's aligned weeks (what each knob setting would have
   reserved, and what it would have cost and missed).
2. Calibrate the risk knob to the target risk from planner.yaml on the fleet's weeks so
   far and, per VM, on its own weeks shrunk toward the fleet's (backtest.calibrate_fleet);
   report, week by week, the realised risk (each week at the knobs calibrated on the
   weeks before it) next to the target.
3. Plan ``horizon_weeks`` from the end of the fleet's history at that knob; flag cold
   starts, gaps, VMs that stopped early, growth, and needs above the largest size.
Writes a CSV for machines and, when asked, a one-page HTML report (report.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from vmad.planner.backtest import (
    VM,
    Calibration,
    VMBacktest,
    backtest_vm,
    calibrate_fleet,
    load_fleet,
    planner_choice,
    without_intervals,
)
from vmad.planner.config import PlannerConfig, PlanningConfig
from vmad.planner.risk_sizing import (
    KNOB,
    WEEK,
    choose_size,
    conservative_knob,
    mature_h,
    week_risk,
)

__all__ = ["FleetPlan", "VMPlan", "make_fleet_plan", "plan_command", "progress"]

T = TypeVar("T")
STALE_H = 24.0  # a VM whose history ends this long before the fleet's is flagged
GAP_S = 2 * 86400.0  # a gap this long is a warning (a day-long collector outage is not)


def progress(items: Sequence[T], label: str) -> Iterator[T]:
    """A rich progress bar on a terminal; otherwise one line per 10 % (logs stay short)."""
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=label, console=None, transient=True)
        return
    n, shown = len(items), -1
    for i, item in enumerate(items):
        yield item
        tenth = (10 * (i + 1)) // max(n, 1)
        if tenth > shown:
            shown = tenth
            print(f"{label}: {i + 1}/{n} ({10 * tenth} %)", file=sys.stderr, flush=True)


@dataclass
class VMPlan:
    name: str
    vm: VM
    backtest: VMBacktest
    sizes: list[float]  # reserved per planned week
    est_risk: list[float]  # the planner's own P(usage > reserved) per week
    provisioned_gb: float | None  # last mem_capacity seen (Bitbrains)
    warnings: list[str] = field(default_factory=list)
    point_anomalies: np.ndarray | None = None  # hourly marks (WHA), for the report only
    recurrent_anomalies: np.ndarray | None = None
    first_hour: int = 0
    hourly_peaks: np.ndarray | None = None
    backtest_risk: float = float("nan")  # at the chosen knob, over its backtested weeks
    backtest_saving: float = float("nan")
    knob: int = -1  # this VM's knob for the plan (its own record shrunk toward the fleet's)
    backtest_knobs: np.ndarray | None = None  # the knob each backtest week was planned at


@dataclass
class FleetPlan:
    vms: list[VMPlan]
    config: PlanningConfig
    knob: int  # the fleet-wide knob for the plan (each VM's own: VMPlan.knob)
    knob_risk: float  # backtested risk of the fleet knob on the calibration weeks
    plan_start: float
    origin: float
    # (week, realised risk at the knob calibrated before it, the same without usage above
    # the largest size, VMs planned)
    weekly: list[tuple[int, float, float, int]]
    excluded: int  # samples removed by operator exclusions
    calibration: Calibration | None = None  # every backtest week's knobs, and the plan's


def _exclusions(config: PlanningConfig, labels_file: Path | None) -> list[tuple[str, float, float]]:
    out = [(e.vm, e.start.timestamp(), e.end.timestamp()) for e in config.exclude]
    if labels_file is not None:
        from vmad.planner.history import HistoryError

        try:
            lines = labels_file.read_text().splitlines()
        except OSError as error:
            raise HistoryError(f"{labels_file}: cannot read: {error}") from error
        for no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if item.get("anomalous", True):
                    out.append(
                        (str(item.get("vm_id", "*")), float(item["start"]), float(item["end"]))
                    )
            except (ValueError, KeyError, TypeError) as error:
                raise HistoryError(f"{labels_file}: line {no}: {error}") from error
    return out


def _mark_anomalies(plan: VMPlan, config: PlannerConfig) -> None:
    """WHA marks point and recurrent anomalies on hourly peaks: shown, never removed."""
    from vmad.planner.filtering import filter_history, hourly_peaks

    first, peaks = hourly_peaks(plan.vm.timestamps, plan.vm.usage)
    result = filter_history(peaks, "wha", config)
    plan.first_hour, plan.hourly_peaks = first, peaks
    plan.point_anomalies, plan.recurrent_anomalies = result.point, result.recurrent


def make_fleet_plan(
    vms: list[VM],
    config: PlannerConfig,
    exclusions: list[tuple[str, float, float]] = (),  # type: ignore[assignment]
    mark_anomalies: bool = True,
) -> FleetPlan:
    planning = config.planning
    sizes = np.asarray(planning.sizes, dtype=float)
    prices = planning.price_table()
    excluded = 0
    kept = []
    for vm in vms:
        mine = [(a, b) for who, a, b in exclusions if who in ("*", vm.name)]
        cut = without_intervals(vm, mine)
        excluded += vm.timestamps.size - cut.timestamps.size
        if cut.timestamps.size:
            kept.append(cut)
    if not kept:
        from vmad.planner.history import HistoryError

        raise HistoryError("no samples left to plan from (all excluded?)")
    fleet_end = max(float(vm.timestamps[-1]) for vm in kept)
    plan_start = (np.floor(fleet_end / 3600) + 1) * 3600  # the next full hour
    first = min(float(vm.timestamps[0]) for vm in kept)
    origin = plan_start - np.ceil((plan_start - first) / WEEK) * WEEK
    results = [backtest_vm(vm, origin, planning) for vm in progress(kept, "backtest")]

    last_k = round((plan_start - origin) / WEEK)
    weeks = np.concatenate([r.week for r in results]) if results else np.zeros(0)
    # Whether each VM's plan is made with its full history window (calibration stratum).
    plan_mature = np.array(
        [(plan_start - float(vm.timestamps[0])) / 3600 >= mature_h(planning) for vm in kept]
    )
    calibration = calibrate_fleet(results, planning, plan_week=last_k, plan_mature=plan_mature)
    knob, knob_risk = calibration.fleet.get(
        last_k, (conservative_knob(planning.cold_start_factor), float("nan"))
    )
    weekly = []
    for k in sorted({int(w) for w in weeks}):
        n = under = above = 0
        for r, knobs in zip(results, calibration.knobs, strict=True):
            m = r.week == k
            if m.any():
                c = r.choices[m][np.arange(int(m.sum())), knobs[m]]
                under += int(r.counts[m][np.arange(c.size), c].sum())
                above += int(r.counts[m][:, -1].sum())
                n += int(r.samples[m].sum())
        weekly.append((k, under / max(n, 1), (under - above) / max(n, 1), int((weeks == k).sum())))

    plans = []
    for i, (vm, bt) in enumerate(zip(progress(kept, "plan"), results, strict=True)):
        vm_knob = int(calibration.next_knobs[i])
        chosen, risks, warnings = [], [], []
        for ahead in range(planning.horizon_weeks):
            risk = week_risk(vm.timestamps, vm.usage, plan_start, planning, ahead)
            assert risk is not None  # every kept VM has samples before plan_start
            j = choose_size(risk, prices, vm_knob)
            chosen.append(float(sizes[j]))
            risks.append(float(risk.exceed[0][j]))
            if ahead == 0:
                if risk.cold:
                    warnings.append(
                        f"cold start: {risk.history_h / 24:.1f} days of history; reserves "
                        f"{planning.cold_start_factor:g} x the peak seen ({risk.peak:.2f} GB)"
                    )
                if risk.stale_h >= STALE_H:
                    warnings.append(
                        f"stopped early: last sample {risk.stale_h / 24:.1f} days before the "
                        "fleet's end; planned from the history that exists"
                    )
                if risk.growth_gb_week > 0:
                    warnings.append(f"growth: {risk.growth_gb_week:+.2f} GB/week projected")
            if risk.capped and not any(w.startswith("capped") for w in warnings):
                warnings.append(
                    f"capped: usage up to {risk.peak:.2f} GB expected, above the largest "
                    f"size {sizes[-1]:g} GB; reserving {sizes[-1]:g} GB will not cover it"
                )
        gaps = np.diff(vm.timestamps)
        if gaps.size and float(gaps.max()) >= GAP_S:
            warnings.append(f"gaps: longest {float(gaps.max()) / 86400:.1f} days without samples")
        # What was provisioned lately: the median of the last week's capacity samples.
        recent = vm.timestamps >= vm.timestamps[-1] - WEEK
        cap = None if vm.provisioned is None else float(np.median(vm.provisioned[recent]))
        plan = VMPlan(vm.name, vm, bt, chosen, risks, cap, warnings)
        plan.knob, plan.backtest_knobs = vm_knob, calibration.knobs[i]
        if bt.week.size:
            # Each backtest week at the knob calibrated before it (what the planner did).
            c = planner_choice(bt, calibration.knobs[i])
            w = np.arange(c.size)
            plan.backtest_risk = float(bt.counts[w, c].sum()) / max(int(bt.samples.sum()), 1)
            plan.backtest_saving = 1.0 - float(prices[c].sum()) / (float(prices[-1]) * c.size)
        plans.append(plan)
    if mark_anomalies:
        for plan in progress(plans, "mark anomalies (WHA)"):
            _mark_anomalies(plan, config)
    return FleetPlan(
        plans, planning, knob, knob_risk, plan_start, origin, weekly, excluded, calibration
    )


def _rolling_choice(fleet: FleetPlan, plan: VMPlan) -> np.ndarray:
    """The backtest's size per week, each week at the knob calibrated before it."""
    assert plan.backtest_knobs is not None
    return planner_choice(plan.backtest, plan.backtest_knobs)


def write_csv(fleet: FleetPlan, path: Path) -> None:
    prices = dict(zip(fleet.config.sizes, fleet.config.price_table(), strict=True))
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            [
                "vm",
                "week_start_utc",
                "week_end_utc",
                "reserved_gb",
                "price",
                "estimated_risk",
                "provisioned_gb",
                "backtest_risk",
                "warnings",
            ]
        )
        for plan in fleet.vms:
            for k, (size, risk) in enumerate(zip(plan.sizes, plan.est_risk, strict=True)):
                a = datetime.fromtimestamp(fleet.plan_start + k * WEEK, UTC)
                b = datetime.fromtimestamp(fleet.plan_start + (k + 1) * WEEK, UTC)
                writer.writerow(
                    [
                        plan.name,
                        a.isoformat(),
                        b.isoformat(),
                        f"{size:g}",
                        f"{prices[size]:g}",
                        f"{risk:.6f}",
                        "" if plan.provisioned_gb is None else f"{plan.provisioned_gb:.3f}",
                        f"{plan.backtest_risk:.6f}",
                        "; ".join(plan.warnings),
                    ]
                )


def plan_command(args: argparse.Namespace) -> int:
    from vmad.errors import UsageError
    from vmad.planner.config import ConfigError, load_config
    from vmad.planner.history import HistoryError

    try:
        config = load_config(args.config)
        update: dict[str, object] = {}
        if args.sizes:
            update["sizes"] = tuple(float(s) for s in args.sizes.split(","))
            update["prices"] = None
        if args.target_risk is not None:
            update["target_risk"] = args.target_risk
        if args.horizon_weeks is not None:
            update["horizon_weeks"] = args.horizon_weeks
        planning = PlanningConfig.model_validate({**config.planning.model_dump(), **update})
        config = config.model_copy(update={"planning": planning})
        vms = load_fleet(args.history, column=args.metric)
        exclusions = _exclusions(planning, args.exclude_labels)
        fleet = make_fleet_plan(vms, config, exclusions, mark_anomalies=not args.no_anomalies)
    except (ConfigError, HistoryError, ValueError, OSError) as error:
        raise UsageError(str(error)) from error
    write_csv(fleet, args.out)
    summary = fleet_summary(fleet)
    print(
        f"{len(fleet.vms)} VMs, {planning.horizon_weeks} weeks from "
        f"{datetime.fromtimestamp(fleet.plan_start, UTC):%Y-%m-%d %H:%M} UTC: planned cost "
        f"{summary['planned_cost']:g} vs always-max {summary['always_max_cost']:g} "
        f"(saving {100 * summary['saving_vs_max']:.1f} %); target risk "
        f"{100 * planning.target_risk:g} %, {backtest_text(summary)}; "
        f"{int(summary['warned'])} VMs with warnings -> {args.out}"
    )
    if args.report:
        from vmad.planner.report import write_report

        write_report(fleet, summary, args.report, unit="GB" if args.metric == "memory" else "")
        print(f"report -> {args.report}")
    return 0


def backtest_text(summary: dict[str, float]) -> str:
    """The backtested risk in words (no week to backtest is said, not printed as nan)."""
    if not np.isfinite(summary["backtest_risk"]):
        return "not backtested (no VM has a week after two weeks of history)"
    return (
        f"backtested {100 * summary['backtest_risk']:.3f} % "
        f"({100 * summary['backtest_risk_above_largest']:.3f} % above the largest size)"
    )


def fleet_summary(fleet: FleetPlan) -> dict[str, float]:
    """Totals for the report: planned cost against always-max and against provisioned."""
    prices = fleet.config.price_table()
    table = dict(zip(fleet.config.sizes, prices, strict=True))
    horizon = fleet.config.horizon_weeks
    planned = sum(table[s] for p in fleet.vms for s in p.sizes)
    always = float(prices[-1]) * horizon * len(fleet.vms)
    with_cap = [p for p in fleet.vms if p.provisioned_gb is not None]
    per_gb = float(prices[-1]) / float(fleet.config.sizes[-1])
    provisioned = sum(p.provisioned_gb * per_gb * horizon for p in with_cap)  # type: ignore[operator]
    planned_cap = sum(table[s] for p in with_cap for s in p.sizes)
    under = above_largest = samples = 0.0
    for p in fleet.vms:
        c = _rolling_choice(fleet, p)
        i = np.arange(c.size)
        under += float(p.backtest.counts[i, c].sum())
        above_largest += float(p.backtest.counts[:, -1].sum())
        samples += float(p.backtest.samples.sum())
    return {
        "planned_cost": planned,
        "always_max_cost": always,
        "saving_vs_max": 1.0 - planned / always if always else 0.0,
        "provisioned_cost": provisioned,
        "saving_vs_provisioned": 1.0 - planned_cap / provisioned if provisioned else float("nan"),
        "provisioned_vms": float(len(with_cap)),
        "backtest_risk": under / samples if samples else float("nan"),
        # Usage above the largest size: missed whatever is reserved (capped VMs).
        "backtest_risk_above_largest": above_largest / samples if samples else float("nan"),
        "warned": float(sum(1 for p in fleet.vms if p.warnings)),
        "knob_lambda": float(KNOB[fleet.knob][0]),
    }
