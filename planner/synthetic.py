"""Synthetic VM memory usage with known structure, for the planning benchmark.

Months at 5-minute steps of: a base level with linear growth (a VM that fills up), a
daily and a weekly cycle, noise, point spikes (noise the filter should remove), and a
recurrent monthly job (every 4 weeks a few hours of heavy use: load the plan must cover).
Rules that only look back one week cannot see a monthly job coming, and lag growth.
"""

from __future__ import annotations

import numpy as np

from vmad.planner.backtest import VM

__all__ = ["synthetic_fleet", "synthetic_vm"]

STEP = 300


def synthetic_vm(seed: int, weeks: int = 16, start: int = 1_700_000_000) -> VM:
    rng = np.random.default_rng(seed)
    n = weeks * 7 * 24 * 12
    t = np.arange(n)
    hours = t / 12.0
    base = rng.uniform(1.0, 4.0)
    growth = rng.uniform(0.0, 2.5) * t / n  # GB gained over the whole trace
    daily = rng.uniform(0.1, 0.6) * np.clip(np.sin(2 * np.pi * (hours % 24 - 8) / 24), 0, None)
    weekday = np.where((hours // 24) % 7 < 5, 1.0, 0.6)
    usage = (base + growth) * (0.85 + 0.15 * weekday) + daily + rng.normal(0, 0.03, n)
    # Monthly job: every 28 days from a random day, 3 to 6 hours at +1.5..4 GB.
    offset = int(rng.integers(0, 28 * 24 * 12))
    job = rng.uniform(1.5, 4.0)
    length = int(rng.integers(3, 7)) * 12
    for begin in range(offset, n, 28 * 24 * 12):
        usage[begin : begin + length] += job
    # Point spikes: short, large, at random times; not load anyone should reserve for.
    for at in rng.choice(n, size=weeks, replace=False):
        usage[at : at + 2] += rng.uniform(2.0, 6.0)
    usage = np.clip(usage, 0.05, 16.0)
    return VM(f"synthetic-{seed:03d}", start + STEP * t.astype(np.int64), usage, None)


def synthetic_fleet(n: int = 24, weeks: int = 16) -> list[VM]:
    return [synthetic_vm(seed, weeks) for seed in range(n)]
