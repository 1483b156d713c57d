"""Series the demo's simulated agents replay, and how their verdicts are scored.

Sources: the synthetic generator (vmad/synthetic.py) and, when `../shared/datasets/smd`
is present, SMD test parts mapped onto the default metrics. SMD is min-max scaled to
[0, 1] by its publishers; we map cpu_r and mem_u to percent and disk_wb and eth1_fi to
"MB/s" by a fixed factor so the values sit in the ranges the default model was
pretrained on. The trainer refits normalization per VM when it fine-tunes, so the
factor matters only for the pretrained model's first verdicts.

Scoring is event-wise (no point adjustment): a labelled anomaly segment is *detected*
when some window ending inside it (or within `grace` samples after it) is flagged; a run
of flagged windows that touches no segment is one *false alarm*.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmad.schema import DEFAULT_METRICS

__all__ = ["EventScore", "ReplaySeries", "load_smd", "runs", "score_events",
           "synthetic_series"]

SMD_COLUMNS: dict[str, tuple[str, float]] = {
    "cpu_percent": ("cpu_r", 100.0),
    "memory_percent": ("mem_u", 100.0),
    "disk_mb_s": ("disk_wb", 50.0),
    "net_mb_s": ("eth1_fi", 50.0),
}


@dataclass(frozen=True)
class ReplaySeries:
    name: str
    values: np.ndarray  # float32 [N, M] in DEFAULT_METRICS order
    labels: np.ndarray  # int8 [N]
    source: str


@dataclass(frozen=True)
class EventScore:
    events: int
    detected: int
    missed: int
    false_alarms: int


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end] (inclusive) of each run of true values."""
    flags = np.asarray(flags, dtype=bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flags, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(),
                    (np.flatnonzero(edges == -1) - 1).tolist(), strict=True))


def score_events(labels: np.ndarray, flagged: np.ndarray, scored: np.ndarray,
                 grace: int = 0) -> EventScore:
    """Event-wise score of per-sample verdicts.

    labels: 0/1 per sample; flagged: the verdict of the window ending at each sample;
    scored: which samples had a window scored at all (the first T-1 never do, nor samples
    not yet replayed). Segments with no scored sample are left out.
    """
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool) & np.asarray(scored, dtype=bool)
    scored = np.asarray(scored, dtype=bool)
    segments = [(s, e) for s, e in runs(labels) if scored[s:e + 1 + grace].any()]
    covered = np.zeros(len(labels), dtype=bool)
    detected = 0
    for start, end in segments:
        stop = min(len(labels), end + 1 + grace)
        covered[start:stop] = True
        if flagged[start:stop].any():
            detected += 1
    false_alarms = sum(1 for s, e in runs(flagged) if not covered[s:e + 1].any())
    return EventScore(len(segments), detected, len(segments) - detected, false_alarms)


def synthetic_series(seed: int, n_vms: int, n_samples: int) -> list[ReplaySeries]:
    from vmad.synthetic import generate_vm

    out = []
    for i in range(n_vms):
        series, _ = generate_vm(seed * 1000 + i, n_samples)
        series = series.select(DEFAULT_METRICS) if series.metrics != DEFAULT_METRICS else series
        labels = (series.labels if series.labels is not None
                  else np.zeros(len(series), dtype=np.int8))
        out.append(ReplaySeries(f"synthetic-{i}", np.asarray(series.values, np.float32),
                                np.asarray(labels, np.int8), "synthetic"))
    return out


def load_smd(folder: str | Path, machines: int, n_samples: int,
             lead: int = 300) -> list[ReplaySeries]:
    """Stretches of `n_samples` from the labelled test part of the first `machines` SMD
    machines, each starting `lead` samples before its first anomaly (so a short demo
    replays at least one)."""
    folder = Path(folder)
    out = []
    for machine in sorted(p for p in folder.iterdir() if (p / "test.csv.gz").is_file()):
        if len(out) >= machines:
            break
        with gzip.open(machine / "test.csv.gz", "rt", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            try:
                columns = [header.index(SMD_COLUMNS[m][0]) for m in DEFAULT_METRICS]
                label_column = header.index("label")
            except ValueError:
                continue
            rows = [(tuple(float(r[c]) for c in columns), int(float(r[label_column])))
                    for r in reader]
        values = np.array([r[0] for r in rows], dtype=np.float32)
        values *= np.array([SMD_COLUMNS[m][1] for m in DEFAULT_METRICS], dtype=np.float32)
        labels = np.array([r[1] for r in rows], dtype=np.int8)
        anomalous = np.flatnonzero(labels)
        start = max(0, int(anomalous[0]) - lead) if len(anomalous) else 0
        start = min(start, max(0, len(rows) - n_samples))
        out.append(ReplaySeries(f"smd-{machine.name}", values[start:start + n_samples],
                                labels[start:start + n_samples], "smd"))
    return out
