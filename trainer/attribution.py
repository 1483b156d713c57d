"""Which metric is to blame: per-metric contributions of a window, ranked by what changed.

A verdict names the metrics that moved *within its own window*, not those farthest from
the VM's long-run normal: a metric that drifted days ago (a log volume filling up, a
cache that grew) stays far from normal and would otherwise take the top places from
the one that just broke. For a normalized window `x[M, T]`, split into its earlier
half (`T // 2` samples) and its newest half, the contribution of metric m is

    c_m = sqrt(mean over the newest half of (x_m,t - mean of x_m over the earlier half)^2)
          / scale_m

the root-mean-square departure of the newest half from the level the same metric held
just before, so both a level shift and a burst of fluctuation count. `scale_m` is that
metric's usual value of the same statistic on the VM's own history (its root mean
square over every window there, at least `floor`, in normalized units): a metric that
always jitters has to jitter more than usual to be blamed, and one that never moved
cannot turn a tiny wobble into the top place (the floor). Contributions only rank the
metrics; the anomaly score and its threshold do not use them (trainer/adaptation.py).

How this was chosen (HitRate@150 % of OmniAnomaly against `interpretation_label.txt`
of the 12 shared SMD machines, chosen on the machine-1-* ones; docs/detection.md has the
table): ranking by the newest sample's |deviation| from the train part's mean scores
0.527; the change of the newest k samples' mean against the window's earlier part
0.69-0.70 (k = 8-16); the RMS departure of the newest half above 0.75; the minimum,
product or sum of "far from normal" and "changed" all score below the change alone.

The same arithmetic runs here in NumPy (benchmarks, the trainer) and as a torch module
inside the exported ONNX graph (trainer/export.py); a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["AttributionModel", "WindowAttribution", "split"]

# Least scale of the change statistic, in normalized units: the normalizer's own scale
# floor already bounds one unit from below, so a metric may not claim less than one.
DEFAULT_FLOOR = 1.0


def split(window: int) -> tuple[int, int]:
    """(earlier, newest) sample counts of a window of `window` samples: two halves, the
    newest one taking the odd sample."""
    if window < 2:
        raise ValueError(f"attribution needs windows of at least 2 samples, got {window}")
    earlier = window // 2
    return earlier, window - earlier


def _change(windows: np.ndarray) -> np.ndarray:
    """RMS departure of the newest half from the earlier half's mean: `[B, M, T]` ->
    `[B, M]`."""
    windows = np.asarray(windows, dtype=np.float64)
    earlier, _ = split(windows.shape[-1])
    level = windows[..., :earlier].mean(axis=-1, keepdims=True)
    return np.sqrt(np.mean((windows[..., earlier:] - level) ** 2, axis=-1))


def _change_of_series(values: np.ndarray, window: int) -> np.ndarray:
    """`_change` of the window ending at every sample of normalized `values[N, M]` ->
    `[N, M]`, without building the windows (running sums); 0 before the first full
    window."""
    values = np.asarray(values, dtype=np.float64)
    earlier, newest = split(window)
    out = np.zeros_like(values)
    if len(values) < window:
        return out
    zero = np.zeros((1, values.shape[1]))
    s1 = np.concatenate([zero, np.cumsum(values, axis=0)])
    s2 = np.concatenate([zero, np.cumsum(values**2, axis=0)])
    end = np.arange(window, len(values) + 1)  # window = values[end - window : end]
    mid = end - newest
    level = (s1[mid] - s1[end - window]) / earlier
    mean1 = (s1[end] - s1[mid]) / newest
    mean2 = (s2[end] - s2[mid]) / newest
    # mean((x - level)^2) expanded; clipped at 0 against rounding.
    out[window - 1:] = np.sqrt(np.maximum(mean2 - 2 * level * mean1 + level**2, 0.0))
    return out


@dataclass(frozen=True)
class AttributionModel:
    scale: np.ndarray  # float64 [M], >= floor > 0

    @classmethod
    def fit(cls, values: np.ndarray, window: int,
            floor: float = DEFAULT_FLOOR) -> AttributionModel:
        """Fit on a VM's normalized history `values[N, M]` (mostly normal, no labels):
        each metric's RMS of the change statistic over every full window, at least
        `floor`. Fewer than `window` samples: the floor alone."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2:
            raise ValueError(f"need [samples, metrics] values, got {values.shape}")
        if floor <= 0:
            raise ValueError(f"the attribution floor must be positive, got {floor}")
        change = _change_of_series(values, window)[window - 1:]
        rms = np.sqrt(np.mean(change**2, axis=0)) if len(change) else np.zeros(values.shape[1])
        return cls(np.maximum(rms, floor))

    @classmethod
    def identity(cls, n_metrics: int, floor: float = DEFAULT_FLOOR) -> AttributionModel:
        """No VM statistics yet (the warm-up bundle, an adaptation saved before
        attribution was fitted): every metric at the floor."""
        return cls(np.full(n_metrics, float(floor)))

    def contributions(self, windows: np.ndarray) -> np.ndarray:
        """Per-metric contributions of normalized `windows[B, M, T]` -> `[B, M]`."""
        return _change(windows) / self.scale

    def contributions_of_series(self, values: np.ndarray, window: int) -> np.ndarray:
        """Contributions of the window ending at every sample of normalized
        `values[N, M]` -> `[N, M]` (0 before the first full window)."""
        return _change_of_series(values, window) / self.scale

    def to_dict(self) -> dict[str, object]:
        return {"scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> AttributionModel:
        scale = np.asarray(data["scale"], dtype=np.float64)
        if scale.ndim != 1 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError("attribution scale must be finite, positive, one per metric")
        return cls(scale)


class WindowAttribution(nn.Module):
    """`AttributionModel.contributions` as a torch module for the exported graph:
    `windows[B, M, T]` -> `contributions[B, M]` (a mean, a subtraction, a square root)."""

    def __init__(self, model: AttributionModel, window: int) -> None:
        super().__init__()
        self.earlier, _ = split(window)
        self.register_buffer("scale", torch.tensor(model.scale, dtype=torch.float32))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        level = windows[:, :, : self.earlier].mean(dim=2, keepdim=True)
        departure = windows[:, :, self.earlier:] - level
        return torch.sqrt((departure * departure).mean(dim=2)) / self.scale
