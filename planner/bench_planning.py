"""`vmad bench planning`: rolling-origin evaluation of weekly reservation policies.

Weeks are aligned across the fleet from its first sample; a VM-week is planned once the
VM has two weeks of history, and every method sees only the samples before the week
starts (backtest.py). The planner's risk target is calibrated, week by week, on the
fleet's weeks before it and each VM's own (never on the week it plans). Scores are
pooled over VM-weeks; every row has a 95 % bootstrap interval over VMs. ``--split``
adds a carry-over check: the fleet part of the calibration from half the VMs, scored on
the other half.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vmad.planner.backtest import (
    VM,
    VMBacktest,
    backtest_vm,
    bootstrap_ci,
    calibrate_fleet,
    from_week,
    load_fleet,
    planner_choice,
    provisioned_totals,
    totals,
)
from vmad.planner.config import PlanningConfig

__all__ = ["SWEEP", "bench_command", "run_backtests", "score_methods"]

# Risk targets of the sweep: 0.02 ... 1 %, spanning the look-back rules' risks.
SWEEP = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01)
# "Steady state": the weeks after the fleet's first STEADY_WEEKS + 1 planned weeks (as
# before: after a 4-week calibration window had filled), so every week scored there was
# calibrated on at least 5 fleet weeks.
STEADY_WEEKS = 4

BASELINE_ROWS = {
    "always-max": "always the largest size",
    "weekly-oracle": "each week's actual peak (known only afterwards)",
    "last-week-max": "last week's peak",
    "p99-4-weeks-x1.1": "p99 of the last 4 weeks x 1.1",
    "vpa": "Kubernetes VPA recommender (memory: daily peaks, p90 + 15 %, OOM bump)",
    "compute-optimizer": "AWS Compute Optimizer defaults (14-day peak + 20 %)",
}


def _backtest_job(job: tuple[VM, float, PlanningConfig]) -> VMBacktest:
    vm, origin, config = job
    return backtest_vm(vm, origin, config)


def run_backtests(vms: list[VM], config: PlanningConfig, workers: int = 1) -> list[VMBacktest]:
    origin = float(min(vm.timestamps[0] for vm in vms))
    jobs = [(vm, origin, config) for vm in vms]
    if workers <= 1 or len(vms) <= 1:
        return [_backtest_job(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_backtest_job, jobs, chunksize=1)


def _row(t) -> dict[str, object]:
    row: dict[str, object] = dict(t.pooled())
    ci = bootstrap_ci(t)
    row["saving_ci"] = list(ci["saving"])
    row["under_provisioned_time_ci"] = list(ci["under_provisioned_time"])
    return row


def score_methods(
    results: list[VMBacktest],
    config: PlanningConfig,
    targets: tuple[float, ...] = SWEEP,
    steady: bool = False,
    pool: list[VMBacktest] | None = None,
) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    """(methods table, risk-target sweep). Shares in [0, 1].

    steady: score only the weeks after the planner's first ``STEADY_WEEKS`` + 1 planned
    weeks (its calibration has at least that many weeks behind it); the knobs are the
    same. pool: the fleet part of the calibration from these VMs (split check).
    """
    prices = config.price_table()
    results = [r for r in results if r.week.size]
    pool = None if pool is None else [r for r in pool if r.week.size]
    choice_by_target = {}
    for t in sorted({*targets, config.target_risk}):
        knobs = calibrate_fleet(results, config, t, pool=pool).knobs
        choice_by_target[t] = [planner_choice(r, k) for r, k in zip(results, knobs, strict=True)]
    if steady:
        weeks = [r.week for r in [*results, *(pool or [])]]
        first = min(int(w.min()) for w in weeks) + STEADY_WEEKS + 1
        keep = [r.week >= first for r in results]
        choice_by_target = {
            t: [c[m] for c, m in zip(cs, keep, strict=True)] for t, cs in choice_by_target.items()
        }
        results = [from_week(r, first) for r in results]
        kept = [i for i, r in enumerate(results) if r.week.size]
        results = [results[i] for i in kept]
        choice_by_target = {t: [cs[i] for i in kept] for t, cs in choice_by_target.items()}
        if not results:  # a history too short to have a steady state
            return {}, {}
    methods: dict[str, dict[str, object]] = {}
    top = len(config.sizes) - 1
    choices = {"always-max": [np.full(r.week.size, top) for r in results]}
    for name in BASELINE_ROWS:
        if name != "always-max":
            choices[name] = [r.methods[name] for r in results]
    for name, choice in choices.items():
        methods[name] = _row(totals(results, choice, prices))
    trace = provisioned_totals(results, prices)
    if trace is not None:
        methods["trace-provisioned"] = _row(trace)
    sweep: dict[str, dict[str, object]] = {}
    for target, choice in choice_by_target.items():
        row = _row(totals(results, choice, prices))
        row["target"] = target
        sweep[f"{target:g}"] = row
        if target == config.target_risk:
            methods["planner"] = {k: v for k, v in row.items() if k != "target"}
    return methods, sweep


def _pct(x: float, digits: int) -> str:
    return f"{100 * x:.{digits}f}"


def format_tables(
    methods: dict[str, dict[str, object]],
    sweep: dict[str, dict[str, object]],
    title: str,
    config: PlanningConfig,
) -> str:
    def cells(r: dict[str, object]) -> str:
        s, (s_lo, s_hi) = r["saving"], r["saving_ci"]
        u, (u_lo, u_hi) = r["under_provisioned_time"], r["under_provisioned_time_ci"]
        return (
            f"{_pct(s, 1)} % [{_pct(s_lo, 1)}, {_pct(s_hi, 1)}] | "  # type: ignore[arg-type]
            f"{_pct(u, 3)} % [{_pct(u_lo, 3)}, {_pct(u_hi, 3)}] | "  # type: ignore[arg-type]
            f"{_pct(r['unserved_demand'], 3)} %"  # type: ignore[arg-type]
        )

    lines = [
        f"**{title}**",
        "",
        "| method | saving vs always-max [95 % CI] | time under-provisioned [95 % CI] "
        "| unserved demand |",
        "|---|---:|---:|---:|",
    ]
    described = {
        **BASELINE_ROWS,
        "planner": f"planner, target risk {_pct(config.target_risk, 2)} %",
        "trace-provisioned": "what the trace provisioned (mem_capacity_kb)",
    }
    for name, r in methods.items():
        lines.append(f"| {name}: {described.get(name, name)} | {cells(r)} |")
    lines += [
        "",
        "Risk-target sweep (planner; each week's knob calibrated on "
        + (
            f"the fleet's previous {config.calibration_weeks} weeks"
            if config.calibration_weeks
            else "every fleet week before it"
        )
        + (
            ", per VM shrunk toward the fleet ("
            + (
                "prior read from the fleet's record"
                if config.vm_prior_weeks == "auto"
                else f"{config.vm_prior_weeks:g} week prior"
            )
            + (", early and mature decisions apart" if config.calibration_strata else "")
            + ")"
            if config.vm_prior_weeks is not None
            else ""
        )
        + "):",
        "",
        "| target risk | realised time under-provisioned [95 % CI] | saving [95 % CI] |",
        "|---:|---:|---:|",
    ]
    for r in sweep.values():
        u, (u_lo, u_hi) = r["under_provisioned_time"], r["under_provisioned_time_ci"]
        s, (s_lo, s_hi) = r["saving"], r["saving_ci"]
        lines.append(
            f"| {_pct(r['target'], 2)} % | {_pct(u, 3)} % [{_pct(u_lo, 3)}, {_pct(u_hi, 3)}] "  # type: ignore[arg-type]
            f"| {_pct(s, 1)} % [{_pct(s_lo, 1)}, {_pct(s_hi, 1)}] |"  # type: ignore[arg-type]
        )
    lines += ["", verdict(methods), "", *frontier_verdicts(methods, sweep)]
    return "\n".join(lines)


def format_split(split: dict[str, object], title: str, config: PlanningConfig) -> str:
    """The split check as a table: each half scored with its own calibration and with the
    other half's fleet rates (each VM's own record is its own in both)."""
    lines = [
        f"**{title}: split check (even-numbered VMs = A, odd = B), target "
        f"{_pct(config.target_risk, 2)} %**",
        "",
        "| half | planner, own half's calibration | planner, other half's fleet rates "
        "| last-week-max |",
        "|---|---:|---:|---:|",
    ]

    def cell(r: dict[str, object]) -> str:
        return f"{_pct(r['saving'], 1)} % at {_pct(r['under_provisioned_time'], 3)} %"  # type: ignore[arg-type]

    for name, row in split.items():
        own = row["own"]  # type: ignore[index]
        lines.append(
            f"| {name} | {cell(own['planner'])} | {cell(row['other_half'])} "  # type: ignore[index]
            f"| {cell(own['last-week-max'])} |"  # type: ignore[index]
        )
    return "\n".join(lines)


LOOK_BACK_RULES = ("last-week-max", "p99-4-weeks-x1.1", "vpa", "compute-optimizer")


def _dominates(u: float, s: float, risk: float, saving: float) -> bool:
    """(u, s) has at least ``saving`` at no more than ``risk``, one of them strictly."""
    return u <= risk and s >= saving and (u < risk or s > saving)


def frontier_verdicts(
    methods: dict[str, dict[str, object]], sweep: dict[str, dict[str, object]]
) -> list[str]:
    """Per look-back rule: does the planner beat it on the saving-risk frontier?

    Beaten = some point of the planner's sweep has at least its saving at no more risk
    (one of the two strictly better); at the default target first. Otherwise the saving the
    planner's curve gives at the rule's risk (linear between sweep points), when the
    sweep spans that risk: beaten when it is more than the rule's.
    """
    points = sorted(
        (float(r["under_provisioned_time"]), float(r["saving"]), float(r["target"]))  # type: ignore[arg-type]
        for r in sweep.values()
    )
    planner = methods.get("planner")
    lines = []
    for name in LOOK_BACK_RULES:
        if name not in methods or planner is None:
            continue
        risk, saving = (
            float(methods[name]["under_provisioned_time"]),
            float(methods[name]["saving"]),
        )  # type: ignore[arg-type]
        rule = f"{name} ({_pct(saving, 1)} % at {_pct(risk, 3)} %)"

        p_u, p_s = float(planner["under_provisioned_time"]), float(planner["saving"])  # type: ignore[arg-type]
        if _dominates(p_u, p_s, risk, saving):
            lines.append(f"- {rule}: beaten at the default target: met")
            continue
        win = [t for u, s, t in points if _dominates(u, s, risk, saving)]
        if win:
            lines.append(
                f"- {rule}: beaten on the frontier (by the planner at target "
                f"{_pct(win[0], 2)} %; not at the default target): met"
            )
            continue
        risks = [u for u, _, _ in points]
        if risks and risks[0] <= risk <= risks[-1]:
            at = float(np.interp(risk, risks, [s for _, s, _ in points]))
            if at > saving:
                lines.append(
                    f"- {rule}: beaten on the curve (the planner's sweep gives {_pct(at, 1)} "
                    "% saving at that risk, straight line between its points): met"
                )
                continue
            lines.append(
                f"- {rule}: NOT beaten: the planner's curve gives {_pct(at, 1)} % saving at "
                "that risk: missed"
            )
        else:
            lines.append(f"- {rule}: NOT beaten (outside the planner's swept risks): missed")
    return ["Against each look-back rule (saving-risk frontier):", "", *lines] if lines else []


def verdict(methods: dict[str, dict[str, object]]) -> str:
    """One sentence, planner against last week's max, stated whichever way it falls."""
    p, b = methods["planner"], methods["last-week-max"]
    more_saving = p["saving"] > b["saving"]  # type: ignore[operator]
    no_more_risk = p["under_provisioned_time"] <= b["under_provisioned_time"]  # type: ignore[operator]
    s = (
        f"planner {_pct(p['saving'], 1)} % saving at {_pct(p['under_provisioned_time'], 3)} % "  # type: ignore[arg-type]
        f"under-provisioned vs last-week-max {_pct(b['saving'], 1)} % at "  # type: ignore[arg-type]
        f"{_pct(b['under_provisioned_time'], 3)} %"  # type: ignore[arg-type]
    )
    if more_saving and no_more_risk:
        return f"Verdict: the planner beats last-week-max ({s})."
    return f"Verdict: the planner does NOT beat last-week-max at no more risk ({s})."


def sweep_plot(
    methods: dict[str, dict[str, object]],
    sweep: dict[str, dict[str, object]],
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))

    def err(r: dict[str, object], key: str) -> list[list[float]]:
        lo, hi = r[f"{key}_ci"]  # type: ignore[misc]
        return [[100 * (r[key] - lo)], [100 * (hi - r[key])]]  # type: ignore[operator]

    for name, r in methods.items():
        if name in ("always-max", "planner"):
            continue
        ax.errorbar(
            100 * r["under_provisioned_time"],  # type: ignore[operator]
            100 * r["saving"],  # type: ignore[operator]
            xerr=err(r, "under_provisioned_time"),
            yerr=err(r, "saving"),
            fmt="o",
            capsize=3,
            label=name,
        )
    rows = list(sweep.values())
    ax.errorbar(
        [100 * r["under_provisioned_time"] for r in rows],  # type: ignore[operator]
        [100 * r["saving"] for r in rows],  # type: ignore[operator]
        xerr=np.hstack([err(r, "under_provisioned_time") for r in rows]),
        yerr=np.hstack([err(r, "saving") for r in rows]),
        fmt="s-",
        color="black",
        capsize=3,
        label="planner (targets " + ", ".join(f"{100 * r['target']:g} %" for r in rows) + ")",  # type: ignore[operator]
    )
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("time under-provisioned (%)")
    ax.set_ylabel("saving vs always-max (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_command(args: argparse.Namespace) -> int:
    from vmad.errors import UsageError
    from vmad.planner.config import ConfigError, load_config
    from vmad.planner.history import HistoryError

    try:
        config = load_config(args.config).planning
    except ConfigError as error:
        raise UsageError(str(error)) from error
    started = time.perf_counter()
    if str(args.data) == "synthetic":
        from vmad.planner.synthetic import synthetic_fleet

        vms = synthetic_fleet(n=4 if args.quick else 24, weeks=8 if args.quick else 16)
        title = "synthetic VMs (growth, weekly cycle, point spikes, monthly jobs)"
    else:
        limit = args.max_vms if args.max_vms is not None else (6 if args.quick else None)
        try:
            vms = load_fleet(args.data, max_gb=max(config.sizes), limit=limit)
        except HistoryError as error:
            raise UsageError(str(error)) from error
        title = f"{args.data.name}: {len(vms)} VMs that fit {max(config.sizes):g} GB"
    if not vms:
        raise UsageError(f"{args.data}: no VMs found")
    results = run_backtests(vms, config, workers=args.workers)
    if not any(r.week.size for r in results):
        raise UsageError(
            f"{args.data}: no VM has a week after {config.cold_start_h / 24:g} days of history"
        )
    methods, sweep = score_methods(results, config)
    steady_methods, steady_sweep = score_methods(results, config, steady=True)
    weeks = sum(int(r.week.size) for r in results)
    text = format_tables(methods, sweep, f"{title}, all {weeks} planned VM-weeks", config)
    if steady_methods:
        text += "\n\n" + format_tables(
            steady_methods,
            steady_sweep,
            f"{title}, steady state: weeks after the fleet's first {STEADY_WEEKS + 1} "
            "planned weeks",
            config,
        )
    split: dict[str, object] = {}
    if args.split:
        # Carry-over: the fleet's rates from the even-numbered VMs (A) calibrate the
        # odd-numbered ones (B) and the other way round; each half is scored with the
        # other's calibration, next to the same half with its own.
        halves = {"A": results[0::2], "B": results[1::2]}
        for name, other in (("A", "B"), ("B", "A")):
            own, _ = score_methods(halves[name], config, targets=(config.target_risk,))
            cross, _ = score_methods(
                halves[name], config, targets=(config.target_risk,), pool=halves[other]
            )
            split[name] = {"own": own, "other_half": cross["planner"]}
        text += "\n\n" + format_split(split, title, config)
    # How often the growth guard was in force (the month guard needs no note: it is on
    # whenever the same week a month back has samples).
    grown = sum(1 for r in results for notes in r.flags if any("growth" in n for n in notes))
    text += (
        f"\n\nGrowth guard (Theil-Sen slope of daily peaks, 90 % interval above 0) in force in "
        f"{grown} of {weeks} planned VM-weeks."
    )
    print(text)
    print(f"\n({len(vms)} VMs, {time.perf_counter() - started:.0f} s)")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        report = {
            "methods": methods,
            "sweep": sweep,
            "steady_state": {"methods": steady_methods, "sweep": steady_sweep},
        }
        if split:
            report["split"] = split
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        sweep_plot(methods, sweep, args.plot, f"{title}, all planned VM-weeks")
    return 0
