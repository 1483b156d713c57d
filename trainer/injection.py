"""A labelled validation set for one VM without a human: synthetic faults from
vmad/synthetic.py injected into copies of the VM's own (unlabelled, mostly normal)
history, at the VM's own levels (disk and network faults scale with its median).

`injected_validation_set` is what the trainer scores a VM's adapted detector on to
report its quality (precision, recall, F1 at the VM's threshold, AUC), and what the
controller's environment can call to get a reward without labels. Real labels, when a
VM has them, are better evidence: callers put them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmad.evaluation import DetectionScores, score_detection
from vmad.schema import DEFAULT_INTERVAL_S, DEFAULT_METRICS
from vmad.synthetic import FAULT_KINDS, inject_fault
from vmad.windows import make_windows, window_labels

__all__ = ["InjectedSet", "injected_quality", "injected_validation_set"]


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


def injected_quality(scores: np.ndarray, injected: InjectedSet,
                     threshold: float) -> DetectionScores:
    """How a detector's `scores` on `injected.windows` fare at `threshold`."""
    return score_detection(injected.labels, scores, threshold)
