"""Experiment (not in the planner): a pooled linear quantile regression of next week's
peak, fitted by pinball loss, as the planner's probabilistic margin instead of the
per-VM conformal calibration; measured, not shipped (docs/planning.md, "Not done").

For every planned VM-week: y = log(next week's peak / last week's peak); features from
the samples before the week: log ratios to last week's peak of last week's p99, the
4-week peak, the peak of the same week a month back and the last day's peak. For week w,
one linear model per quantile level is fitted (scipy linprog, HiGHS) on every VM-week
before w; the reservation is the smallest size >= last peak x exp(prediction). The level
is calibrated like the knob: the cheapest level whose decisions on the weeks before w
(each made by a model fitted before its own week) meet the target, pooled over the fleet;
with none, 1.5 x last week's peak. Usage above the largest size is left out of the
calibration, as in the planner.

    python scripts/planning_quantile_experiment.py bitbrains A   # even-numbered VMs
    python scripts/planning_quantile_experiment.py synthetic all
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

from vmad.planner.backtest import load_fleet
from vmad.planner.bench_planning import SWEEP, run_backtests
from vmad.planner.config import PlanningConfig
from vmad.planner.risk_sizing import WEEK
from vmad.planner.synthetic import synthetic_fleet

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
FLOOR_GB = 0.01  # ratios of idle VMs stay finite


def pinball_fit(x: np.ndarray, y: np.ndarray, level: float) -> np.ndarray:
    """Linear quantile regression: min sum of pinball losses (an LP); level 1 = the
    largest ratio seen (an upper envelope)."""
    n, p = x.shape
    if level >= 1.0:
        return np.r_[y.max(), np.zeros(p - 1)]
    cost = np.r_[np.zeros(2 * p), level * np.ones(n), (1 - level) * np.ones(n)]
    a_eq = np.hstack([x, -x, np.eye(n), -np.eye(n)])
    solution = linprog(cost, A_eq=a_eq, b_eq=y, bounds=(0, None), method="highs").x
    return solution[:p] - solution[p : 2 * p]


def main(name: str, half: str) -> None:
    config = PlanningConfig()
    sizes, prices = np.asarray(config.sizes, dtype=float), config.price_table()
    vms = (
        synthetic_fleet()
        if name == "synthetic"
        else load_fleet(Path("../shared/datasets/bitbrains-rnd"), max_gb=max(config.sizes))
    )
    vms = {"A": vms[0::2], "B": vms[1::2]}.get(half, vms)
    results = run_backtests(vms, config)
    origin = float(min(vm.timestamps[0] for vm in vms))
    rows = []
    for vm, r in zip(vms, results, strict=True):
        t_all, u_all = vm.timestamps, vm.usage
        for j, k in enumerate(r.week):
            start = origin + int(k) * WEEK
            a, b = np.searchsorted(t_all, [start, start + WEEK])
            t, x = t_all[:a], u_all[:a]
            last = x[t >= min(start, float(t[-1]) + 1) - WEEK]

            def peak(values: np.ndarray, default: float) -> float:
                return max(float(values.max()) if values.size else default, FLOOR_GB)

            m = peak(last, FLOOR_GB)
            feats = [
                1.0,
                np.log(max(float(np.percentile(last, 99)), FLOOR_GB) / m),
                np.log(peak(x[t >= start - 4 * WEEK], m) / m),
                np.log(peak(x[(t >= start - 4 * WEEK) & (t < start - 3 * WEEK)], m) / m),
                np.log(peak(x[t >= start - 86400], m) / m),
            ]
            y = np.log(peak(u_all[a:b], m) / m)
            under = r.counts[j] - r.counts[j, -1]
            rows.append((int(k), feats, y, m, under, r.counts[j], int(r.samples[j])))
    week = np.array([row[0] for row in rows])
    feats = np.array([row[1] for row in rows])
    y = np.array([row[2] for row in rows])
    peak_gb = np.array([row[3] for row in rows])
    under = np.array([row[4] for row in rows])
    counts = np.array([row[5] for row in rows])
    samples = np.array([row[6] for row in rows], dtype=float)
    top = sizes.size - 1
    decisions = {lv: np.full(week.size, top) for lv in LEVELS}
    fitted = np.zeros(week.size, dtype=bool)
    for w in np.unique(week):
        past, now = week < w, week == w
        if past.sum() < 10:
            continue
        fitted[now] = True
        for lv in LEVELS:
            need = np.exp(feats[now] @ pinball_fit(feats[past], y[past], lv)) * peak_gb[now]
            decisions[lv][now] = np.minimum(np.searchsorted(sizes, need), top)
    rows_idx = np.arange(week.size)
    lwm = np.minimum(np.searchsorted(sizes, peak_gb), top)
    print(f"{name} {half}: last-week-max {score(lwm, counts, samples, prices, rows_idx)}")
    for target in SWEEP:
        chosen = np.minimum(np.searchsorted(sizes, 1.5 * peak_gb), top)
        for w in np.unique(week):
            now, past = week == w, (week < w) & fitted
            if not past.any():
                continue
            for lv in LEVELS:  # cheap -> safe
                miss = under[past][np.arange(past.sum()), decisions[lv][past]].sum()
                if miss / samples[past].sum() <= target:
                    chosen[now] = decisions[lv][now]
                    break
        print(f"  target {100 * target:.2f} %: {score(chosen, counts, samples, prices, rows_idx)}")


def score(choice, counts, samples, prices, rows) -> str:  # type: ignore[no-untyped-def]
    saving = 1 - prices[choice].sum() / (prices[-1] * choice.size)
    risk = counts[rows, choice].sum() / samples.sum()
    return f"{100 * saving:.1f} % saving at {100 * risk:.3f} % under-provisioned"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "all")
