"""Scores of a reservation plan against actual usage, as the WHA paper defines them.

All take the actual usage at its native step and the reservation in force at each sample.
- underestimate: area where usage is above the reservation, as a share of the usage area
  (how much demand went unserved);
- underestimate frequency: share of samples (time) with usage above the reservation;
- overestimate: reserved but unused area, as a share of the reserved area;
- cross-correlation: Pearson correlation of forecast and actual (lag 0);
- cost: the price table applied per period; saving is against always the largest size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cost", "cross_correlation", "overestimate", "underestimate", "underestimate_frequency"]


def _pair(actual: np.ndarray, reserved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, r = np.asarray(actual, dtype=np.float64), np.asarray(reserved, dtype=np.float64)
    if a.shape != r.shape or a.size == 0:
        raise ValueError(
            f"actual and reserved must be non-empty and equal-shaped: {a.shape} {r.shape}"
        )
    return a, r


def underestimate(actual: np.ndarray, reserved: np.ndarray) -> float:
    a, r = _pair(actual, reserved)
    total = float(np.abs(a).sum())
    return float(np.clip(a - r, 0, None).sum()) / total if total > 0 else 0.0


def underestimate_frequency(actual: np.ndarray, reserved: np.ndarray) -> float:
    a, r = _pair(actual, reserved)
    return float(np.mean(a > r))


def overestimate(actual: np.ndarray, reserved: np.ndarray) -> float:
    a, r = _pair(actual, reserved)
    total = float(r.sum())
    return float(np.clip(r - a, 0, None).sum()) / total if total > 0 else 0.0


def cross_correlation(forecast: np.ndarray, actual: np.ndarray) -> float:
    f, a = _pair(actual, forecast)
    if f.std() == 0 or a.std() == 0:
        return 0.0
    return float(np.corrcoef(f, a)[0, 1])


def cost(
    sizes_per_period: np.ndarray, sizes: tuple[float, ...], prices: tuple[float, ...] | None
) -> float:
    """Total price of one reserved size per period; prices default to proportional to size."""
    table = dict(zip(sizes, prices if prices is not None else sizes, strict=True))
    return float(sum(table[float(s)] for s in np.asarray(sizes_per_period, dtype=np.float64)))
