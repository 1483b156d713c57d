"""Recurrence detector: tells recurrent anomalies (load) from point anomalies (noise).

It wraps a point detector (WHA by default). An anomaly at sample ``t`` that has anomalies
near ``t - P`` and ``t - 2P`` (within ``slack`` samples) for some period ``P`` repeats at a
consistent interval at least twice and is marked recurrent. Several periods are watched at
once (daily, weekly, and any found in the data by ``find_periods``), each with its own
confidence: every consistent repeat raises it, every expected repeat that does not come
multiplies it by ``decay``, so a job that stops running stops being protected.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from vmad.planner.detectors import Detector

__all__ = ["RecurrenceDetector", "find_periods"]


def find_periods(values: np.ndarray, min_lag: int, max_lag: int, top: int = 2) -> list[int]:
    """Strongest autocorrelation peaks in [min_lag, max_lag] (periods present in the data)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2 * min_lag + 2 or np.std(x) == 0:
        return []
    x = x - x.mean()
    n = x.size
    spec = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(spec * np.conj(spec))[:n] / (x @ x)
    hi = min(max_lag, n // 2)
    peaks = [
        lag
        for lag in range(max(min_lag, 1), hi)
        if acf[lag] > acf[lag - 1] and acf[lag] >= acf[lag + 1] and acf[lag] > 0.2
    ]
    return sorted(sorted(peaks, key=lambda lag: -acf[lag])[:top])


class RecurrenceDetector(Detector):
    """Scores how confidently the current sample is a *recurrent* anomaly.

    ``update`` returns (confidence, recurrent?). ``last_point`` holds the wrapped
    detector's own verdict for the same sample, so a caller can tell the three cases:
    normal, point anomaly (``last_point and not recurrent``) and recurrent anomaly.

    periods: candidate periods in samples (e.g. 24 and 168 at hourly steps).
    slack: how far (samples) a repeat may drift and still count as the same interval.
    decay: confidence multiplier for each expected repeat that did not happen.
    """

    def __init__(
        self,
        base: Detector,
        periods: tuple[int, ...],
        slack: int = 1,
        decay: float = 0.5,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if not periods or min(periods) <= slack:
            raise ValueError(f"periods must be > slack ({slack}), got {periods}")
        self.base, self.periods, self.slack, self.decay = base, tuple(periods), slack, decay
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.base.reset()
        horizon = 2 * max(self.periods) + self.slack + 1
        self._hist: deque[bool] = deque([False] * horizon, maxlen=horizon)
        self.confidence = {p: 0.0 for p in self.periods}
        self.last_point = False
        self.estimate = float("nan")

    def _near(self, lag: int) -> bool:
        # _hist[-1] is the previous sample, so lag L back is index -L.
        lo, hi = max(1, lag - self.slack), lag + self.slack
        return any(self._hist[-k] for k in range(lo, hi + 1) if k <= len(self._hist))

    def _update(self, x: float) -> float:
        _, point = self.base.update(x)
        self.estimate = getattr(self.base, "estimate", x)
        self.last_point = point
        best = 0.0
        for p in self.periods:
            # An expected repeat is judged once its slack has passed: anomaly at t-P-slack,
            # nothing since within the slack window, and none now -> it did not come.
            if (
                self._hist[-(p + self.slack)]
                and not point
                and not any(self._hist[-k] for k in range(1, self.slack + 1))
            ):
                self.confidence[p] *= self.decay
            if point:
                once, twice = self._near(p), self._near(2 * p)
                if once and twice:
                    self.confidence[p] = self.confidence[p] + (1.0 - self.confidence[p]) * 0.5
                    self.confidence[p] = max(self.confidence[p], 0.75)
                    best = max(best, self.confidence[p])
                elif once:
                    self.confidence[p] = max(self.confidence[p], 0.25)
                    best = max(best, self.confidence[p] * 0.5)
        self._hist.append(point)
        return best
