"""Fine-tuning a VM's network without a human label: its own windows are the negatives,
copies of its own history with synthetic faults injected at its own levels
(trainer/injection.py) are the positives, and real labels, when the VM has some, come
first and are drawn more often.

The history is split in time: the older part feeds training, the newer part (with other
faults injected) is the validation set that early-stops the fine-tune and keeps the
starting weights when fine-tuning never beats them (trainer/training.py). The newer part
is also closer to what the VM will see next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from vmad.trainer.injection import injected_validation_set
from vmad.trainer.training import TrainConfig, TrainResult, calibrated_threshold, train

__all__ = ["SelfSupervisedData", "finetune_self_supervised", "self_supervised_data",
           "validation_threshold"]

# Share of the history (its newest part) kept for validation.
_VALIDATION_SHARE = 0.4
# How much more often a real labelled window is drawn than an injected one: an
# operator's label is the better evidence.
_REAL_LABEL_WEIGHT = 4.0


@dataclass(frozen=True)
class SelfSupervisedData:
    windows: np.ndarray  # raw float32 [W, M, T]
    labels: np.ndarray  # int8 [W]
    weights: np.ndarray  # float64 [W], sampling weight of each window
    validation_windows: np.ndarray  # raw float32 [V, M, T]
    validation_labels: np.ndarray  # int8 [V]
    real_labelled: int  # windows in `windows` that carry a real label


def self_supervised_data(
    history: np.ndarray, window: int, *, seed: int = 0, copies: int = 3,
    real_windows: np.ndarray | None = None, real_labels: np.ndarray | None = None,
) -> SelfSupervisedData:
    """Training and validation windows from a VM's raw `history[N, 4]` (default metrics,
    mostly normal) plus its real labelled windows `real_windows[R, 4, T]` (optional).
    Raises ValueError when the history is too short to hold faults in both parts."""
    history = np.asarray(history, dtype=np.float64)
    split = int(len(history) * (1 - _VALIDATION_SHARE))
    if split < 4 * window or len(history) - split < 4 * window:
        raise ValueError(f"need at least {int(np.ceil(4 * window / _VALIDATION_SHARE))} "
                         f"samples of history to fine-tune without labels, got {len(history)}")
    training = injected_validation_set(history[:split], window, seed=seed, copies=copies)
    validation = injected_validation_set(history[split:], window, seed=seed + 1, copies=1)
    windows, labels = training.windows, training.labels
    weights = np.ones(len(labels))
    real = 0
    if real_windows is not None and real_labels is not None and len(real_labels):
        real = len(real_labels)
        windows = np.concatenate([windows, np.asarray(real_windows, np.float32)])
        labels = np.concatenate([labels, np.asarray(real_labels, np.int8)])
        weights = np.concatenate([weights, np.full(real, _REAL_LABEL_WEIGHT)])
    return SelfSupervisedData(np.ascontiguousarray(windows), labels, weights,
                              validation.windows, validation.labels, real)


def finetune_self_supervised(
    model: nn.Module, data: SelfSupervisedData,
    normalize: Callable[[np.ndarray], np.ndarray], config: TrainConfig,
) -> TrainResult:
    """Fine-tune `model` in place on `data`; `normalize` maps raw `[W, M, T]` windows to
    the normalized ones the model takes (the VM's own statistics)."""
    return train(model, normalize(data.windows), data.labels, config,
                 validation=(normalize(data.validation_windows), data.validation_labels),
                 sample_weights=data.weights)


def validation_threshold(model: nn.Module, data: SelfSupervisedData,
                         normalize: Callable[[np.ndarray], np.ndarray]) -> float | None:
    """The fine-tuned network's own calibrated threshold: the best-F1 threshold of its
    probabilities on the validation set (faults injected into the newer part of the
    VM's history), as the pretrained checkpoint's threshold is the best-F1 threshold on
    its validation set. Fine-tuning moves the probabilities, so the pretrained value no
    longer marks where this network's alarms start. None when the validation set holds
    one class."""
    return calibrated_threshold(model, normalize(data.validation_windows),
                                data.validation_labels)
