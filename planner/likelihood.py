"""An anomaly likelihood on top of WHA: how unusual WHA's recent scores are for this
series, as a calibrated probability instead of a binary flag.

The idea is the one NAB's best detectors use (Ahmad et al., "Unsupervised real-time
anomaly detection for streaming data", Neurocomputing 2017, the HTM anomaly likelihood):
keep the distribution of the raw score's short moving average over a long trailing
window, model it as a normal, and report the tail probability of the latest short
average. A series whose raw scores are always noisy stops alarming; a jump in a quiet
series stands out. The output is ``log(1 - L) / log(1e-10)``-scaled like NAB's HTM
detector, so 0.5 means L = 1 - 1e-5 and the ranking spreads over [0, 1].
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from vmad.detectors import register
from vmad.planner.detectors import Detector
from vmad.planner.wha import WHA

__all__ = ["AnomalyLikelihood"]


class AnomalyLikelihood(Detector):
    """WHA's raw score -> anomaly likelihood.

    learn: samples before the first judgement (score 0 until then).
    history: trailing samples whose short averages form the reference distribution.
    short: samples averaged for the current value.
    min_std: floor of the reference spread (a perfectly quiet series is not infinitely
    surprised by the first wiggle).
    """

    def __init__(
        self,
        base: Detector | None = None,
        learn: int = 288,
        history: int = 2016,
        short: int = 10,
        min_std: float = 0.03,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.base = base if base is not None else WHA()
        self.learn, self.history, self.short, self.min_std = learn, history, short, min_std
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.base.reset()
        self._raw: deque[float] = deque(maxlen=self.short)
        self._averages: deque[float] = deque(maxlen=self.history)
        self._sum = 0.0
        self._sum2 = 0.0

    def _update(self, x: float) -> float:
        raw, _ = self.base.update(x)
        self._raw.append(raw)
        average = float(np.mean(self._raw))
        if len(self._averages) == self._averages.maxlen:
            old = self._averages[0]
            self._sum -= old
            self._sum2 -= old * old
        self._averages.append(average)
        self._sum += average
        self._sum2 += average * average
        if self._seen < self.learn:
            return 0.0
        n = len(self._averages)
        mean = self._sum / n
        std = max(math.sqrt(max(self._sum2 / n - mean * mean, 0.0)), self.min_std)
        tail = 0.5 * math.erfc((average - mean) / (std * math.sqrt(2.0)))
        likelihood = 1.0 - tail
        return math.log(1.0000000001 - likelihood) / math.log(1.0000000001 - 0.9999999999)


def _from_settings(*, learn: int, history: int, short: int, min_std: float,
                   **wha: object) -> AnomalyLikelihood:
    """The registry's factory: the likelihood's own settings, the rest for its WHA."""
    return AnomalyLikelihood(WHA(**wha), learn, history, short, min_std)  # type: ignore[arg-type]


register("wha-likelihood", _from_settings)
