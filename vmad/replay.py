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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmad.evaluation import events, run_lengths
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
    values: np.ndarray  # float32 [N, M] in `metrics` order
    labels: np.ndarray  # int8 [N]
    source: str
    # The first `history` samples are the VM's past: sent in one batch at connect, as
    # from a VM that has run for that long, and left out of the demo's scores.
    history: int = 0
    # The default metrics, then any of the VM's own (the trainer's network reads the
    # former, the VM's detector all of them).
    metrics: tuple[str, ...] = DEFAULT_METRICS


@dataclass(frozen=True)
class EventScore:
    events: int
    detected: int
    missed: int
    false_alarms: int


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end] (inclusive) of each run of true values."""
    return [(start, stop - 1) for start, stop in events(flags)]


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


def synthetic_series(seed: int, n_vms: int, n_samples: int,
                     history: int = 0) -> list[ReplaySeries]:
    """`n_vms` generated VMs of `history` past samples and `n_samples` replayed ones."""
    from vmad.synthetic import generate_vm

    out = []
    for i in range(n_vms):
        series, _ = generate_vm(seed * 1000 + i, history + n_samples)
        series = series.select(DEFAULT_METRICS) if series.metrics != DEFAULT_METRICS else series
        labels = (series.labels if series.labels is not None
                  else np.zeros(len(series), dtype=np.int8))
        out.append(ReplaySeries(f"synthetic-{i}", np.asarray(series.values, np.float32),
                                np.asarray(labels, np.int8), "synthetic", history))
    return out


@dataclass(frozen=True)
class _SMDPart:
    values: np.ndarray  # float32 [N, M]: the default metrics in the agent's units, then own
    labels: np.ndarray  # int8 [N]; the train part's all 0
    metrics: tuple[str, ...]


def _smd_part(path: Path, labelled: bool) -> _SMDPart | None:
    """One SMD csv: the default metrics (in the agent's units), then every other metric
    column as the VM's own (`smd.<column>`, as recorded: SMD scales each to [0, 1]);
    None when a column is missing."""
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        try:
            columns = [header.index(SMD_COLUMNS[m][0]) for m in DEFAULT_METRICS]
            label_column = header.index("label") if labelled else -1
        except ValueError:
            return None
        own = [i for i, name in enumerate(header)
               if i > 0 and name != "label" and i not in columns]
        columns += own
        rows = [(tuple(float(r[c]) for c in columns),
                 int(float(r[label_column])) if labelled else 0) for r in reader]
    values = np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, len(columns))
    values[:, :len(DEFAULT_METRICS)] *= np.array(
        [SMD_COLUMNS[m][1] for m in DEFAULT_METRICS], dtype=np.float32)
    return _SMDPart(values, np.array([r[1] for r in rows], dtype=np.int8),
                    DEFAULT_METRICS + tuple(f"smd.{header[i]}" for i in own))


def load_smd(folder: str | Path, machines: int, n_samples: int,
             lead: int = 300, history: int = 0) -> list[ReplaySeries]:
    """Stretches of `n_samples` from the labelled test part of the first `machines` SMD
    machines, each starting `lead` samples before its first anomaly (so a short demo
    replays at least one), after up to `history` samples of what came before it (the
    end of the train part where the test part has too few). Each replays all its
    metrics: the agent's 4, then SMD's other 34 as the VM's own."""
    folder = Path(folder)
    out = []
    for machine in sorted(p for p in folder.iterdir() if (p / "test.csv.gz").is_file()):
        if len(out) >= machines:
            break
        test = _smd_part(machine / "test.csv.gz", labelled=True)
        if test is None:
            continue
        values, labels = test.values, test.labels
        anomalous = np.flatnonzero(labels)
        start = max(0, int(anomalous[0]) - lead) if len(anomalous) else 0
        start = min(start, max(0, len(values) - n_samples))
        train = _smd_part(machine / "train.csv.gz", labelled=False) \
            if history > start and (machine / "train.csv.gz").is_file() else None
        if train is not None and train.metrics == test.metrics:
            # SMD's train part is the stretch just before its test part.
            values = np.concatenate([train.values, values])
            labels = np.concatenate([train.labels, labels])
            start += len(train.values)
        past = min(history, start)
        stretch = slice(start - past, start + n_samples)
        out.append(ReplaySeries(f"smd-{machine.name}", values[stretch], labels[stretch],
                                "smd", past, test.metrics))
    return out


class ReplayAgent:
    """A simulated agent: replays one series to a trainer over the same gRPC calls a real
    agent uses (telemetry stream with acks, bundle watch), scoring windows with the
    bundle it was last sent. Sample i has sequence number i + 1 and timestamp
    `t0 + i * interval_s`; each labelled anomaly segment is shipped as a label interval
    in the batch that completes it (ground truth arrives after the fact, as it would
    from an operator).

    Not thread-safe except `start_watch`, which swaps the bundle from its own thread.
    """

    def __init__(self, address: str, vm_id: str, series: ReplaySeries, *,
                 t0: float = 0.0, interval_s: float = 5.0, batch_size: int = 12,
                 bundle: object | None = None, metrics: tuple[str, ...] = DEFAULT_METRICS,
                 timeout: float = 10.0, security: Any | None = None) -> None:
        import grpc

        self.address, self.vm_id, self.series = address, vm_id, series
        self.t0, self.interval_s, self.batch_size = t0, interval_s, batch_size
        self.metrics, self.timeout = metrics, timeout
        self.bundle = bundle
        self.acked = 0
        self.sent = 0  # index of the next sample to send
        self.resent = 0
        self.bundles_received: list[str] = []
        self.scores = np.full(len(series.values), np.nan, dtype=np.float32)
        self.flagged = np.zeros(len(series.values), dtype=bool)
        self._segments = runs(series.labels)
        self._grpc = grpc
        self.security = security
        self._metadata = ()
        if security is not None:
            from vmad.security import call_metadata

            self._metadata = call_metadata(security)
        self._channel = self._open()
        self._watch: object | None = None
        self._batch_id = 0

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()  # type: ignore[attr-defined]
        self._channel.close()

    def reconnect(self) -> None:
        self._channel.close()
        self._channel = self._open()

    def _open(self) -> Any:
        if self.security is None:
            return self._grpc.insecure_channel(self.address)
        from vmad.security import open_channel

        return open_channel(self.address, self.security)

    def timestamp(self, index: int) -> float:
        return self.t0 + index * self.interval_s

    def _score(self, start: int, stop: int) -> list[Any]:
        from vmad.protos.vmad.v1 import telemetry_pb2

        bundle = self.bundle
        if bundle is None:
            return []
        window = bundle.window  # type: ignore[attr-defined]
        ends = np.arange(max(start, window - 1), stop)
        if len(ends) == 0:
            return []
        values = self.series.values
        raw = np.stack([values[e - window + 1:e + 1].T for e in ends])
        scores = bundle.score(raw)  # type: ignore[attr-defined]
        # Windows at the threshold just before this batch count towards `alarm_after`.
        meta = bundle.metadata  # type: ignore[attr-defined]
        earlier = self.scores[max(0, ends[0] - meta.alarm_after):ends[0]] >= meta.threshold
        before = int(run_lengths(earlier)[-1]) if len(earlier) else 0
        flags = bundle.verdicts(scores, before)  # type: ignore[attr-defined]
        self.scores[ends], self.flagged[ends] = scores, flags
        version = meta.version
        return [telemetry_pb2.Verdict(end_seq=int(e) + 1, timestamp=self.timestamp(int(e)),
                                      score=float(sc), anomalous=bool(f), model_version=version)
                for e, sc, f in zip(ends, scores, flags, strict=True)]

    def _batch(self, start: int, stop: int, batch_id: int) -> Any:
        from vmad.protos.vmad.v1 import telemetry_pb2

        labels = [telemetry_pb2.LabelInterval(
            start=self.timestamp(s), end=self.timestamp(e), anomalous=True,
            source=telemetry_pb2.LABEL_SOURCE_OPERATOR, kind="replay", id=f"{self.vm_id}-{s}")
            for s, e in self._segments if start <= e < stop]
        return telemetry_pb2.TelemetryBatch(
            vm_id=self.vm_id, metrics=list(self.metrics), interval_s=self.interval_s,
            samples=[telemetry_pb2.Sample(seq=i + 1, timestamp=self.timestamp(i),
                                          values=self.series.values[i].tolist())
                     for i in range(start, stop)],
            verdicts=self._score(start, stop), labels=labels, batch_id=batch_id)

    def send_until(self, stop: int) -> int:
        """Send every sample not yet acknowledged, up to index `stop` (exclusive), on one
        stream, lock-step (batch, ack). Resumes after the last ack, so after a lost
        connection unacknowledged samples are sent again. Returns the new ack; raises
        grpc.RpcError when the trainer is unreachable."""
        import queue

        from vmad.protos.vmad.v1 import telemetry_pb2_grpc

        stop = min(stop, len(self.series.values))
        if self.sent > self.acked:
            self.resent += self.sent - self.acked
        self.sent = self.acked
        if self.sent >= stop:
            return self.acked
        outbox: queue.Queue = queue.Queue()

        def requests() -> Iterator[Any]:
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        stub = telemetry_pb2_grpc.TelemetryServiceStub(self._channel)
        responses = stub.Stream(requests(), timeout=self.timeout + 60,
                                metadata=self._metadata)
        try:
            while self.sent < stop:
                # The VM's past goes in one batch, so that the trainer's first fit of
                # it sees all of it, as it would a VM that has run that long.
                size = self.series.history - self.sent \
                    if self.sent < self.series.history else self.batch_size
                end = min(stop, self.sent + size)
                self._batch_id += 1
                outbox.put(self._batch(self.sent, end, self._batch_id))
                self.sent = end
                reply = next(responses)
                if reply.error:
                    raise ValueError(f"trainer refused a batch of {self.vm_id}: {reply.error}")
                self.acked = int(reply.acked_seq)
        finally:
            outbox.put(None)
            responses.cancel()
        return self.acked

    def start_watch(self) -> None:
        """Receive bundles in a background thread and swap them in when they verify."""
        import threading

        from vmad.bundle import Bundle, BundleError
        from vmad.protos.vmad.v1 import telemetry_pb2, telemetry_pb2_grpc

        running = self.bundle.metadata.version if self.bundle is not None else ""  # type: ignore[attr-defined]
        stub = telemetry_pb2_grpc.TelemetryServiceStub(self._channel)
        stream = stub.WatchBundles(telemetry_pb2.WatchBundlesRequest(
            vm_id=self.vm_id, running_version=running), metadata=self._metadata)
        self._watch = stream

        def loop() -> None:
            try:
                for message in stream:
                    try:
                        bundle = Bundle.from_parts(message.metadata_json, message.onnx,
                                                   expect_metrics=self.metrics)
                    except BundleError:
                        continue  # never run a bundle that failed verification
                    self.bundle = bundle
                    self.bundles_received.append(bundle.metadata.version)
            except self._grpc.RpcError:
                return

        threading.Thread(target=loop, name=f"watch-{self.vm_id}", daemon=True).start()
