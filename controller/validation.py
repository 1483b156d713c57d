"""A label-free validation set for the control reward and the state's quality features:
synthetic faults (vmad/synthetic.py) injected into a VM's own recent samples, plus the
real labels an operator gave, weighted up.

A fleet has almost no labels, so "how good is this VM's detector now" cannot come from
labelled windows alone. Instead: take the VM's recent raw samples (its own load, rhythm
and noise), inject faults of the project's synthetic kinds at random places, and ask
whether the detector flags the injected spans and stays quiet elsewhere. Samples inside
an incident an operator labelled keep their real label and count `real_weight` times
(a real incident says more than a synthetic one); everything else is taken as normal,
so a real anomaly nobody labelled counts against the detector that flags it: the price
of needing no labels, and the reason real labels weigh more.

This is the one place the controller builds such a set. The trainer will build the same
kind of set for its own validation; when it does, `injected_validation` calls it and
nothing else here changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmad.state import quality_of

__all__ = ["ValidationSet", "injected_validation", "validation_quality"]


@dataclass(frozen=True)
class ValidationSet:
    """Raw samples with faults injected (`values[N, M]`), the label of every sample
    (`labels[N]`: injected or really labelled anomalous), and each sample's weight
    (`weights[N]`: `real_weight` where an operator's label decided it, else 1)."""

    values: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


def injected_validation(values: np.ndarray, real_labels: np.ndarray | None,
                        interval_s: float, seed: int, *, fault_share: float = 0.15,
                        real_weight: int = 5) -> ValidationSet:
    """Inject faults covering about `fault_share` of `values[N, M]` (in their units) at
    random places away from labelled incidents; `real_labels[N]` are the operator's
    labels (1 anomalous, 0 normal or unknown), or None when there are none."""
    from vmad.synthetic import FAULT_KINDS, _inject

    rng = np.random.default_rng(seed)
    injected = np.array(values, dtype=np.float64, copy=True)
    n = len(injected)
    real = np.zeros(n, dtype=bool) if real_labels is None else np.asarray(real_labels) > 0
    labels = real.copy()
    kinds = sorted(FAULT_KINDS)
    target, covered, attempts = int(fault_share * n), 0, 0
    while covered < target and attempts < 50:
        attempts += 1
        kind = str(rng.choice(kinds))
        low, high = FAULT_KINDS[kind][1]
        span = int(np.clip(rng.uniform(low, high) / interval_s, 2, max(2, n // 4)))
        if span >= n:
            break
        start = int(rng.integers(0, n - span))
        if labels[start:start + span].any():
            continue  # keep injected and real incidents apart: each label means one thing
        _inject(kind, injected, start, start + span, rng)
        labels[start:start + span] = True
        covered += span
    injected[:, 0:2] = np.clip(injected[:, 0:2], 0, 100)  # CPU and memory are percentages
    injected[:, 2:] = np.clip(injected[:, 2:], 0, None)
    weights = np.where(real, real_weight, 1).astype(np.int64)
    return ValidationSet(injected.astype(np.float32), labels.astype(np.int8), weights)


def validation_quality(probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                       threshold: float) -> tuple[float, float, float]:
    """(accuracy, F1, class-balanced loss) of per-window `probabilities` against the
    validation set's window `labels`, each window counted `weights` times (integer
    weights: repeating a window is weighting it, and keeps vmad.state's one measure)."""
    repeat = np.asarray(weights, dtype=np.int64)
    return quality_of(np.repeat(probabilities, repeat), np.repeat(labels, repeat), threshold)
