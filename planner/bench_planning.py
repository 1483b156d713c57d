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
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from planner import sizing
from planner.scores import overestimate, underestimate, underestimate_frequency

__all__ = ["VM", "bench_command", "evaluate", "load_bitbrains"]

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
    from planner.history import read_history

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


# A policy: (vm, index where the week starts, index where it ends) -> size for the week.
Policy = Callable[[VM, int, int], float]


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
    extra: dict[str, float] = field(default_factory=dict)

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


def evaluate(
    vms: list[VM],
    policies: dict[str, Policy],
    sizes: tuple[float, ...],
    prices: tuple[float, ...] | None = None,
    first_week: int = 2,
) -> dict[str, dict[str, float]]:
    table = dict(zip(sizes, prices if prices is not None else sizes, strict=True))
    max_price = table[max(sizes)]
    tallies = {name: Tally() for name in policies}
    provisioned = Tally()
    for vm in vms:
        for week, (start, end) in enumerate(week_bounds(vm.timestamps)):
            if week < first_week:
                continue
            actual = vm.usage[start:end]
            for name, policy in policies.items():
                size = policy(vm, start, end)
                tallies[name].add(actual, np.full(actual.size, size), table[size], max_price)
            if vm.provisioned is not None:
                # The trace's own reservation: price proportional to the mean size held.
                cap = vm.provisioned[start:end]
                provisioned.add(actual, cap, float(cap.mean()) * max_price / max(sizes), max_price)
    rows = {name: t.row() for name, t in tallies.items()}
    if provisioned.weeks:
        rows["trace provisioned"] = provisioned.row()
    return rows


def rule_policies(sizes: tuple[float, ...], margin: float = 0.0) -> dict[str, Policy]:
    """The baselines; ``margin`` scales the two simple rules for the frontier."""

    def last_week(vm: VM, start: int, end: int) -> float:
        prev = vm.timestamps[start] - WEEK
        return sizing.last_period_max(
            vm.usage[np.searchsorted(vm.timestamps, prev) : start], sizes, margin
        )

    def p99(vm: VM, start: int, end: int) -> float:
        since = np.searchsorted(vm.timestamps, vm.timestamps[start] - 4 * WEEK)
        return sizing.percentile_rule(vm.usage[since:start], sizes, factor=1.1 * (1.0 + margin))

    def vpa(vm: VM, start: int, end: int) -> float:
        step = float(np.median(np.diff(vm.timestamps[:start])))
        return sizing.vpa_recommendation(vm.usage[:start], step, sizes, margin=0.15 + margin)

    return {
        "always-max": lambda vm, s, e: sizing.always_max(sizes),
        "weekly oracle": lambda vm, s, e: sizing.oracle(vm.usage[s:e], sizes),
        "last week max": last_week,
        "p99 4 weeks x1.1": p99,
        "VPA-style p95 decaying": vpa,
    }


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


def bench_command(args: argparse.Namespace) -> int:
    from planner.config import load_config

    config = load_config(args.config)
    sizes = tuple(float(s) for s in config.planning.sizes)
    started = time.perf_counter()
    if str(args.data) == "synthetic":
        from planner.synthetic import synthetic_fleet

        vms = synthetic_fleet(n=4 if args.quick else 24, weeks=8 if args.quick else 16)
        title = "synthetic VMs (growth, weekly cycle, point spikes, monthly jobs)"
    else:
        limit = args.max_vms if args.max_vms is not None else (4 if args.quick else None)
        vms = load_bitbrains(args.data, max_gb=max(sizes), limit=limit)
        title = f"Bitbrains Rnd, {len(vms)} VMs that fit {max(sizes):g} GB"
    rows = evaluate(vms, rule_policies(sizes), sizes, config.planning.prices)
    text = format_table(rows, title)
    print(text)
    print(f"\n({len(vms)} VMs, {time.perf_counter() - started:.1f} s)")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0
