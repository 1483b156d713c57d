"""Anomaly likelihoods on top of WHA: how unusual WHA's recent scores are for this
series, as a calibrated probability instead of a binary flag.

The idea is the one NAB's best detectors use (Ahmad et al., "Unsupervised real-time
anomaly detection for streaming data", Neurocomputing 2017, the HTM anomaly likelihood):
keep the distribution of the raw score's short moving average over a long trailing
window, model it as a normal, and report the tail probability of the latest short
average. A series whose raw scores are always noisy stops alarming; a jump in a quiet
series stands out. The output is ``log(1 - L) / log(1e-10)``-scaled like NAB's HTM
detector, so 0.5 means L = 1 - 1e-5 and the ranking spreads over [0, 1].

Two detectors are registered:

- ``wha-likelihood`` (``AnomalyLikelihood``): the first version, a one-week reference.
- ``wha-alarm`` (``WHAAlarm``): the NAB detector. HTM's likelihood as HTM computes it
  (``RawScoreLikelihood``: a learning period, a 30-day reference re-estimated every 100
  samples, HTM's floors on its mean and variance), plus the two mechanisms NAB's leaders
  add on top of a raw score: a value outside the range seen so far (widened by 5 %) is
  an anomaly outright, as in NAB's numenta detector (``SPATIAL_TOLERANCE``), and after an
  alarm the detector rests (reports 0) for a while, as knncad and contextOSE do, because
  NAB credits only the first detection of an anomaly and charges every later one.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from vmad.detectors import register
from vmad.planner.detectors import Detector
from vmad.planner.wha import WHA

__all__ = ["AnomalyLikelihood", "RawScoreLikelihood", "WHAAlarm", "log_scale"]

_LOG_FLOOR = math.log(1.0000000001 - 0.9999999999)


def log_scale(likelihood: float) -> float:
    """NAB's HTM output scale: ``log(1 - L) / log(1e-10)``, so L = 1 - 1e-5 gives 0.5.

    Likelihoods pile up in the last nines; the log spreads them over [0, 1] so one
    threshold means the same on every series."""
    return math.log(1.0000000001 - likelihood) / _LOG_FLOOR


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
        return log_scale(1.0 - tail)


class RawScoreLikelihood:
    """HTM's anomaly likelihood of a stream of raw scores in [0, 1] (nupic's
    ``AnomalyLikelihood`` with its defaults, for 5-minute data).

    learn: raw scores left out of the reference (the raw detector is still learning).
    estimation: further samples collected before the first likelihood (0 until then).
    history: short averages in the reference (8640 = 30 days at 5 minutes).
    short: raw scores averaged for the current value (HTM's ``averagingWindow``).
    reestimate: samples between two fits of the reference normal.
    min_mean, min_var: HTM's floors of the fitted mean and variance, so a series whose
    raw score sits near 0 is not shaken into red by the slightest blip.
    """

    def __init__(
        self,
        learn: int = 288,
        estimation: int = 100,
        history: int = 8640,
        short: int = 10,
        reestimate: int = 100,
        min_mean: float = 0.03,
        min_var: float = 0.0003,
    ) -> None:
        if min(estimation, history, short, reestimate) < 1 or learn < 0:
            raise ValueError("likelihood: estimation, history, short and reestimate must be >= 1")
        self.learn, self.estimation, self.history = learn, estimation, history
        self.short, self.reestimate = short, reestimate
        self.min_mean, self.min_var = min_mean, min_var
        self.reset()

    @property
    def warm(self) -> int:
        """Samples before the first likelihood."""
        return self.learn + self.estimation

    def reset(self) -> None:
        self._seen = 0
        self._raw: deque[float] = deque(maxlen=self.short)
        self._averages: deque[float] = deque(maxlen=self.history)
        self._mean = math.nan
        self._std = math.nan

    def update(self, raw: float) -> float:
        """One raw score in; the log-scaled likelihood of its short average out."""
        self._raw.append(raw)
        average = sum(self._raw) / len(self._raw)
        seen = self._seen
        self._seen += 1
        if seen >= self.learn:
            self._averages.append(average)
        if seen < self.warm:
            return 0.0
        if math.isnan(self._mean) or seen % self.reestimate == 0:
            reference = np.fromiter(self._averages, dtype=np.float64)
            self._mean = max(float(reference.mean()), self.min_mean)
            self._std = math.sqrt(max(float(reference.var()), self.min_var))
        # HTM's tail is two-sided: an average as far below the mean counts the same.
        z = abs(average - self._mean) / self._std
        tail = 0.5 * math.erfc(z / math.sqrt(2.0))
        return log_scale(1.0 - tail)


class WHAAlarm(Detector):
    """WHA -> HTM's anomaly likelihood, new extremes, and a rest after each alarm.

    novelty: a value beyond the range of the likelihood's history window, widened on each
    side by this share of the range, scores 1 (0 = off). rest: samples after an alarm
    (score >= threshold) that report 0, so one anomaly raises one alarm (0 = off).
    """

    def __init__(
        self,
        base: Detector | None = None,
        likelihood: RawScoreLikelihood | None = None,
        novelty: float = 0.05,
        rest: int = 150,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if novelty < 0 or rest < 0:
            raise ValueError(f"wha-alarm: novelty and rest must be >= 0, got {novelty}, {rest}")
        self.base = base if base is not None else WHA()
        self.likelihood = likelihood if likelihood is not None else RawScoreLikelihood()
        self.novelty, self.rest, self.threshold = novelty, rest, threshold
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.base.reset()
        self.likelihood.reset()
        # Monotonic deques of (index, value): the trailing minimum and maximum in O(1).
        self._lows: deque[tuple[int, float]] = deque()
        self._highs: deque[tuple[int, float]] = deque()
        self._resting = 0

    def _new_extreme(self, x: float) -> bool:
        if not self._lows:
            return False
        low, high = self._lows[0][1], self._highs[0][1]
        pad = self.novelty * (high - low)
        return high > low and (x > high + pad or x < low - pad)

    def _remember(self, x: float) -> None:
        i = self._seen
        while self._lows and self._lows[-1][1] >= x:
            self._lows.pop()
        while self._highs and self._highs[-1][1] <= x:
            self._highs.pop()
        self._lows.append((i, x))
        self._highs.append((i, x))
        oldest = i - self.likelihood.history
        for ends in (self._lows, self._highs):
            while ends[0][0] <= oldest:
                ends.popleft()

    def _update(self, x: float) -> float:
        raw, _ = self.base.update(x)
        score = self.likelihood.update(raw)
        if self.novelty > 0 and self._seen >= self.likelihood.warm and self._new_extreme(x):
            score = 1.0
        self._remember(x)
        if self._resting > 0:
            self._resting -= 1
            return 0.0
        if score >= self.threshold:
            self._resting = self.rest
        return score


def _from_settings(
    *, learn: int, history: int, short: int, min_std: float, **wha: object
) -> AnomalyLikelihood:
    """The registry's factory: the likelihood's own settings, the rest for its WHA."""
    return AnomalyLikelihood(WHA(**wha), learn, history, short, min_std)  # type: ignore[arg-type]


def _alarm_from_settings(
    *, wha: dict[str, object], novelty: float = 0.05, rest: int = 150,
    threshold: float = 0.5, **likelihood: float,
) -> WHAAlarm:
    """The registry's factory: `wha` holds its WHA's settings, `likelihood` those of
    `RawScoreLikelihood` (its defaults where absent), the rest are the alarm's."""
    return WHAAlarm(WHA(**wha), RawScoreLikelihood(**likelihood),  # type: ignore[arg-type]
                    novelty, rest, threshold)


register("wha-likelihood", _from_settings)
register("wha-alarm", _alarm_from_settings)
