"""Labelled windows for training, drawn from many series without copying them.

A `WindowPool` indexes the windows of several normalized series as one sequence, and
gathers a mini-batch only when asked, so pretraining on a dozen 24k-sample, 38-metric
series needs the series in memory once, not the 2+ GB their stride-1 windows would take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vmad.series import Series
from vmad.windows import LabelRule, Normalizer, make_windows, window_ends, window_labels

__all__ = ["SYNTHETIC_ALIASES", "WindowPool", "WindowSource", "align_metrics"]

# Where the synthetic generator's metrics land in a target that names them differently
# (the SMD columns carrying the same physical quantity), so synthetic faults can join a
# pretraining set on SMD's metric layout.
SYNTHETIC_ALIASES: Mapping[str, str] = {
    "cpu_percent": "cpu_r",
    "memory_percent": "mem_u",
    "disk_mb_s": "disk_wb",
    "net_mb_s": "eth1_fi",
}


@dataclass(frozen=True)
class WindowSource:
    """The windows of one normalized series ending at `ends` (sample indices)."""

    name: str
    windows: np.ndarray  # strided view [W_all, M, T] over the normalized series
    ends: np.ndarray  # which of them this source uses, as window-end sample indices
    labels: np.ndarray  # int8 [len(ends)]

    @classmethod
    def from_series(
        cls,
        series: Series,
        normalizer: Normalizer,
        window: int,
        *,
        start: int = 0,
        stop: int | None = None,
        rule: LabelRule = "last",
    ) -> WindowSource:
        """Windows whose last sample lies in [start, stop); they may reach back before
        `start` (the past is known at detection time)."""
        if series.labels is None:
            raise ValueError(f"series {series.name} has no labels to train or score on")
        normalized = normalizer.apply(series.values)
        all_ends = window_ends(len(series), window)
        stop = len(series) if stop is None else stop
        keep = (all_ends >= start) & (all_ends < stop)
        labels = window_labels(series.labels, window, rule=rule)[keep]
        return cls(series.name, make_windows(normalized, window), all_ends[keep], labels)

    def __len__(self) -> int:
        return len(self.ends)

    def gather(self, index: np.ndarray) -> np.ndarray:
        window = self.windows.shape[2]
        return self.windows[self.ends[index] - (window - 1)]


class WindowPool:
    """Several `WindowSource`s seen as one indexable array of windows `[W, M, T]`."""

    def __init__(self, sources: Sequence[WindowSource]) -> None:
        sources = [s for s in sources if len(s)]
        if not sources:
            raise ValueError("a window pool needs at least one non-empty source")
        shapes = {s.windows.shape[1:] for s in sources}
        if len(shapes) != 1:
            raise ValueError(f"sources disagree on [metrics, window]: {sorted(shapes)}")
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.labels = np.concatenate([s.labels for s in sources])
        self.shape = (int(self.offsets[-1]), *shapes.pop())

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: np.ndarray | slice) -> np.ndarray:
        index = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        out = np.empty((len(index), *self.shape[1:]), dtype=np.float32)
        owner = np.searchsorted(self.offsets, index, side="right") - 1
        for source_id in np.unique(owner):
            rows = np.flatnonzero(owner == source_id)
            local = index[rows] - self.offsets[source_id]
            out[rows] = self.sources[source_id].gather(local)
        return out

    def source_weights(self, shares: Mapping[str, float]) -> np.ndarray:
        """Per-window sampling weights giving each named source its share of draws; the
        others split the rest in proportion to their size."""
        weights = np.ones(len(self), dtype=np.float64)
        fixed = {i for i, s in enumerate(self.sources) if s.name in shares}
        rest = len(self) - sum(len(self.sources[i]) for i in fixed)
        rest_share = 1.0 - sum(shares[self.sources[i].name] for i in fixed)
        for i, source in enumerate(self.sources):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            share = shares[source.name] if i in fixed else rest_share * len(source) / max(rest, 1)
            weights[lo:hi] = share / len(source)
        return weights


def align_metrics(series: Series, target_metrics: Sequence[str]) -> Series | None:
    """`series` re-laid onto `target_metrics`: same names kept, synthetic metrics moved to
    their aliases, metrics the series lacks filled with zeros
    (constant, so they normalize to 0). None when no metric maps at all."""
    target_metrics = tuple(target_metrics)
    if series.metrics == target_metrics:
        return series
    position = {name: i for i, name in enumerate(series.metrics)}
    values = np.zeros((len(series), len(target_metrics)), dtype=np.float32)
    mapped = 0
    for column, name in enumerate(target_metrics):
        source = name if name in position else next(
            (s for s, alias in SYNTHETIC_ALIASES.items() if alias == name and s in position), None
        )
        if source is not None:
            values[:, column] = series.values[:, position[source]]
            mapped += 1
    if mapped == 0:
        return None
    return Series(series.name, series.timestamps, values, target_metrics, series.labels)
