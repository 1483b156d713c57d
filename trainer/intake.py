"""Validation of each telemetry batch at the wire boundary, before anything reaches the
store: no single value may stop a VM's telemetry.

A batch-level problem (no vm_id, an id too long, metrics this trainer's model does not
take: a VM sends the network's metrics first, in its order, then any of its own) refuses
the whole batch (`BatchError`, answered with `Ack.error`). A bad sample,
verdict or label (a NaN or infinite value, a score outside [0, 1], a timestamp that is
not a plausible Unix time, a seq out of range or not increasing, a text field too long)
is refused alone and counted by reason; the rest of the batch is stored.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vmad.labels import LabelInterval
from vmad.protos.vmad.v1 import telemetry_pb2
from vmad.wire import labels_from_messages

__all__ = ["MAX_ID_CHARS", "MAX_METRICS", "MAX_SEQ", "BatchError", "CleanBatch", "clean_batch",
           "metrics_problem", "valid_timestamp"]

MAX_ID_CHARS = 128
# Sequence numbers are SQLite INTEGERs (signed 64 bit).
MAX_SEQ = 2**63 - 1
# Agent clocks drift; a sample a day ahead of the trainer's clock is a broken clock.
MAX_CLOCK_AHEAD_S = 86_400.0
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # stored as float32: larger is infinite
# A VM's metrics in all (the network's and its own): each is a column of every sample,
# every window the agent scores and every refit.
MAX_METRICS = 256
_METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


class BatchError(ValueError):
    """The whole batch is refused (named in Ack.error)."""


@dataclass
class CleanBatch:
    """A batch with every value checked; what failed is in `refused` (reason -> count)."""

    vm_id: str
    metrics: tuple[str, ...]  # the network's, then the VM's own
    seqs: np.ndarray  # int64 [N], strictly increasing
    timestamps: np.ndarray  # float64 [N]
    values: np.ndarray  # float32 [N, M]
    # (timestamp, score, anomalous, model version, per-metric contributions or ())
    verdicts: list[tuple[float, float, bool, str, tuple[float, ...]]]
    labels: list[LabelInterval]
    spool_id: str
    first_seq: int
    refused: Counter[str] = field(default_factory=Counter)
    refused_seqs: list[int] = field(default_factory=list)  # in range, not stored


def valid_timestamp(ts: float, now: float) -> bool:
    return math.isfinite(ts) and 0.0 <= ts <= now + MAX_CLOCK_AHEAD_S


def _check_id(value: str, what: str) -> None:
    if not value:
        raise BatchError(f"batch has no {what}")
    if len(value) > MAX_ID_CHARS:
        raise BatchError(f"{what} is {len(value)} characters, above {MAX_ID_CHARS}")


def metrics_problem(vm_metrics: Sequence[str], network: Sequence[str]) -> str:
    """Why a trainer whose network reads `network` cannot serve a VM that reports
    `vm_metrics` ("" when it can): the network's metrics come first, in its order; any
    after them are the VM's own (read by its unsupervised parts only): each a name of
    1-64 letters, digits or `_.:/-`, none twice, at most MAX_METRICS in all."""
    vm_metrics, network = tuple(vm_metrics), tuple(network)
    if vm_metrics[:len(network)] != network:
        return (f"VM sends metrics {list(vm_metrics)[:16]}; this trainer's model takes "
                f"{list(network)} first, in that order")
    if len(vm_metrics) > MAX_METRICS:
        return f"VM sends {len(vm_metrics)} metrics, above {MAX_METRICS}"
    bad = [name for name in vm_metrics[len(network):] if not _METRIC_NAME.fullmatch(name)]
    if bad:
        return (f"metric name {bad[0][:80]!r} is not 1-64 letters, digits or _.:/-")
    if len(set(vm_metrics)) != len(vm_metrics):
        twice = sorted({name for name in vm_metrics if vm_metrics.count(name) > 1})
        return f"VM sends metric {twice[0]!r} twice"
    return ""


def clean_batch(batch: telemetry_pb2.TelemetryBatch, metrics: tuple[str, ...],
                now: float | None = None) -> CleanBatch:
    """Check every field of `batch` (whose VM may report metrics of its own after the
    network's `metrics`); raise BatchError for a batch-level problem."""
    now = time.time() if now is None else now
    _check_id(batch.vm_id, "vm_id")
    if len(batch.spool_id) > MAX_ID_CHARS:
        raise BatchError(f"spool_id is {len(batch.spool_id)} characters, above {MAX_ID_CHARS}")
    problem = metrics_problem(batch.metrics, metrics)
    if problem:
        raise BatchError(problem)
    refused: Counter[str] = Counter()
    m = len(batch.metrics)
    horizon = now + MAX_CLOCK_AHEAD_S
    isfinite = math.isfinite
    seqs: list[int] = []
    stamps: list[float] = []
    rows: list[list[float]] = []
    refused_seqs: list[int] = []
    last = 0
    # A plain loop: batches hold 1 to a few hundred samples, where per-sample Python is
    # cheaper than numpy's per-call overhead.
    for sample in batch.samples:
        seq, ts, values = sample.seq, sample.timestamp, list(sample.values)
        if not 1 <= seq <= MAX_SEQ:
            refused["seq out of range"] += 1
            continue
        if seq <= last:
            reason = "seq not increasing"
        elif not (isfinite(ts) and 0.0 <= ts <= horizon):
            reason = "timestamp not a plausible Unix time"
        elif len(values) != m:
            reason = "sample without one value per metric"
        elif not all(-_FLOAT32_MAX <= v <= _FLOAT32_MAX for v in values):  # NaN fails too
            reason = "NaN or infinite metric value"
        else:
            seqs.append(seq)
            stamps.append(ts)
            rows.append(values)
            last = seq
            continue
        refused[reason] += 1
        refused_seqs.append(seq)
    verdicts = []
    for v in batch.verdicts:
        if not valid_timestamp(v.timestamp, now):
            refused["verdict timestamp not a plausible Unix time"] += 1
        elif not (math.isfinite(v.score) and 0.0 <= v.score <= 1.0):
            refused["verdict score not a finite number in [0, 1]"] += 1
        elif len(v.model_version) > MAX_ID_CHARS:
            refused["verdict model_version too long"] += 1
        elif v.contributions and (len(v.contributions) != m or not all(
                isfinite(c) for c in v.contributions)):
            refused["verdict contributions not one finite value per metric"] += 1
        else:
            verdicts.append((v.timestamp, v.score, v.anomalous, v.model_version,
                             tuple(v.contributions)))
    good_labels = []
    for message in batch.labels:
        reason = label_problem(message, now)
        if reason:
            refused[reason] += 1
        else:
            good_labels.append(message)
    return CleanBatch(
        vm_id=batch.vm_id, metrics=tuple(batch.metrics), seqs=np.array(seqs, dtype=np.int64),
        timestamps=np.array(stamps, dtype=np.float64),
        values=np.array(rows, dtype=np.float32).reshape(len(rows), m),
        verdicts=verdicts, labels=labels_from_messages(good_labels) if good_labels else [],
        spool_id=batch.spool_id, first_seq=min(int(batch.first_seq), MAX_SEQ),
        refused=refused, refused_seqs=refused_seqs)


def label_problem(label: telemetry_pb2.LabelInterval, now: float | None = None) -> str:
    """Why `label` cannot be stored ("" when it can)."""
    now = time.time() if now is None else now
    if not (valid_timestamp(label.start, now) and valid_timestamp(label.end, now)):
        return "label time not a plausible Unix time"
    if label.end < label.start:
        return "label ends before it starts"
    if len(label.id) > MAX_ID_CHARS or len(label.kind) > MAX_ID_CHARS:
        return "label id or kind too long"
    return ""
