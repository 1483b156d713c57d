"""Detection scores: point-wise and event-wise, never with point adjustment.

A sample is flagged when its score >= the threshold (for `alarm_after` samples in a row,
as the agent decides: see `run_lengths`). Point-wise scores count samples.
Event-wise scores count segments: an *event* is a maximal run of labelled samples, and a
*detection* a maximal run of flagged samples. Event recall is the share of events with
at least one flagged sample inside; event precision is the share of detections that
overlap an event. Unlike point adjustment, a hit does not relabel the rest of the
event as found, so point-wise scores are left as they are.
NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DetectionScores",
    "best_f1_threshold",
    "events",
    "false_alarm_threshold",
    "hit_rate",
    "read_interpretation_labels",
    "roc_auc",
    "run_lengths",
    "score_detection",
    "tail_threshold",
]


@dataclass(frozen=True)
class DetectionScores:
    precision: float
    recall: float
    point_f1: float
    false_alarm_rate: float  # flagged normal samples / normal samples
    accuracy: float
    auc: float  # NaN when only one class is present
    event_precision: float
    event_recall: float
    event_f1: float
    threshold: float
    samples: int
    anomalous_samples: int
    events: int

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def events(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of non-zero entries as (start, stop) with stop exclusive."""
    flags = np.asarray(labels).astype(bool).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags, [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return labels, scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class."""
    labels, scores = _check(labels, scores)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def score_detection(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                    alarm_after: int = 1) -> DetectionScores:
    """Scores of consecutive samples (windows), oldest first, flagged once `alarm_after`
    in a row reach `threshold` (as the agent decides); AUC ranks the scores themselves."""
    labels, scores = _check(labels, scores)
    flagged = run_lengths(scores >= threshold) >= alarm_after
    tp = int(np.sum(flagged & labels))
    fp = int(np.sum(flagged & ~labels))
    fn = int(np.sum(~flagged & labels))
    tn = len(labels) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    true_events = events(labels)
    detections = events(flagged)
    found = sum(1 for a, b in true_events if flagged[a:b].any())
    right = sum(1 for a, b in detections if labels[a:b].any())
    event_recall = found / len(true_events) if true_events else 0.0
    event_precision = right / len(detections) if detections else 0.0
    return DetectionScores(
        precision=precision,
        recall=recall,
        point_f1=_f1(precision, recall),
        false_alarm_rate=fp / (fp + tn) if fp + tn else 0.0,
        accuracy=(tp + tn) / len(labels) if len(labels) else 0.0,
        auc=roc_auc(labels, scores),
        event_precision=event_precision,
        event_recall=event_recall,
        event_f1=_f1(event_precision, event_recall),
        threshold=float(threshold),
        samples=len(labels),
        anomalous_samples=int(labels.sum()),
        events=len(true_events),
    )


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold (one of the scores) maximizing point-wise F1; among equals, the
    highest (fewest alarms). With no labelled sample, just above the highest score."""
    labels, scores = _check(labels, scores)
    if not labels.any() or len(scores) == 0:
        return float(np.nextafter(scores.max(), np.inf)) if len(scores) else 0.5
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    tp = np.cumsum(labels[order])
    flagged = np.arange(1, len(scores) + 1)
    # Only the last position of each run of equal scores is a reachable cut.
    last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    f1 = 2 * tp[last] / (flagged[last] + labels.sum())
    best = last[int(np.argmax(f1))]  # first maximum = highest threshold
    return float(sorted_scores[best])


def run_lengths(over: np.ndarray, before: int = 0) -> np.ndarray:
    """How many entries in a row `over` has been true, ending at each entry (0 where it
    is false); `before` true entries just ahead of the first one continue its run. An
    alarm after k windows in a row at the threshold is `run_lengths(over) >= k`."""
    over = np.asarray(over, dtype=bool)
    index = np.arange(len(over))
    last_false = np.maximum.accumulate(np.where(over, -1, index)) if len(over) else index
    lengths = index - last_false
    return np.where(last_false < 0, lengths + before, lengths)


def false_alarm_threshold(normal_scores: np.ndarray, rate: float) -> float:
    """The threshold flagging at most `rate` of `normal_scores` (float32 model outputs):
    just above their (1 - rate) quantile, so ties at a saturated score are not all
    flagged."""
    cut = np.float32(np.quantile(np.asarray(normal_scores), 1 - rate))
    return float(np.nextafter(cut, np.float32(np.inf)))


def tail_threshold(normal_scores: np.ndarray, rate: float, tail: float = 0.1) -> float:
    """The threshold a score exceeds with probability `rate` on normal data, from a
    peaks-over-threshold fit (SPOT, Siffer et al., KDD 2017, with the exponential tail):
    above u, the (1 - tail) quantile, excesses are taken as exponential with their mean
    sigma, so P(score > u + x) = tail * exp(-x / sigma) and the threshold is
    u + sigma * ln(tail / rate). Unlike a plain quantile it extrapolates beyond the
    largest score seen, which a few hundred warm-up windows need for a rate of 0.5 %; it
    never returns less than the empirical (1 - rate) quantile, which a heavier tail than
    the exponential (the largest of many metrics' deviations) would otherwise undercut."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError("tail_threshold needs finite scores")
    if not 0 < rate < tail < 1:
        raise ValueError(f"need 0 < rate < tail < 1, got rate {rate}, tail {tail}")
    u = float(np.quantile(scores, 1 - tail))
    excess = scores[scores > u] - u
    sigma = float(excess.mean()) if len(excess) else 0.0
    return max(u + sigma * float(np.log(tail / rate)), float(np.quantile(scores, 1 - rate)))


# One anomaly's rows [start, stop) (0-based, stop exclusive) and the 0-based metric
# columns that experts named as its cause.
Interpretation = tuple[int, int, tuple[int, ...]]


def read_interpretation_labels(path: str | Path) -> list[Interpretation]:
    """SMD's `interpretation_label.txt`: lines `start-end:d1,d2,...` with 1-based,
    inclusive rows of the test part and 1-based metric columns."""
    out: list[Interpretation] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows, dims = line.strip().split(":")
            start, end = (int(v) for v in rows.split("-"))
            columns = tuple(int(d) - 1 for d in dims.split(",") if d.strip())
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'start-end:d1,d2,...', got {line!r}")\
                from None
        if start < 1 or end < start or not columns or min(columns) < 0:
            raise ValueError(f"{path}:{number}: bad interpretation label {line!r}")
        out.append((start - 1, end, columns))
    return out


def hit_rate(contributions: np.ndarray, interpretation: list[Interpretation],
             share: float, rows: slice = slice(None)) -> float:
    """OmniAnomaly's HitRate@P: for every labelled anomalous row with its cause metrics
    G, the share of G among the ceil(P * |G|) metrics with the largest contribution;
    averaged over those rows. `contributions[N, M]` covers the rows of the test part;
    only rows inside `rows` count. NaN when no labelled row is inside."""
    first = rows.start or 0
    last = len(contributions) if rows.stop is None else rows.stop
    hits: list[float] = []
    for start, stop, causes in interpretation:
        lo, hi = max(start, first), min(stop, last)
        if lo >= hi:
            continue
        k = math.ceil(share * len(causes))
        top = np.argsort(-contributions[lo:hi], axis=1, kind="stable")[:, :k]
        found = np.isin(top, np.asarray(causes)).sum(axis=1)
        hits.extend((found / len(causes)).tolist())
    return float(np.mean(hits)) if hits else float("nan")
