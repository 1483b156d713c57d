"""Streaming anomaly detectors for usage history: LA, DLA and the shared interface.

Every detector honours one contract (checked by tests/test_planner_detectors.py):
``update(value) -> (score, verdict)`` with ``score`` in [0, 1] and ``verdict`` a bool,
``reset()`` to forget a series, and ``score_series(values)`` for a whole array. A NaN or
infinite sample is rejected with ``BadSampleError`` naming the position, because a
silently skipped sample would shift every period the recurrence detector counts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable

import numpy as np

from vmad.detectors import register

__all__ = ["DLA", "LA", "BadSampleError", "Detector", "deviation_score", "robust_scale"]


class BadSampleError(ValueError):
    """A sample that cannot be scored (NaN, infinite, not a number)."""


def deviation_score(deviation: float, tolerance: float) -> float:
    """Map a non-negative deviation (in robust scale units) to [0, 1].

    ``d / (d + tol)`` is 0.5 exactly at the tolerance, so a verdict threshold of 0.5 means
    "beyond tolerance" while the score still ranks how far beyond, which NAB's
    threshold search needs.
    """
    if deviation <= 0.0:
        return 0.0
    return float(deviation / (deviation + tolerance))


def robust_scale(window: np.ndarray, centre: float, mad: float) -> float:
    """The deviation unit: the MAD as a standard deviation, floored.

    Usage series sit flat for hours (MAD = 0), and then any wiggle would be "infinitely"
    anomalous and every score would saturate at 1, which leaves nothing to rank. The floors
    (a tenth of the window's standard deviation, 1 % of its range, 0.1 % of the level)
    keep a flat stretch's first change large but finite.
    """
    spread = float(window.max() - window.min())
    return max(1.4826 * mad, 0.1 * float(window.std()), 0.01 * spread, 1e-3 * abs(centre), 1e-6)


class Detector(ABC):
    """One streaming detector; subclasses implement ``_update`` and ``reset``."""

    threshold: float = 0.5

    def __init__(self) -> None:
        self._seen = 0

    def update(self, value: float) -> tuple[float, bool]:
        """Score one sample; returns ``(score in [0, 1], anomalous?)``."""
        try:
            x = float(value)
        except (TypeError, ValueError) as error:
            raise BadSampleError(f"sample {self._seen} is not a number: {value!r}") from error
        if not math.isfinite(x):
            raise BadSampleError(f"sample {self._seen} is {x} (NaN/inf); clean or drop it first")
        score = min(1.0, max(0.0, self._update(x)))
        self._seen += 1
        return score, score >= self.threshold

    @abstractmethod
    def _update(self, x: float) -> float: ...

    def reset(self) -> None:
        """Forget everything seen, so the next series starts clean."""
        self._seen = 0

    def fit(self, train: np.ndarray) -> Detector:
        """The shared detector interface (vmad/detectors.py): forget, then stream the
        history `train` ([N] or [N, 1]) through, so scoring starts warm."""
        self.score_series(np.asarray(train, dtype=np.float64).reshape(-1))
        return self

    def score_samples(self, values: np.ndarray) -> np.ndarray:
        """Go on streaming: one score in [0, 1] per sample of `values` ([N] or [N, 1])."""
        return np.fromiter((self.update(v)[0] for v in np.asarray(values).reshape(-1)),
                           dtype=np.float64)

    def score_series(self, values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
        """Reset, then score every sample in order; returns (scores float64, verdicts bool)."""
        self.reset()
        scores, verdicts = [], []
        for v in values:
            s, a = self.update(v)
            scores.append(s)
            verdicts.append(a)
        return np.asarray(scores, dtype=np.float64), np.asarray(verdicts, dtype=bool)


class LA(Detector):
    """Static limits: the industry baseline (an alarm when usage leaves [lower, upper]).

    Limits are configured; when one is not given it is learned once from the first
    ``learn`` samples as their min/max widened by ``slack`` of the range, and then frozen
    (that is what makes it static).

    >>> d = LA(lower=0.0, upper=10.0)
    >>> d.update(5.0)
    (0.0, False)
    >>> d.update(30.0)[1]
    True
    """

    def __init__(
        self,
        lower: float | None = None,
        upper: float | None = None,
        learn: int = 288,
        slack: float = 0.1,
    ) -> None:
        super().__init__()
        self.cfg_lower, self.cfg_upper, self.learn, self.slack = lower, upper, learn, slack
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.lower, self.upper = self.cfg_lower, self.cfg_upper
        self._lo, self._hi = math.inf, -math.inf

    def _update(self, x: float) -> float:
        if self._seen < self.learn and (self.cfg_lower is None or self.cfg_upper is None):
            self._lo, self._hi = min(self._lo, x), max(self._hi, x)
            pad = self.slack * max(self._hi - self._lo, 1e-9)
            if self._seen + 1 == self.learn:
                self.lower = self.cfg_lower if self.cfg_lower is not None else self._lo - pad
                self.upper = self.cfg_upper if self.cfg_upper is not None else self._hi + pad
            return 0.0  # still learning: no verdicts from limits not yet set
        lower = -math.inf if self.lower is None else self.lower
        upper = math.inf if self.upper is None else self.upper
        width = (
            max(upper - lower, 1e-9)
            if math.isfinite(upper - lower)
            else max(abs(upper), abs(lower), 1.0)
        )
        excess = max(lower - x, x - upper, 0.0)
        # Anything outside is an alarm; how far outside (in band widths) ranks it.
        return 0.0 if excess == 0.0 else 0.5 + 0.5 * deviation_score(excess / width, 0.25)


class DLA(Detector):
    """Dynamic limits from a moving median (the WHA paper's comparison method).

    The normal state is the median of the last ``window`` samples; the band is
    ``tolerance`` times the moving median absolute deviation (scaled to a standard
    deviation), so the limits follow level shifts instead of staying fixed like LA.
    """

    def __init__(self, window: int = 288, tolerance: float = 4.0, min_scale: float = 1e-6) -> None:
        super().__init__()
        self.window, self.tolerance, self.min_scale = window, tolerance, min_scale
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._buf: deque[float] = deque(maxlen=self.window)
        self.estimate = math.nan

    def _update(self, x: float) -> float:
        if len(self._buf) < max(3, self.window // 10):
            self._buf.append(x)
            self.estimate = x
            return 0.0
        arr = np.fromiter(self._buf, dtype=np.float64)
        med = float(np.median(arr))
        mad = float(np.median(np.abs(arr - med)))
        scale = max(robust_scale(arr, med, mad), self.min_scale)
        self.estimate = med
        self._buf.append(x)
        return deviation_score(abs(x - med) / scale, self.tolerance)


register("la", LA)
register("dla", DLA)
