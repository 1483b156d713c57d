"""Which metric is to blame: per-metric contributions of a window, ranked first by what
changed within it.

A verdict names the metrics that moved *within its own window*, not those farthest from
the VM's long-run normal: a metric that drifted days ago (a log volume filling up, a
cache that grew) stays far from normal and would otherwise take the top places from
the one that just broke. For a normalized window `x[M, T]`, split into its earlier
half (`T // 2` samples) and its newest half, metric m's change is

    change_m = sqrt(mean over the newest half of (x_m,t - mean of x_m over the earlier half)^2)
               / scale_m

the root-mean-square departure of the newest half from the level the same metric held
just before, so both a level shift and a burst of fluctuation count. `scale_m` is that
metric's usual value of the same statistic on the VM's own history (its root mean
square over every window there, at least `floor`, in normalized units): a metric that
always jitters has to jitter more than usual to be blamed, and one that never moved
cannot turn a tiny wobble into the top place. A fault that has lasted longer than the
window no longer changes within it, so the distance of the newest sample from the VM's
normal still counts, at a fifth of its weight (`FAR_WEIGHT`):

    contribution_m = max(change_m, FAR_WEIGHT * |x_m,newest - mean_m| / spread_m)

with `mean_m` and `spread_m` (root mean square around it, at least `floor`) fitted on
the same history. As changes are about 1 on normal windows by construction, a metric
has to sit some 10-15 of its spreads off normal to be blamed without having changed.
Contributions only rank the metrics; the anomaly score and its threshold do not use
them (trainer/adaptation.py).

How this was chosen (HitRate@100 % / @150 % of OmniAnomaly, docs/detection.md has the
tables; rules picked on SMD's machine-1-* and checked on machine-2-* and on the unseen
synthetic VMs of bench/attribution.py): the newest sample's distance from normal alone
scores 0.527 @150 % on SMD (0.999 on the synthetic VMs, whose faults stand far off a
quiet normal); the change of the newest 8-16 samples' mean against the window's
earlier part 0.69-0.70; the RMS departure of the newest half 0.751, but 0.858 @100 %
on the synthetic VMs, whose faults outlast the window; the max with a fifth of the
distance keeps SMD at 0.746 and lifts the synthetic VMs to 0.991. The minimum, product
or plain sum of distance and change all scored below.

The same arithmetic runs here in NumPy (benchmarks, the trainer) and as a torch module
inside the exported ONNX graph (trainer/export.py); a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["AttributionModel", "WindowAttribution", "split"]

# Least scale of the change and spread of the distance, in normalized units: the
# normalizer's own scale floor already bounds one unit from below, so a metric may not
# claim less than one.
DEFAULT_FLOOR = 1.0
# Weight of the distance from normal against the change (see the module docstring).
FAR_WEIGHT = 0.2


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
    scale: np.ndarray  # float64 [M], >= floor > 0: each metric's usual change
    mean: np.ndarray  # float64 [M]: the VM's normal level
    spread: np.ndarray  # float64 [M], >= floor > 0: root mean square around it
    far_weight: float = FAR_WEIGHT

    @classmethod
    def fit(cls, values: np.ndarray, window: int, floor: float = DEFAULT_FLOOR,
            far_weight: float = FAR_WEIGHT) -> AttributionModel:
        """Fit on a VM's normalized history `values[N, M]` (mostly normal, no labels):
        each metric's RMS of the change over every full window (the floor alone with
        fewer than `window` samples), its mean and spread, all at least `floor`."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) < 1:
            raise ValueError(f"need [samples >= 1, metrics] values, got {values.shape}")
        if floor <= 0 or far_weight < 0:
            raise ValueError(f"need floor > 0 and far_weight >= 0, got {floor}, {far_weight}")
        change = _change_of_series(values, window)[window - 1:]
        rms = np.sqrt(np.mean(change**2, axis=0)) if len(change) else np.zeros(values.shape[1])
        mean = values.mean(axis=0)
        spread = np.sqrt(np.mean((values - mean) ** 2, axis=0))
        return cls(np.maximum(rms, floor), mean, np.maximum(spread, floor), float(far_weight))

    @classmethod
    def identity(cls, n_metrics: int, floor: float = DEFAULT_FLOOR) -> AttributionModel:
        """No VM statistics yet (the warm-up bundle, an adaptation saved before
        attribution was fitted): normal at the normalizer's centre, every scale at the
        floor."""
        ones = np.full(n_metrics, float(floor))
        return cls(ones, np.zeros(n_metrics), ones.copy())

    def _combine(self, change: np.ndarray, newest: np.ndarray) -> np.ndarray:
        far = np.abs(newest - self.mean) / self.spread
        return np.maximum(change / self.scale, self.far_weight * far)

    def contributions(self, windows: np.ndarray) -> np.ndarray:
        """Per-metric contributions of normalized `windows[B, M, T]` -> `[B, M]`."""
        windows = np.asarray(windows, dtype=np.float64)
        return self._combine(_change(windows), windows[..., -1])

    def contributions_of_series(self, values: np.ndarray, window: int) -> np.ndarray:
        """Contributions of the window ending at every sample of normalized
        `values[N, M]` -> `[N, M]` (before the first full window, the distance only)."""
        values = np.asarray(values, dtype=np.float64)
        return self._combine(_change_of_series(values, window), values)

    def to_dict(self) -> dict[str, object]:
        return {"scale": self.scale.tolist(), "mean": self.mean.tolist(),
                "spread": self.spread.tolist(), "far_weight": self.far_weight}

    @classmethod
    def from_dict(cls, data: dict) -> AttributionModel:
        scale, mean, spread = (np.asarray(data[k], dtype=np.float64)
                               for k in ("scale", "mean", "spread"))
        far_weight = float(data.get("far_weight", FAR_WEIGHT))
        if scale.ndim != 1 or mean.shape != scale.shape or spread.shape != scale.shape \
                or not all(np.all(np.isfinite(a)) for a in (scale, mean, spread)) \
                or np.any(scale <= 0) or np.any(spread <= 0) \
                or not (np.isfinite(far_weight) and far_weight >= 0):
            raise ValueError("attribution scale, mean and spread must be finite, one per "
                             "metric, scale and spread positive, far_weight >= 0")
        return cls(scale, mean, spread, far_weight)


class WindowAttribution(nn.Module):
    """`AttributionModel.contributions` as a torch module for the exported graph:
    `windows[B, M, T]` -> `contributions[B, M]`. Arranged for few ONNX nodes (each costs
    the agent a few hundred nanoseconds): one matrix product gives every newest sample's
    departure from the earlier half's mean, constants folded per metric."""

    def __init__(self, model: AttributionModel, window: int) -> None:
        super().__init__()
        earlier, newest = split(window)
        # departure[:, :, j] = x[:, :, earlier + j] - mean(x[:, :, :earlier])
        departure = np.zeros((window, newest))
        departure[:earlier, :] = -1.0 / earlier
        departure[earlier + np.arange(newest), np.arange(newest)] = 1.0
        self.register_buffer("departure", torch.tensor(departure, dtype=torch.float32))
        # change^2 = sum(departure^2) / (newest * scale^2)
        self.register_buffer("change_factor", torch.tensor(
            1.0 / (newest * model.scale**2), dtype=torch.float32))
        # far_weight * |x - mean| / spread = |x * a - b|
        self.register_buffer("far_a", torch.tensor(model.far_weight / model.spread,
                                                   dtype=torch.float32))
        self.register_buffer("far_b", torch.tensor(model.far_weight * model.mean / model.spread,
                                                   dtype=torch.float32))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        departure = windows @ self.departure
        change = torch.sqrt((departure * departure).sum(dim=2) * self.change_factor)
        far = (windows[:, :, -1] * self.far_a - self.far_b).abs()
        return torch.maximum(change, far)
