"""The VM state: what the trainer tells the controller about one VM, and the vector a
policy sees. This is the one definition; the rule policy (controller/policy.py) and the
DQN environment read the same fields in the same order.

The paper's transfer training module reports "the VM state" to the central control
module without fixing its content; we fill it with what a policy needs to decide:

- how good the current model is on the VM's recent *labelled* windows (accuracy, F1,
  class-balanced loss), and how many labelled windows that judgement rests on;
- what the agent has been saying (share of recent windows flagged anomalous);
- a compressed summary of the recent monitoring data (per-metric mean and standard
  deviation after the model's own normalization: 2*M numbers instead of N*M samples; the
  paper sends compressed parameters, we send compressed data, which a policy can compare
  across models);
- drift between the data the model was normalized on and the recent data;
- time and telemetry since the last training, batches spent on the current model, and
  whether it is the pretrained model or a per-VM fine-tuned one.

NumPy only: the controller imports this module and must not need PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vmad.windows import Normalizer

__all__ = ["FEATURES", "VMState", "age_text", "blame_text", "compute_state", "drift_score",
           "quality_of", "summary_of"]

# Scales that map unbounded quantities into about [0, 1] so that one feature does not
# dominate a neural policy: a day is "long ago", 10 robust units of drift is "extreme".
_LOSS_CAP = 5.0
_DRIFT_CAP = 10.0
_SECONDS_CAP = 86_400.0
_SAMPLES_CAP = 10_000.0
_BATCHES_CAP = 2_000.0
_LABELLED_CAP = 1_000.0

FEATURES: tuple[str, ...] = (
    "accuracy", "f1", "loss", "labelled", "flagged_share", "labelled_anomalous_share",
    "drift", "since_training", "samples_since_training", "batches_trained", "finetuned",
)
"""Names of the fixed part of `VMState.to_vector()`; the per-metric summary follows."""


@dataclass(frozen=True)
class VMState:
    """One VM as the trainer sees it at `timestamp` (Unix seconds).

    accuracy / f1 / loss: the current model on the recent labelled windows (0 / 0 / 0 when
        `labelled_windows` is 0: a policy must read them together).
    labelled_windows: how many recent windows have a ground-truth label.
    recent_windows: how many recent windows the trainer holds for this VM.
    flagged_share: share of recent windows the agent flagged anomalous.
    labelled_anomalous_share: share of labelled windows whose label is anomalous.
    drift: mean over metrics of |median(recent) - center| / scale under the model's
        normalizer, plus |log(std(recent) / scale)|: 0 when recent data looks like the
        data the model was normalized on.
    summary: per-metric mean then per-metric standard deviation of the recent normalized
        data (2*M floats).
    seconds_since_training: since the current model was trained (or reset); +inf never.
    samples_since_training: samples received since then.
    batches_trained: fine-tuning batches spent on the current model since it was reset.
    finetuned: the current model is a per-VM fine-tuned one (not the pretrained one).
    model_version: the bundle version the agent should be running.
    blamed: the metrics most to blame in the VM's newest anomalous verdict,
        "metric=value,..." (`blame_text`); empty when none was flagged. Shown by
        `vmad status`; not a policy feature.
    detector: what the VM's detector is, in words: warming up (samples so far of
        those needed) or which fit runs, its quality on faults injected into the VM's
        own history and how far labels of normal raised its threshold. Shown by `vmad
        status`; not a policy feature.
    """

    vm_id: str
    timestamp: float
    accuracy: float = 0.0
    f1: float = 0.0
    loss: float = 0.0
    labelled_windows: int = 0
    recent_windows: int = 0
    flagged_share: float = 0.0
    labelled_anomalous_share: float = 0.0
    drift: float = 0.0
    summary: tuple[float, ...] = field(default_factory=tuple)
    seconds_since_training: float = math.inf
    samples_since_training: int = 0
    batches_trained: int = 0
    finetuned: bool = False
    model_version: str = ""
    blamed: str = ""
    detector: str = ""

    def to_vector(self) -> np.ndarray:
        """Fixed-order float32 vector: FEATURES (each scaled to about [0, 1]) then summary."""
        since = self.seconds_since_training
        since_scaled = 1.0 if not math.isfinite(since) else min(since / _SECONDS_CAP, 1.0)
        fixed = [
            self.accuracy,
            self.f1,
            min(self.loss, _LOSS_CAP) / _LOSS_CAP,
            min(self.labelled_windows, _LABELLED_CAP) / _LABELLED_CAP,
            self.flagged_share,
            self.labelled_anomalous_share,
            min(self.drift, _DRIFT_CAP) / _DRIFT_CAP,
            since_scaled,
            min(self.samples_since_training, _SAMPLES_CAP) / _SAMPLES_CAP,
            min(self.batches_trained, _BATCHES_CAP) / _BATCHES_CAP,
            1.0 if self.finetuned else 0.0,
        ]
        summary = np.clip(np.asarray(self.summary, dtype=np.float32), -10.0, 10.0) / 10.0
        return np.concatenate([np.asarray(fixed, dtype=np.float32), summary])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = list(self.summary)
        # JSON has no infinity; null means "never trained".
        if not math.isfinite(self.seconds_since_training):
            data["seconds_since_training"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMState:
        data = dict(data)
        data["summary"] = tuple(float(v) for v in data.get("summary") or ())
        if data.get("seconds_since_training") is None:
            data["seconds_since_training"] = math.inf
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def age_text(seconds: float) -> str:
    """'45 s', '12 min', '5 h', '3 d': how long ago, for people."""
    seconds = max(0.0, seconds)
    for unit, size, below in (("s", 1, 120), ("min", 60, 120), ("h", 3600, 48)):
        if seconds < below * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds / 86_400:.0f} d"


def blame_text(metrics: Sequence[str], contributions: Sequence[float] | np.ndarray,
               count: int = 2) -> str:
    """'memory_percent=12.3,cpu_percent=1.1': the `count` metrics with the largest
    contributions, largest first (ties keep the metrics' order); '-' without any."""
    values = np.asarray(contributions, dtype=np.float64)
    if not len(values):
        return "-"
    order = np.argsort(-values, kind="stable")[:count]
    return ",".join(f"{metrics[i]}={values[i]:.1f}" for i in order)


def quality_of(probabilities: np.ndarray, labels: np.ndarray,
               threshold: float) -> tuple[float, float, float]:
    """(accuracy, F1, class-balanced cross-entropy) of anomaly `probabilities` against 0/1
    `labels` at `threshold`; all 0 for no windows. The state's and the control reward's
    measure of a model (controller/reward.py)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if not len(labels):
        return 0.0, 0.0, 0.0
    predicted = probabilities >= threshold
    accuracy = float(np.mean(predicted == labels))
    tp = int(np.sum(predicted & labels))
    fp = int(np.sum(predicted & ~labels))
    fn = int(np.sum(~predicted & labels))
    # F1 of a VM with no anomalies and no alarms is perfect, not undefined.
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    p = np.clip(probabilities, 1e-6, 1 - 1e-6)
    losses = np.where(labels, -np.log(p), -np.log(1 - p))
    # Class-balanced, as in training: rare anomalies are not drowned by normal windows.
    parts = [losses[labels].mean() if labels.any() else None,
             losses[~labels].mean() if (~labels).any() else None]
    return accuracy, float(f1), float(np.mean([x for x in parts if x is not None]))


def summary_of(values: np.ndarray, normalizer: Normalizer) -> tuple[float, ...]:
    """Per-metric mean then standard deviation of `values[N, M]` after normalization."""
    if len(values) == 0:
        return tuple(0.0 for _ in range(2 * len(normalizer.center)))
    normalized = normalizer.apply(values)
    return tuple(float(v) for v in (*normalized.mean(axis=0), *normalized.std(axis=0)))


def drift_score(values: np.ndarray, normalizer: Normalizer) -> float:
    """How far recent raw `values[N, M]` sit from what `normalizer` was fitted on.

    Robust location shift in scale units plus the log ratio of spreads, averaged over
    metrics. Metrics that were constant when fitted (scale fell back to 1) still count:
    a constant metric that starts moving is drift.
    """
    if len(values) < 2:
        return 0.0
    values = np.asarray(values, dtype=np.float64)
    center = np.asarray(normalizer.center, dtype=np.float64)
    scale = np.asarray(normalizer.scale, dtype=np.float64)
    shift = np.abs(np.median(values, axis=0) - center) / scale
    q75, q25 = np.percentile(values, [75, 25], axis=0)
    spread = np.maximum((q75 - q25) / 1.349, 1e-6 * scale)
    ratio = np.abs(np.log(spread / scale))
    return float(np.mean(np.minimum(shift, _DRIFT_CAP) + np.minimum(ratio, _DRIFT_CAP)))


def compute_state(
    vm_id: str,
    *,
    timestamp: float,
    recent_values: np.ndarray,
    normalizer: Normalizer,
    probabilities: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    agent_verdicts: Sequence[bool] | np.ndarray,
    recent_windows: int,
    last_trained_at: float | None,
    samples_since_training: int,
    batches_trained: int,
    finetuned: bool,
    model_version: str,
    blamed: str = "",
    detector: str = "",
) -> VMState:
    """Build a `VMState` from the trainer's recent data for one VM.

    probabilities / labels: the current model's anomaly probability on each recent
        labelled window and that window's 0/1 label (same length; may be empty).
    agent_verdicts: the verdicts the agent reported on recent windows.
    """
    labels = np.asarray(labels).astype(bool)
    accuracy, f1, loss = quality_of(probabilities, labels, threshold)
    verdicts = np.asarray(agent_verdicts, dtype=bool)
    since = math.inf if last_trained_at is None else max(0.0, timestamp - last_trained_at)
    return VMState(
        vm_id=vm_id,
        timestamp=timestamp,
        accuracy=accuracy,
        f1=float(f1),
        loss=loss,
        labelled_windows=len(labels),
        recent_windows=int(recent_windows),
        flagged_share=float(verdicts.mean()) if len(verdicts) else 0.0,
        labelled_anomalous_share=float(labels.mean()) if len(labels) else 0.0,
        drift=drift_score(recent_values, normalizer),
        summary=summary_of(np.asarray(recent_values, dtype=np.float32).reshape(
            -1, len(normalizer.center)), normalizer),
        seconds_since_training=since,
        samples_since_training=int(samples_since_training),
        batches_trained=int(batches_trained),
        finetuned=bool(finetuned),
        model_version=model_version,
        blamed=blamed,
        detector=detector,
    )
