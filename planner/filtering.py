"""Cleaning usage history before forecasting: point anomalies out, recurrent ones kept.

A sample the point detector flags is replaced by the detector's normal-state estimate,
unless the recurrence detector says it repeats at a consistent interval (a weekly batch
job is load the reservation must cover, not noise). Runs causally, sample by sample, so
the cleaned value at time t depends only on samples up to t (safe for rolling origin).
"""

from __future__ import annotations

import numpy as np

import vmad.planner.wha  # noqa: F401  (registers wha)
from vmad.detectors import create
from vmad.planner.config import PlannerConfig
from vmad.planner.detectors import Detector
from vmad.planner.recurrence import RecurrenceDetector, find_periods

__all__ = ["FilterResult", "filter_history", "hourly_detector", "hourly_peaks"]


def hourly_peaks(timestamps: np.ndarray, values: np.ndarray) -> tuple[int, np.ndarray]:
    """Max per clock hour on a gap-free grid (gaps carry the last peak forward).

    Returns (epoch hour of the first bin, peaks)."""
    hours = timestamps // 3600
    first = int(hours[0])
    peaks = np.full(int(hours[-1]) - first + 1, -np.inf)
    np.maximum.at(peaks, hours - first, values)
    for i in np.flatnonzero(~np.isfinite(peaks)):
        peaks[i] = peaks[i - 1]
    return first, peaks


# Windows sized for hourly steps (a day = 24 samples), over each detector's YAML settings.
_HOURLY: dict[str, dict[str, float]] = {
    "la": {"learn": 168},
    "dla": {"window": 48},
    "wha": {"window": 48, "half_life": 24.0, "sg_window": 7},
}


def hourly_detector(name: str, config: PlannerConfig) -> Detector:
    """A point detector from the shared registry (vmad/detectors.py), sized for hourly
    steps."""
    if name not in _HOURLY:
        raise ValueError(f"unknown filter {name!r}; choose {', '.join(_HOURLY)}")
    options = getattr(config, name).model_dump() | _HOURLY[name]
    return create(name, **options)  # type: ignore[return-value]


class FilterResult:
    def __init__(self, cleaned: np.ndarray, point: np.ndarray, recurrent: np.ndarray) -> None:
        self.cleaned, self.point, self.recurrent = cleaned, point, recurrent


def filter_history(values: np.ndarray, name: str, config: PlannerConfig) -> FilterResult:
    """Hourly series in, cleaned series and the point / recurrent masks out."""
    x = np.asarray(values, dtype=np.float64)
    if name == "none":
        z = np.zeros(x.size, dtype=bool)
        return FilterResult(x.copy(), z, z.copy())
    periods = {round(p) for p in config.recurrence.periods_h}
    if config.recurrence.find_periods:
        # Periods found in the first two weeks only, so no look-ahead into what is planned.
        periods |= set(find_periods(x[: 24 * 14], 12, 24 * 7 + 12))
    det = RecurrenceDetector(
        hourly_detector(name, config),
        tuple(sorted(p for p in periods if p > config.recurrence.slack)),
        slack=config.recurrence.slack,
        decay=config.recurrence.decay,
    )
    cleaned = x.copy()
    point = np.zeros(x.size, dtype=bool)
    recurrent = np.zeros(x.size, dtype=bool)
    for i, v in enumerate(x):
        _, rec = det.update(v)
        recurrent[i] = rec
        if det.last_point and not rec:
            point[i] = True
            cleaned[i] = det.estimate
    return FilterResult(cleaned, point, recurrent)
