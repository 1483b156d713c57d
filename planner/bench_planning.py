"""`vmad bench planning`: rolling-origin evaluation of reservation policies.

For every VM: split the trace into weeks counted from its first sample; for each week from
the third on, every policy sees only the samples before the week starts (rolling origin:
train on the past, plan the next week, slide by one week) and reserves one size for it.
Scores are pooled over all planned VM-weeks: time share under-provisioned, unserved
share of demand, idle share of the reservation, and saving against always the largest
size (price per size from the price table, proportional to size by default).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from vmad.planner import sizing
from vmad.planner.config import PlannerConfig
from vmad.planner.scores import overestimate, underestimate, underestimate_frequency

__all__ = ["VM", "bench_command", "compute_needs", "load_bitbrains", "score_needs"]

KB_PER_GB = 2.0**20
HOUR = 3600
WEEK = 7 * 24 * HOUR


@dataclass
class VM:
    name: str
    timestamps: np.ndarray  # epoch s
    usage: np.ndarray  # GB
    provisioned: np.ndarray | None = None  # GB, what the trace actually reserved


def load_bitbrains(root: Path, max_gb: float = 16.0, limit: int | None = None) -> list[VM]:
    """Memory usage in GB (kB / 2^20) of the VMs whose usage fits the largest size."""
    from vmad.planner.history import read_history

    vms = []
    for path in sorted(root.glob("vm-*.csv*")):
        use = read_history(path, column="mem_usage_kb", scale=1 / KB_PER_GB)
        if float(use.values.max()) > max_gb:
            continue
        cap = read_history(path, column="mem_capacity_kb", scale=1 / KB_PER_GB)
        vms.append(VM(use.name, use.timestamps, use.values, cap.values))
        if limit is not None and len(vms) >= limit:
            break
    return vms


# A rule: (vm, index where the week starts, index where it ends) -> need in GB before
# the margin (the frontier scales needs by 1 + margin, then rounds up to a size).
Rule = Callable[[VM, int, int], float]

# Methods whose need is a fixed ceiling or known only afterwards: the margin does not apply.
NO_MARGIN = ("always-max", "weekly oracle")


@dataclass
class Tally:
    """Pooled over VM-weeks, so long-lived VMs weigh by their time, like the reference."""

    cost: float = 0.0
    max_cost: float = 0.0
    under_time: float = 0.0
    under_area: float = 0.0
    usage_area: float = 0.0
    idle_area: float = 0.0
    reserved_area: float = 0.0
    samples: int = 0
    weeks: int = 0

    def add(self, actual: np.ndarray, reserved: np.ndarray, price: float, max_price: float) -> None:
        n = actual.size
        self.cost += price
        self.max_cost += max_price
        self.under_time += underestimate_frequency(actual, reserved) * n
        self.usage_area += float(actual.sum())
        self.under_area += underestimate(actual, reserved) * float(actual.sum())
        self.reserved_area += float(reserved.sum())
        self.idle_area += overestimate(actual, reserved) * float(reserved.sum())
        self.samples += n
        self.weeks += 1

    def row(self) -> dict[str, float]:
        return {
            "saving_pct": 100.0 * (1.0 - self.cost / self.max_cost),
            "under_time_pct": 100.0 * self.under_time / self.samples,
            "under_area_pct": 100.0 * self.under_area / self.usage_area,
            "over_pct": 100.0 * self.idle_area / self.reserved_area,
            "weeks": float(self.weeks),
        }


def week_bounds(timestamps: np.ndarray) -> list[tuple[int, int]]:
    edges = timestamps[0] + WEEK * np.arange(int((timestamps[-1] - timestamps[0]) // WEEK) + 2)
    idx = np.searchsorted(timestamps, edges)
    return [(int(a), int(b)) for a, b in pairwise(idx) if b > a]


def rule_needs(sizes: tuple[float, ...]) -> dict[str, Rule]:
    """The baselines, as needs before margin."""

    def last_week(vm: VM, start: int, end: int) -> float:
        since = np.searchsorted(vm.timestamps, vm.timestamps[start] - WEEK)
        return float(vm.usage[since:start].max())

    def p99(vm: VM, start: int, end: int) -> float:
        since = np.searchsorted(vm.timestamps, vm.timestamps[start] - 4 * WEEK)
        return float(np.percentile(vm.usage[since:start], 99.0)) * 1.1

    def vpa(vm: VM, start: int, end: int) -> float:
        step = float(np.median(np.diff(vm.timestamps[:start])))
        return sizing.vpa_target(vm.usage[:start], step)

    return {
        "always-max": lambda vm, s, e: float(max(sizes)),
        "weekly oracle": lambda vm, s, e: float(vm.usage[s:e].max()),
        "last week max": last_week,
        "p99 4 weeks x1.1": p99,
        "VPA-style p95 decaying +15%": vpa,
    }


def forecast_needs(vm: VM, config: PlannerConfig, quick: bool) -> dict[str, list[float]]:
    """Per planned week, the peak of each forecasting method's forecast for that week."""
    import torch

    from vmad.planner.filtering import filter_history, hourly_peaks
    from vmad.planner.forecast import LSTMForecaster, seasonal_naive

    torch.set_num_threads(1)  # one process per VM; threads would only fight for cores
    first_hour, peaks = hourly_peaks(vm.timestamps, vm.usage)
    weeks = week_bounds(vm.timestamps)[2:]
    week_hours = [int(vm.timestamps[s] // 3600) - first_hour for s, _ in weeks]
    lookback = config.planning.lookback_h
    out: dict[str, list[float]] = {}
    cleaned_wha = filter_history(peaks, "wha", config).cleaned
    out["seasonal naive (WHA-filtered)"] = [
        float(seasonal_naive(cleaned_wha[:h], 168).max()) for h in week_hours
    ]
    for name in ("none", "la", "dla", "wha"):
        cleaned = cleaned_wha if name == "wha" else filter_history(peaks, name, config).cleaned
        model = (
            LSTMForecaster(hidden=16, epochs=8, finetune_epochs=2)
            if quick
            else LSTMForecaster(hidden=32, epochs=15, finetune_epochs=3)
        )
        needs = []
        for h in week_hours:
            since = max(0, h - lookback)
            model.fit(cleaned[since:h], hour0=first_hour + since)
            fc = model.forecast(cleaned[:h], 168, hour0=first_hour)
            needs.append(float(fc.max()))
        out[f"LSTM ({name.upper() if name != 'none' else 'no filter'})"] = needs
    return out


def _needs_for_vm(args: tuple[VM, PlannerConfig, bool, bool]) -> dict[str, list[float]]:
    vm, config, quick, with_lstm = args
    sizes = tuple(float(s) for s in config.planning.sizes)
    weeks = week_bounds(vm.timestamps)[2:]
    needs = {name: [rule(vm, s, e) for s, e in weeks] for name, rule in rule_needs(sizes).items()}
    if with_lstm:
        needs.update(forecast_needs(vm, config, quick))
    return needs


def compute_needs(
    vms: list[VM], config: PlannerConfig, quick: bool, with_lstm: bool = True, workers: int = 2
) -> list[dict[str, list[float]]]:
    jobs = [(vm, config, quick, with_lstm) for vm in vms]
    if workers <= 1 or len(vms) <= 1:
        return [_needs_for_vm(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_needs_for_vm, jobs, chunksize=1)


def score_needs(
    vms: list[VM],
    needs: list[dict[str, list[float]]],
    sizes: tuple[float, ...],
    prices: tuple[float, ...] | None,
    margin: float,
) -> dict[str, dict[str, float]]:
    """Round each need (x (1 + margin)) up to a size, reserve it for the week, score."""
    table = dict(zip(sizes, prices if prices is not None else sizes, strict=True))
    max_price = table[max(sizes)]
    tallies: dict[str, Tally] = {}
    provisioned = Tally()
    for vm, vm_needs in zip(vms, needs, strict=True):
        weeks = week_bounds(vm.timestamps)[2:]
        for name, values in vm_needs.items():
            m = 0.0 if name in NO_MARGIN else margin
            tally = tallies.setdefault(name, Tally())
            for (start, end), need in zip(weeks, values, strict=True):
                size = sizing.smallest_covering(need * (1.0 + m), sizes)
                actual = vm.usage[start:end]
                tally.add(actual, np.full(actual.size, size), table[size], max_price)
        if vm.provisioned is not None:
            for start, end in weeks:
                # The trace's own reservation: price proportional to the mean size held.
                cap, actual = vm.provisioned[start:end], vm.usage[start:end]
                provisioned.add(actual, cap, float(cap.mean()) * max_price / max(sizes), max_price)
    rows = {name: t.row() for name, t in tallies.items()}
    if provisioned.weeks:
        rows["trace provisioned"] = provisioned.row()
    return rows


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| method | saving vs always-max | time under-provisioned | unserved demand "
        "| idle reserved | VM-weeks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['saving_pct']:.1f} % | {r['under_time_pct']:.3f} % | "
            f"{r['under_area_pct']:.3f} % | {r['over_pct']:.1f} % | {int(r['weeks'])} |"
        )
    return "\n".join(lines)


def frontier_plot(
    frontier: dict[float, dict[str, dict[str, float]]], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    margins = sorted(frontier)
    names = [n for n in frontier[margins[0]] if n not in ("always-max", "trace provisioned")]
    for name in names:
        xs = [frontier[m][name]["under_time_pct"] for m in margins]
        ys = [frontier[m][name]["saving_pct"] for m in margins]
        style = "*" if name in NO_MARGIN else "o-"
        ax.plot(xs, ys, style, label=name, markersize=10 if name in NO_MARGIN else 4)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("time under-provisioned (%)")
    ax.set_ylabel("saving vs always-max (%)")
    ax.set_title(f"{title}\nsafety margin {margins[0]:g} to {margins[-1]:g} (left = larger margin)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_table(frontier: dict[float, dict[str, dict[str, float]]]) -> str:
    margins = sorted(frontier)
    names = [n for n in frontier[margins[0]] if n not in NO_MARGIN and n != "trace provisioned"]
    head = "| method | " + " | ".join(f"margin {m:g}" for m in margins) + " |"
    lines = [
        "saving % / time under-provisioned % at each safety margin",
        "",
        head,
        "|---|" + "---:|" * len(margins),
    ]
    for name in names:
        cells = [
            f"{frontier[m][name]['saving_pct']:.1f} / {frontier[m][name]['under_time_pct']:.3f}"
            for m in margins
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    from vmad.planner.config import load_config

    config = load_config(args.config)
    sizes = tuple(float(s) for s in config.planning.sizes)
    started = time.perf_counter()
    if str(args.data) == "synthetic":
        from vmad.planner.synthetic import synthetic_fleet

        vms = synthetic_fleet(n=4 if args.quick else 24, weeks=8 if args.quick else 16)
        title = "synthetic VMs (growth, weekly cycle, point spikes, monthly jobs)"
    else:
        limit = args.max_vms if args.max_vms is not None else (4 if args.quick else None)
        vms = load_bitbrains(args.data, max_gb=max(sizes), limit=limit)
        title = f"Bitbrains Rnd, {len(vms)} VMs that fit {max(sizes):g} GB"
    if not vms:
        from vmad.errors import UsageError

        raise UsageError(f"{args.data}: no VMs found")
    needs = compute_needs(vms, config, args.quick, with_lstm=not args.no_lstm, workers=args.workers)
    margins = sorted({float(m) for m in args.margins.split(",")} | {0.0, config.planning.margin})
    frontier = {m: score_needs(vms, needs, sizes, config.planning.prices, m) for m in margins}
    text = format_table(frontier[0.0], f"{title}, margin 0 (rules exactly as named)")
    text += "\n\n" + format_table(
        frontier[config.planning.margin], f"{title}, safety margin {config.planning.margin:g}"
    )
    text += "\n\n" + frontier_table(frontier)
    print(text)
    print(f"\n({len(vms)} VMs, {time.perf_counter() - started:.0f} s)")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plot:
        frontier_plot(frontier, args.plot, title)
    return 0
