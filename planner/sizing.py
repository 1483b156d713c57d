"""Turning a need into a reservation, and the baselines' own rules.

Each rule answers one question: given the usage seen before a period starts, which size
to reserve for it. The planner's risk-based choice is in risk_sizing.py; these are the
rules it is compared with (simple look-back rules, and the Kubernetes VPA recommender's).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "VPAMemoryRecommender",
    "always_max",
    "last_period_max",
    "oracle",
    "percentile_rule",
    "size_index",
    "smallest_covering",
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


def size_index(need: float, sizes: np.ndarray) -> int:
    """Index of the smallest size >= need; the largest when none covers it (capped)."""
    if not np.isfinite(need):
        raise ValueError(f"need must be finite, got {need}")
    return min(int(np.searchsorted(sizes, need, side="left")), len(sizes) - 1)


GB = 2.0**30  # bytes: sizes and usage here are GiB (kB / 2^20), VPA counts bytes


class VPAMemoryRecommender:
    """The Kubernetes VPA recommender's memory target, with its default flags.

    Follows kubernetes/autoscaler vertical-pod-autoscaler/pkg/recommender:
    - model/container.go: one memory peak per aggregation interval, and an OOM adds
      ``max(used + OOMMinBumpUp, used * OOMBumpUpRatio)`` with ``used = max(request,
      the interval's peak)`` as that interval's peak;
    - model/aggregations_config.go: interval 24 h, half-life 24 h, bump ratio 1.2, minimum
      bump 100 MiB; exponential buckets from 1e7 bytes growing 5 %;
    - util/histogram.go: the percentile is the *end* of the bucket where the cumulative
      weight reaches it; util/decaying_histogram.go: weight ``2 ** (t / half_life)``;
    - logic/recommender.go: target percentile 0.9, safety margin 0.15, at least 250 MiB.
    The recommendation is a request; here it is rounded up to a size for the week.
    """

    interval_s = 24 * 3600.0
    half_life_s = 24 * 3600.0
    percentile = 0.9
    margin = 0.15
    min_bytes = 250 * 2.0**20
    oom_ratio = 1.2
    oom_min_bump = 100 * 2.0**20
    first_bucket = 1e7
    growth = 1.05

    def __init__(self) -> None:
        self._ooms: list[tuple[float, float]] = []  # (time, bytes)

    def _bucket_end(self, value: np.ndarray) -> np.ndarray:
        r, f = self.growth, self.first_bucket
        k = np.floor(np.log1p(value * (r - 1) / f) / np.log(r))
        return f * (r ** (k + 1) - 1) / (r - 1)

    def recommend(self, ts: np.ndarray, usage_gb: np.ndarray, now: float) -> float:
        """Target in GB from all samples before ``now`` and the OOMs seen so far."""
        if ts.size == 0:
            return 0.0
        # Intervals start at the first sample, as WindowEnd does in container.go.
        k = ((ts - ts[0]) // self.interval_s).astype(np.int64)
        uniq, inverse = np.unique(k, return_inverse=True)
        peaks = np.full(uniq.size, -np.inf)
        np.maximum.at(peaks, inverse, usage_gb * GB)
        ends = ts[0] + (uniq + 1) * self.interval_s
        for when, bytes_needed in self._ooms:
            j = int(np.searchsorted(uniq, (when - ts[0]) // self.interval_s))
            if j < uniq.size and uniq[j] == (when - ts[0]) // self.interval_s:
                peaks[j] = max(peaks[j], bytes_needed)
        weights = 2.0 ** ((ends - now) / self.half_life_s)
        order = np.argsort(peaks)
        cum = np.cumsum(weights[order])
        j = int(np.searchsorted(cum, self.percentile * cum[-1]))
        value = float(self._bucket_end(peaks[order][min(j, peaks.size - 1)]))
        return max(value * (1 + self.margin), self.min_bytes) / GB

    def observe_week(self, ts: np.ndarray, usage_gb: np.ndarray, request_gb: float) -> None:
        """Record an OOM at the first sample above the request (memory ran out)."""
        over = np.flatnonzero(usage_gb > request_gb)
        if over.size == 0:
            return
        i = int(over[0])
        day = (ts > ts[i] - self.interval_s) & (ts <= ts[i])  # the peak so far, about
        used = max(request_gb, float(usage_gb[day].max())) * GB
        self._ooms.append((float(ts[i]), max(used + self.oom_min_bump, used * self.oom_ratio)))
