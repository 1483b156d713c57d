"""Turning a need into a reservation: the planner's size choice and the baselines.

Each policy answers one question: given the usage seen before a period starts, which
size to reserve for that period. ``smallest_covering`` is the planner's rule; the rest
are the baselines the benchmark compares against.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "always_max",
    "last_period_max",
    "oracle",
    "percentile_rule",
    "smallest_covering",
    "vpa_recommendation",
    "vpa_target",
]


def smallest_covering(need: float, sizes: tuple[float, ...]) -> float:
    """The smallest size >= need; the largest size when nothing covers it (capped)."""
    if not np.isfinite(need):
        raise ValueError(f"need must be finite, got {need}")
    ordered = sorted(sizes)
    for size in ordered:
        if need <= size:
            return float(size)
    return float(ordered[-1])


def always_max(sizes: tuple[float, ...]) -> float:
    return float(max(sizes))


def last_period_max(
    last_period: np.ndarray, sizes: tuple[float, ...], margin: float = 0.0
) -> float:
    """\"Last week's maximum, rounded up to a size\" (times 1 + margin for the frontier)."""
    return smallest_covering(float(np.max(last_period)) * (1.0 + margin), sizes)


def percentile_rule(
    history: np.ndarray, sizes: tuple[float, ...], q: float = 99.0, factor: float = 1.1
) -> float:
    """\"99th percentile of the last 4 weeks x 1.1, rounded up\" (history = those weeks)."""
    return smallest_covering(float(np.percentile(history, q)) * factor, sizes)


def oracle(actual_period: np.ndarray, sizes: tuple[float, ...]) -> float:
    """The smallest size covering the period's actual peak: known only afterwards."""
    return smallest_covering(float(np.max(actual_period)), sizes)


def vpa_target(
    history: np.ndarray,
    step_s: float,
    q: float = 95.0,
    half_life_s: float = 24 * 3600.0,
    margin: float = 0.15,
) -> float:
    """Kubernetes-VPA-style target: a high percentile of an exponentially decaying
    histogram of usage (VPA's recommender: half-life 24 h, +15 % margin for memory)."""
    x = np.asarray(history, dtype=np.float64)
    ages = (x.size - 1 - np.arange(x.size)) * step_s
    weights = 0.5 ** (ages / half_life_s)
    order = np.argsort(x)
    cum = np.cumsum(weights[order])
    return float(x[order][np.searchsorted(cum, q / 100.0 * cum[-1])]) * (1.0 + margin)


def vpa_recommendation(
    history: np.ndarray, step_s: float, sizes: tuple[float, ...], margin: float = 0.15
) -> float:
    """The VPA-style target rounded up to a size."""
    return smallest_covering(vpa_target(history, step_s, margin=margin), sizes)
