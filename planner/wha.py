"""WHA: the weighted hybrid anomaly filter of the WHA capacity-planning paper.

Three filters each estimate the normal state of the next sample from a trailing window:
a moving median, a Kalman filter (local-level model) and a Savitzky-Golay filter
(``scipy.signal.savgol_coeffs`` evaluated at the window's last point). Older samples
weigh less: the median and the deviation scale use exponentially decaying weights
(half-life ``half_life`` samples), the Kalman gain forgets by construction, and the
Savitzky-Golay window is short. Each filter votes ``F_i`` on how far the sample is from
its estimate in robust scale units (0.5 exactly at ``tolerance``), and the confidence is
``WHA(x) = (1/n) * sum_i F_i(x) * W_i`` with weights ``W_i`` in [0, 1] from YAML.

Departure from the paper: the paper's votes are 0/1; here each vote is the graded
``d / (d + tolerance)`` so the confidence also ranks anomalies (NAB's threshold search
needs a ranking). With all weights 1 a verdict at 0.5 still means "on average beyond
tolerance". Samples judged anomalous enter the Kalman and Savitzky-Golay state as the
median estimate, so one spike does not drag the normal state after it.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from scipy.signal import savgol_coeffs

from vmad.detectors import register
from vmad.planner.detectors import Detector, deviation_score, robust_scale

__all__ = ["WHA"]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


class WHA(Detector):
    """Weighted hybrid of moving median, Kalman and Savitzky-Golay filters.

    window: trailing samples the median and scale see (one day at hourly steps = 24,
    at 5-minute steps = 288). half_life: age in samples at which a sample weighs half.
    tolerance: deviation, in robust standard deviations, at which a filter votes 0.5.
    weights: W for (median, kalman, savgol), each in [0, 1].
    sg_window / sg_order: Savitzky-Golay length and polynomial order.
    kalman_q: process-noise variance as a share of the measurement variance (small =
    smooth level, large = follows the data).
    """

    def __init__(
        self,
        window: int = 288,
        half_life: float = 144.0,
        tolerance: float = 4.0,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        sg_window: int = 13,
        sg_order: int = 2,
        kalman_q: float = 0.05,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if sg_window % 2 == 0 or sg_window <= sg_order:
            raise ValueError(f"sg_window must be odd and > sg_order, got {sg_window}, {sg_order}")
        self.window, self.half_life, self.tolerance = window, half_life, tolerance
        self.weights = tuple(float(w) for w in weights)
        self.sg_window, self.sg_order, self.kalman_q = sg_window, sg_order, kalman_q
        self.threshold = threshold
        # Coefficients that give the fitted polynomial's value at the newest sample.
        self._sg = savgol_coeffs(sg_window, sg_order, pos=sg_window - 1, use="dot")
        ages = np.arange(window)[::-1]
        self._decay = 0.5 ** (ages / half_life)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._raw: deque[float] = deque(maxlen=self.window)
        self._clean: deque[float] = deque(maxlen=self.sg_window)
        self._level = math.nan
        self._p = 1.0
        self.estimate = math.nan
        self.votes = (0.0, 0.0, 0.0)

    def _update(self, x: float) -> float:
        warm = max(5, self.sg_window)
        if len(self._raw) < warm:
            self._raw.append(x)
            self._clean.append(x)
            self._level = x if math.isnan(self._level) else 0.7 * self._level + 0.3 * x
            self.estimate = x
            return 0.0
        raw = np.fromiter(self._raw, dtype=np.float64)
        w = self._decay[-len(raw) :]
        med = _weighted_median(raw, w)
        scale = robust_scale(raw, med, _weighted_median(np.abs(raw - med), w))
        sg = float(np.dot(self._sg, np.fromiter(self._clean, dtype=np.float64)))
        # Kalman local-level model in units of scale^2: predict, compare, then update.
        r = scale * scale
        self._p += self.kalman_q * r
        kal = self._level
        votes = tuple(
            deviation_score(abs(x - est) / scale, self.tolerance) for est in (med, kal, sg)
        )
        self.votes = votes
        score = sum(v * wt for v, wt in zip(votes, self.weights, strict=True)) / 3.0
        self.estimate = med
        clean = med if score >= self.threshold else x
        gain = self._p / (self._p + r)
        self._level += gain * (clean - self._level)
        self._p *= 1.0 - gain
        self._raw.append(x)
        self._clean.append(clean)
        return score


register("wha", WHA)
