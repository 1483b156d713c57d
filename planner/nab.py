"""NAB's standard-profile scoring, re-implemented (Lavin & Ahmad, "Evaluating Real-time
Anomaly Detection Algorithms - the Numenta Anomaly Benchmark", 2015; numenta/NAB
``nab/scorer.py`` and ``nab/sweeper.py``).

Per file: the first 15 % of samples (at most 750) are a probation period and not scored.
Inside a labelled window only the first detection counts, weighted by the scaled sigmoid
of its position (earlier = more, up to ``A_TP``); a detection outside windows costs
``A_FP`` times the scaled sigmoid of its distance past the last window (-1 before any
window); each window without a detection costs ``A_FN``. The corpus score is normalised
as NAB does: ``100 * (raw - null) / (perfect - null)`` where the null detector misses every
window and the perfect one detects each at its start. The threshold is chosen as NAB
does: one threshold for the whole corpus, the one that maximises the summed raw score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["STANDARD", "FileScoring", "Profile", "best_threshold", "corpus_score"]


@dataclass(frozen=True)
class Profile:
    tp: float
    fp: float
    fn: float


STANDARD = Profile(tp=1.0, fp=0.11, fn=1.0)


def scaled_sigmoid(y: float) -> float:
    """NAB's ``2 / (1 + e^(5y)) - 1``; -1 far past a window (y > 3), as NAB clips it."""
    return -1.0 if y > 3.0 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass
class FileScoring:
    """Per-sample weights of one file, so a threshold sweep is cheap."""

    weight: np.ndarray  # score a detection at each sample would add (0 in probation)
    window_id: np.ndarray  # window index per sample, -1 outside
    n_windows: int

    @classmethod
    def build(
        cls, timestamps: np.ndarray, windows: list[tuple[int, int]], profile: Profile = STANDARD
    ) -> FileScoring:
        n = len(timestamps)
        probation = int(min(math.floor(0.15 * n), 0.15 * 5000))
        window_id = np.full(n, -1, dtype=np.int64)
        spans = []
        for k, (start, end) in enumerate(windows):
            idx = np.flatnonzero((timestamps >= start) & (timestamps <= end))
            if idx.size:
                window_id[idx] = k
                spans.append((int(idx[0]), int(idx[-1])))
        max_tp = scaled_sigmoid(-1.0)
        weight = np.zeros(n)
        prev: tuple[int, int] | None = None
        span_iter = iter(spans)
        nxt = next(span_iter, None)
        for i in range(n):
            if nxt is not None and i > nxt[1]:
                prev, nxt = nxt, next(span_iter, None)
            if nxt is not None and nxt[0] <= i <= nxt[1]:
                length = nxt[1] - nxt[0] + 1
                weight[i] = scaled_sigmoid(-(nxt[1] - i + 1) / length) * profile.tp / max_tp
            elif prev is None:
                weight[i] = -1.0 * profile.fp
            else:
                width = max(prev[1] - prev[0], 1)
                weight[i] = scaled_sigmoid(abs(prev[1] - i) / width) * profile.fp
        weight[:probation] = 0.0
        return cls(weight=weight, window_id=window_id, n_windows=len(spans))

    def raw_score(self, detections: np.ndarray, profile: Profile = STANDARD) -> float:
        det = np.asarray(detections, dtype=bool)
        outside = det & (self.window_id < 0)
        total = float(self.weight[outside].sum())
        for k in range(self.n_windows):
            hits = np.flatnonzero(det & (self.window_id == k))
            total += float(self.weight[hits[0]]) if hits.size else -profile.fn
        return total


def corpus_score(
    files: list[FileScoring],
    scores: list[np.ndarray],
    threshold: float,
    profile: Profile = STANDARD,
) -> float:
    """Normalised NAB score (0 = null detector, 100 = perfect) at one threshold."""
    raw = sum(f.raw_score(s >= threshold, profile) for f, s in zip(files, scores, strict=True))
    windows = sum(f.n_windows for f in files)
    null, perfect = -profile.fn * windows, profile.tp * windows
    return 100.0 * (raw - null) / (perfect - null)


def best_threshold(
    files: list[FileScoring], scores: list[np.ndarray], profile: Profile = STANDARD
) -> tuple[float, float]:
    """Sweep thresholds over the corpus (as NAB's optimiser does); returns (threshold, score)."""
    pooled = np.concatenate(scores)
    # Fine steps where detections live (the top few per cent of scores), coarse elsewhere.
    grid = np.concatenate([np.linspace(0.0, 0.97, 98), np.linspace(0.97, 1.0, 1201)])
    candidates = np.unique(np.concatenate([np.quantile(pooled, grid), np.linspace(0, 1, 101)]))
    candidates = np.concatenate([candidates, [1.01]])  # 1.01 = never detect (the null detector)
    best = max((corpus_score(files, scores, t, profile), t) for t in candidates)
    return float(best[1]), float(best[0])
