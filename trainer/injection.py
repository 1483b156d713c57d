"""A labelled validation set for one VM without a human: synthetic faults from
vmad/synthetic.py injected into copies of the VM's own (unlabelled, mostly normal)
history, at the VM's own levels (disk and network faults scale with its median).

`injected_validation_set` is what the trainer scores a VM's adapted detector on to
report its quality (precision, recall, F1 at the VM's threshold, AUC), what it picks the
network's weight in the fused score by (trainer/adaptation.py), and what the
controller's environment can call to get a reward without labels. A VM with other
metrics than the default four gets `injected_generic_set`: shifts, ramps and spikes of
one to three random metrics, in units of each metric's own scale. Real labels, when a
VM has them, are better evidence: callers put them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmad.evaluation import DetectionScores, score_detection
from vmad.schema import DEFAULT_INTERVAL_S, DEFAULT_METRICS
from vmad.synthetic import FAULT_KINDS, inject_fault
from vmad.windows import make_windows, window_labels

__all__ = ["InjectedSeries", "InjectedSet", "injected_generic_series", "injected_generic_set",
           "injected_quality", "injected_validation_set"]


@dataclass(frozen=True)
class InjectedSet:
    windows: np.ndarray  # raw float32 [W, M, T]
    labels: np.ndarray  # int8 [W], 1 where the window's last sample is inside a fault
    kinds: tuple[str, ...]  # the fault kinds injected, in order


def injected_validation_set(
    history: np.ndarray, window: int, *, seed: int = 0, copies: int = 2,
    fault_share: float = 0.2, interval_s: float = DEFAULT_INTERVAL_S,
    kinds: tuple[str, ...] = tuple(FAULT_KINDS),
) -> InjectedSet:
    """`copies` copies of the VM's raw `history[N, 4]` (DEFAULT_METRICS order), each with
    faults of every kind in `kinds` (in random order, durations as vmad.synthetic draws
    them, shortened to fit) covering about `fault_share` of its samples; windows labelled
    by their last sample. Raises ValueError when the history is too short for a fault."""
    history = np.asarray(history, dtype=np.float64)
    if history.ndim != 2 or history.shape[1] != len(DEFAULT_METRICS):
        raise ValueError(f"history must be [samples, {len(DEFAULT_METRICS)}] default metrics, "
                         f"got {history.shape}")
    if len(history) < 4 * window:
        raise ValueError(f"need at least {4 * window} samples of history, got {len(history)}")
    rng = np.random.default_rng(seed)
    all_windows, all_labels, injected = [], [], []
    for _ in range(copies):
        values = history.copy()
        labels = np.zeros(len(values), dtype=np.int8)
        budget = int(fault_share * len(values)) // max(1, len(kinds))
        free = window  # leave the first window normal: every fault has a normal past
        for kind in rng.permutation(kinds):
            low, high = FAULT_KINDS[str(kind)][1]
            span = int(min(max(2, rng.uniform(low, high) / interval_s), budget))
            room = len(values) - free - span
            if span < 2 or room <= window:
                continue
            start = free + int(rng.integers(0, min(room, len(values) // len(kinds))))
            inject_fault(str(kind), values, start, start + span, rng)
            labels[start:start + span] = 1
            injected.append(str(kind))
            free = start + span + window  # a normal stretch before the next fault
        all_windows.append(make_windows(values.astype(np.float32), window))
        all_labels.append(window_labels(labels, window))
    return InjectedSet(np.ascontiguousarray(np.concatenate(all_windows)),
                       np.concatenate(all_labels), tuple(injected))


def injected_generic_set(
    history: np.ndarray, window: int, scale: np.ndarray, *, seed: int = 0, copies: int = 4,
    fault_share: float = 0.2,
) -> InjectedSet:
    """`copies` copies of `history[N, M]` (any metrics) with faults injected (see
    `injected_generic_series`), as windows labelled by their last sample."""
    series = injected_generic_series(history, window, scale, seed=seed, copies=copies,
                                     fault_share=fault_share)
    return InjectedSet(
        np.ascontiguousarray(np.concatenate([make_windows(v, window) for v in series.values])),
        series.window_labels(window), series.kinds)


@dataclass(frozen=True)
class InjectedSeries:
    values: tuple[np.ndarray, ...]  # raw float32 [N, M] per copy
    labels: tuple[np.ndarray, ...]  # int8 [N] per copy, 1 inside a fault
    kinds: tuple[str, ...]  # the fault kinds injected, in order

    def window_labels(self, window: int) -> np.ndarray:
        """The label of every window of every copy, in order (its last sample's)."""
        return np.concatenate([window_labels(labels, window) for labels in self.labels])


def injected_generic_series(
    history: np.ndarray, window: int, scale: np.ndarray, *, seed: int = 0, copies: int = 4,
    fault_share: float = 0.2,
) -> InjectedSeries:
    """`copies` copies of `history[N, M]` (any metrics), each with faults covering about
    `fault_share` of its samples, each fault on 1-3 random metrics, in units of the
    metric's `scale[M]` (the normalizer's): a level shift of 3-10 scales or a ramp to
    5-15 over 10-200 samples, or a spike of 5-20 over 2-10 samples; a normal window's
    length between faults. Several copies: a 6-hour history holds only a few faults, too
    few to rank two scores apart. The series rather than their windows where many
    metrics make the windows large (the detection benchmark's 38). Raises ValueError on
    a history too short."""
    history = np.asarray(history, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if history.ndim != 2 or scale.shape != history.shape[1:]:
        raise ValueError(f"need history [samples, M] and scale [M], got {history.shape} "
                         f"and {scale.shape}")
    if len(history) < 4 * window:
        raise ValueError(f"need at least {4 * window} samples of history, got {len(history)}")
    rng = np.random.default_rng(seed)
    n, metrics = history.shape
    mean_gap = 100.0 * (1 - fault_share) / fault_share  # faults last about 100 samples
    all_values, all_labels, kinds = [], [], []
    for _ in range(copies):
        values = history.copy()
        labels = np.zeros(n, dtype=np.int8)
        position = window
        while True:
            kind = str(rng.choice(("shift", "ramp", "spike")))
            span = int(rng.integers(2, 11)) if kind == "spike" else int(rng.integers(10, 201))
            start = position + int(rng.exponential(mean_gap))
            if start + span > n:
                break
            columns = rng.choice(metrics, size=int(rng.integers(1, min(3, metrics) + 1)),
                                 replace=False)
            if kind == "shift":
                size: float | np.ndarray = rng.uniform(3, 10)
            elif kind == "ramp":
                size = np.linspace(0.0, rng.uniform(5, 15), span)[:, None]
            else:
                size = rng.uniform(5, 20)
            values[start:start + span, columns] += size * scale[columns]
            labels[start:start + span] = 1
            kinds.append(kind)
            position = start + span + window
        all_values.append(values.astype(np.float32))
        all_labels.append(labels)
    return InjectedSeries(tuple(all_values), tuple(all_labels), tuple(kinds))


def injected_quality(scores: np.ndarray, injected: InjectedSet, threshold: float,
                     alarm_after: int = 1) -> DetectionScores:
    """How a detector's `scores` on `injected.windows` fare at `threshold`, an alarm
    after `alarm_after` windows in a row at it."""
    return score_detection(injected.labels, scores, threshold, alarm_after=alarm_after)
