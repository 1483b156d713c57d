"""Windows over a multivariate series, their labels, and normalization.

Shapes: a series is `values[N, M]` (N samples of M metrics); a batch of windows is
`windows[W, M, T]` (metrics first, time last), the layout every model takes.
NumPy only: the agent uses this module too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

LabelRule = Literal["last", "any"]


def window_ends(n_samples: int, length: int, stride: int = 1) -> np.ndarray:
    """Index of the last sample of each window (windows end at length-1, +stride, ...)."""
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1, got {length} and {stride}")
    if n_samples < length:
        return np.zeros(0, dtype=np.int64)
    return np.arange(length - 1, n_samples, stride, dtype=np.int64)


def make_windows(values: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    """`values[N, M]` -> `windows[W, M, T]`, W = len(window_ends(N, T, stride)).

    Returns a read-only strided view; copy it before writing.
    """
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D [samples, metrics], got shape {values.shape}")
    ends = window_ends(len(values), length, stride)
    if len(ends) == 0:
        return np.zeros((0, values.shape[1], length), dtype=values.dtype)
    view = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)  # [N-T+1, M, T]
    return view[ends - (length - 1)]


def window_labels(
    labels: np.ndarray, length: int, stride: int = 1, rule: LabelRule = "last"
) -> np.ndarray:
    """Label of each window: its last sample's label ("last", the default, so a window's
    verdict is about *now*), or 1 if any sample in it is labelled ("any")."""
    ends = window_ends(len(labels), length, stride)
    labels = np.asarray(labels).astype(np.int8)
    if rule == "last":
        return labels[ends]
    if rule == "any":
        cumulative = np.concatenate([[0], np.cumsum(labels, dtype=np.int64)])
        return (cumulative[ends + 1] - cumulative[ends + 1 - length] > 0).astype(np.int8)
    raise ValueError(f"unknown label rule {rule!r}: use 'last' or 'any'")


@dataclass(frozen=True)
class Normalizer:
    """Robust per-metric scaling: (x - median) / scale, clipped to [-clip, clip].

    `scale` is the inter-quartile range / 1.349 (the standard deviation for Gaussian
    data), falling back to the standard deviation, then raised to at least `floor` (in
    the metric's own units): a metric that barely moved in the fitting data (a disk that
    idled for an hour, a counter stuck at 0) would otherwise get a tiny scale and turn
    its first ordinary wobble into a huge deviation. A metric with neither spread nor
    floor gets scale 1. Models clamp their own input further (trainer/models.py); the
    wide default clip keeps large deviations visible to the per-metric score.
    Its statistics travel inside the model bundle: agent and trainer never guess them.
    """

    center: tuple[float, ...]
    scale: tuple[float, ...]
    clip: float = 100.0

    @classmethod
    def fit(cls, values: np.ndarray, clip: float = 100.0,
            floor: float | Sequence[float] = 0.0) -> Normalizer:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) == 0:
            raise ValueError(f"need a non-empty [samples, metrics] array, got {values.shape}")
        floors = np.broadcast_to(np.asarray(floor, dtype=np.float64), values.shape[1:])
        if np.any(floors < 0) or not np.all(np.isfinite(floors)):
            raise ValueError(f"scale floors must be finite and >= 0, got {floor}")
        center = np.median(values, axis=0)
        q75, q25 = np.percentile(values, [75, 25], axis=0)
        scale = (q75 - q25) / 1.349
        std = values.std(axis=0)
        scale = np.where(scale > 1e-9, scale, std)
        scale = np.maximum(scale, floors)
        scale = np.where(scale > 1e-9, scale, 1.0)
        return cls(tuple(map(float, center)), tuple(map(float, scale)), float(clip))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Normalize `values[..., M]` (metrics on the last axis) to float32."""
        center = np.asarray(self.center, dtype=np.float32)
        scale = np.asarray(self.scale, dtype=np.float32)
        out = (np.asarray(values, dtype=np.float32) - center) / scale
        return np.clip(out, -self.clip, self.clip, out=out)

    def apply_windows(self, windows: np.ndarray) -> np.ndarray:
        """Normalize raw windows `[W, M, T]` (metrics on the middle axis, the layout
        models take) to C-contiguous float32 `[W, M, T]`."""
        windows = np.asarray(windows)
        return np.ascontiguousarray(self.apply(windows.transpose(0, 2, 1)).transpose(0, 2, 1))

    def widened(self, metrics: int) -> Normalizer:
        """These statistics for the first metrics of `metrics`, the others unscaled
        (centre 0, scale 1): what a VM's own metrics after a network's get until its
        own statistics are fitted (the warm-up, which raises no alarm)."""
        extra = metrics - len(self.center)
        if extra < 0:
            raise ValueError(f"cannot widen {len(self.center)} metrics to {metrics}")
        return Normalizer(self.center + (0.0,) * extra, self.scale + (1.0,) * extra,
                          self.clip)

    def narrowed(self, metrics: int) -> Normalizer:
        """These statistics for the first `metrics` metrics only."""
        if not 0 < metrics <= len(self.center):
            raise ValueError(f"cannot narrow {len(self.center)} metrics to {metrics}")
        return Normalizer(self.center[:metrics], self.scale[:metrics], self.clip)

    def to_dict(self) -> dict[str, object]:
        return {"kind": "robust", "center": list(self.center), "scale": list(self.scale),
                "clip": self.clip}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Normalizer:
        if data.get("kind") != "robust":
            raise ValueError(f"unknown normalization kind {data.get('kind')!r}")
        center = tuple(float(v) for v in data["center"])  # type: ignore[union-attr]
        scale = tuple(float(v) for v in data["scale"])  # type: ignore[union-attr]
        if len(center) != len(scale):
            raise ValueError("normalization center and scale differ in length")
        if any(not np.isfinite(s) or s <= 0 for s in scale):
            raise ValueError("normalization scale must be finite and positive")
        return cls(center, scale, float(data.get("clip", 10.0)))  # type: ignore[arg-type]
