"""The edge agent process: sample -> window -> verdict -> spool -> trainer.

Threads: the sampling loop (this module, every `interval_s`), the telemetry stream and the
bundle watch (edge_agent/link.py), and prometheus_client's /metrics server. Detection
never waits on the network: samples and verdicts go to the spool, and the stream thread
ships whatever the spool holds whenever the trainer is reachable.

Anomaly start/end events are logged (`anomaly start vm=... score=... top=<metrics to
blame>` / `anomaly end ...`, with the `vmad label --normal` command for what the alarm
covered). Warm-up (a bundle whose statistics are pooled, not this VM's
own: no alarms until the trainer pushes the VM's own) is logged when it starts and ends
and exported as the `vmad_agent_warmup` gauge.
Labelled intervals written by `vmad inject` or `vmad label --labels-file` to
`inject.labels_file` (JSON lines) are read incrementally and shipped as ground truth.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vmad.edge_agent.config import AgentConfig
from vmad.edge_agent.detector import BundleSlot, WindowScorer, WindowVerdict
from vmad.edge_agent.metrics import PersistedCounters
from vmad.edge_agent.sampler import METRICS, Reading, Sampler
from vmad.edge_agent.spool import Spool
from vmad.http_endpoint import HttpEndpoint, open_endpoint, process_registry
from vmad.protos.vmad.v1 import telemetry_pb2
from vmad.schema import DEFAULT_WINDOW

__all__ = ["Agent", "AgentMetrics"]

log = logging.getLogger("vmad.agent")


class AgentMetrics:
    """The agent's Prometheus metrics, in a registry of its own (no process globals)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, Info

        # Process collectors included: RSS and CPU of the agent itself.
        self.registry = process_registry()
        r = self.registry
        self.score = Gauge("vmad_agent_anomaly_score", "score of the newest window", registry=r)
        self.anomalous = Gauge("vmad_agent_anomalous", "1 while the newest window is anomalous",
                               registry=r)
        self.verdicts = Counter("vmad_agent_verdicts", "windows scored", ["verdict"],
                                registry=r)
        self.samples = Counter("vmad_agent_samples", "samples taken", registry=r)
        self.spool_depth = Gauge("vmad_agent_spool_depth", "samples waiting in the spool",
                                 registry=r)
        self.spool_bytes = Gauge("vmad_agent_spool_bytes", "payload bytes in the spool",
                                 registry=r)
        self.model = Info("vmad_agent_model", "the running bundle", registry=r)
        self.latency = Histogram(
            "vmad_agent_inference_seconds", "bundle inference time per window", registry=r,
            buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 5e-3, 25e-3, 0.1))
        self.last_sample = Gauge("vmad_agent_last_sample_timestamp_seconds",
                                 "when the sampling loop last ran", registry=r)
        self.connected = Gauge("vmad_agent_trainer_connected", "1 while streaming", registry=r)
        self.restarts = Counter("vmad_agent_thread_restarts", "worker threads restarted "
                                "after a failure", ["thread"], registry=r)
        self.warmup = Gauge("vmad_agent_warmup",
                            "1 while the bundle's statistics are not this VM's own (no alarms)",
                            registry=r)


class Agent:
    def __init__(self, config: AgentConfig,
                 source: Callable[[], Reading] | None = None) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.stop_event = threading.Event()
        # The default metrics (which every bundle's network reads), then the agent's own.
        self.metric_names = METRICS + tuple(config.own_metrics)
        self.sampler = Sampler(source, config.own_metrics)
        self.spool = Spool(config.spool.path, config.spool.max_bytes, config.spool.max_rows)
        self.slot = BundleSlot(config.bundle_dir, self.metric_names, DEFAULT_WINDOW)
        self.slot.load_initial(config.bundle)
        self.detector = WindowScorer(self.slot)
        self.metrics.registry.register(PersistedCounters(self.spool, self.slot,
                                                         config.vm_id))
        self._in_anomaly = False
        # Timestamps of the current alarm: first and newest alarmed verdict, last reminder.
        self._alarm_started = self._alarm_last = self._reminded = 0.0
        self._in_warmup: bool | None = None
        self._threads: list[threading.Thread] = []
        self.thread_restarts: dict[str, int] = {}  # worker thread name -> restarts
        self._http: HttpEndpoint | None = None
        self._last_tick = time.monotonic()
        from vmad.edge_agent.link import ActiveCalls

        self._active = ActiveCalls()

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._http = open_endpoint(self.config.metrics.listen, self.metrics.registry,
                                   alive=self.sampling)
        if self.config.trainer.address:
            from vmad.edge_agent.link import stream_loop, watch_loop

            self._threads += [
                self._supervised("stream", stream_loop, self.config, self.spool,
                                 self.stop_event, self._active, self._version,
                                 self.metric_names,
                                 self.metrics.connected.set),
                self._supervised("bundles", watch_loop, self.config, self.slot,
                                 self.stop_event, self._active),
            ]
        for thread in self._threads:
            thread.start()
        log.info("agent %s started: interval %.1fs, trainer %s", self.config.vm_id,
                 self.config.interval_s, self.config.trainer.address or "none")

    def run(self, duration_s: float | None = None) -> None:
        """Sample every interval_s until stop() (or for `duration_s`)."""
        self.start()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_tick = time.monotonic()
        try:
            while not self.stop_event.is_set():
                try:
                    self.tick()
                except Exception:  # one bad sample never ends the sampling loop
                    log.exception("sampling step failed")
                    self.thread_restarts["sampling"] = self.thread_restarts.get("sampling", 0) + 1
                    self.metrics.restarts.labels("sampling").inc()
                next_tick += self.config.interval_s
                now = time.monotonic()
                if next_tick < now:  # fell behind (suspended VM): do not burst to catch up
                    next_tick = now + self.config.interval_s
                if deadline is not None and next_tick > deadline:
                    break
                self.stop_event.wait(next_tick - now)
        finally:
            self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self._active.cancel_all()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._http is not None:
            self._http.close()
            self._http = None
        self.spool.close()

    def sampling(self) -> bool:
        """/healthz: the sampling loop ran within three intervals (or 30 s)."""
        return time.monotonic() - self._last_tick < max(3 * self.config.interval_s, 30.0)

    def _supervised(self, name: str, target: Callable[..., None], *args: object
                    ) -> threading.Thread:
        """A daemon thread running `target(*args)` until the agent stops: if it raises
        (or returns early) it is logged, counted in `thread_restarts` and
        `vmad_agent_thread_restarts_total`, and started again after a backoff (1 s
        doubling to 60 s), so no worker dies for good."""
        from vmad.edge_agent.link import Backoff

        def run() -> None:
            backoff = Backoff(1.0, 60.0)
            while not self.stop_event.is_set():
                try:
                    target(*args)
                    if self.stop_event.is_set():
                        return
                    problem = "returned"
                except Exception as error:  # the point: nothing may end this thread
                    log.exception("agent thread %s failed", name)
                    problem = f"{type(error).__name__}: {error}"
                self.thread_restarts[name] = self.thread_restarts.get(name, 0) + 1
                self.metrics.restarts.labels(name).inc()
                delay = max(backoff.initial, backoff.next_delay())
                log.error("agent thread %s %s; restart %d in %.1f s", name, problem,
                          self.thread_restarts[name], delay)
                self.stop_event.wait(delay)

        return threading.Thread(target=run, name=name, daemon=True)

    def _version(self) -> str:
        bundle = self.slot.current
        return bundle.metadata.version if bundle else ""

    # -- one sampling step -------------------------------------------------------
    def tick(self) -> None:
        self._last_tick = time.monotonic()
        self.metrics.last_sample.set_to_current_time()
        self._read_labels()
        sample = self.sampler.sample()
        if sample is None:
            return
        timestamp, values = sample
        seq = self.spool.next_seq()
        result = self.detector.push(values)
        self.metrics.samples.inc()
        verdict_bytes = None
        if result is not None:
            self.metrics.score.set(result.score)
            self.metrics.anomalous.set(1 if result.anomalous else 0)
            self.metrics.verdicts.labels("anomalous" if result.anomalous else "normal").inc()
            self.metrics.latency.observe(self.detector.last_latency_s)
            verdict_bytes = telemetry_pb2.Verdict(
                end_seq=seq, timestamp=timestamp, score=result.score,
                anomalous=result.anomalous, model_version=result.version,
                contributions=result.contributions, warmup=result.warmup).SerializeToString()
            self._log_warmup(result.warmup, result.version)
            self._log_alarm(result, seq, timestamp)
        self.spool.append(seq, telemetry_pb2.Sample(seq=seq, timestamp=timestamp,
                                                    values=values).SerializeToString(),
                          verdict_bytes)
        self.metrics.spool_depth.set(self.spool.rows)
        self.metrics.spool_bytes.set(self.spool.bytes)
        bundle = self.slot.current
        if bundle is not None:
            self.metrics.model.info({"version": bundle.metadata.version,
                                     "kind": bundle.metadata.model_kind})

    def _log_alarm(self, result: WindowVerdict, seq: int, timestamp: float) -> None:
        """`anomaly start`, `anomaly ongoing` after `alarm_first_reminder_s` and then every
        `alarm_reminder_s` while it lasts, and `anomaly end`. The last two name the
        interval the alarm covered (its first window's oldest sample to its newest
        alarmed one) as the command that labels it normal: the trainer leaves what alarms
        covered out of its refits, so a false alarm, or a new normal level, would
        otherwise alarm again and again."""
        if result.anomalous and not self._in_anomaly:
            self._in_anomaly = True
            self._alarm_started = self._reminded = timestamp
            self._log_anomaly("start", result, seq, "")
        if result.anomalous:
            self._alarm_last = timestamp
            due = self.config.alarm_first_reminder_s \
                if self._reminded == self._alarm_started else self.config.alarm_reminder_s
            if timestamp - self._reminded >= due:
                self._reminded = timestamp
                self._log_anomaly("ongoing", result, seq, f"for {self._alarm_seconds():.0f} s; "
                                  f"if it is the VM's new normal: {self._label_command()}")
        elif self._in_anomaly:
            self._in_anomaly = False
            self._log_anomaly("end", result, seq, f"lasted {self._alarm_seconds():.0f} s; "
                              f"if it was normal: {self._label_command()}")

    def _log_anomaly(self, event: str, result: WindowVerdict, seq: int, more: str) -> None:
        log.warning("anomaly %s vm=%s seq=%d score=%.3f model=%s top=%s%s", event,
                    self.config.vm_id, seq, result.score, result.version,
                    result.top_metrics(self.metric_names), f" {more}" if more else "")

    def _alarm_seconds(self) -> float:
        return self._alarm_last - self._alarm_started + self.config.interval_s

    def _label_command(self) -> str:
        covered_from = self._alarm_started - self.slot.window * self.config.interval_s
        return (f"vmad label --vm {self.config.vm_id} --normal --start "
                f"{math.floor(covered_from)} --end {math.ceil(self._alarm_last)} "
                f"--labels-file {self.config.inject.labels_file}")

    def _log_warmup(self, warmup: bool, version: str) -> None:
        self.metrics.warmup.set(1 if warmup else 0)
        if warmup == self._in_warmup:
            return
        self._in_warmup = warmup
        if warmup:
            log.warning("warm-up vm=%s model=%s: statistics pooled over other VMs, no alarms "
                        "until the trainer pushes this VM's own bundle", self.config.vm_id,
                        version)
        else:
            log.info("warm-up over vm=%s model=%s: alarms on", self.config.vm_id, version)

    def _read_labels(self) -> None:
        """Pick up lines appended to the labels file since the last read (offset kept in
        the spool so a restart neither loses nor re-reads them)."""
        path = Path(self.config.inject.labels_file)
        try:
            size = path.stat().st_size
        except OSError:
            return
        offset = self.spool.get_meta("labels_offset", 0)
        if size < offset:  # file replaced or truncated: start over (ids de-duplicate)
            offset = 0
        if size == offset:
            return
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits
        for line in complete.splitlines():
            try:
                item = json.loads(line)
                if item.get("vm_id") not in (None, "", self.config.vm_id):
                    continue
                label = telemetry_pb2.LabelInterval(
                    start=float(item["start"]), end=float(item["end"]),
                    anomalous=bool(item["anomalous"]),
                    source=telemetry_pb2.LabelSource.Value(
                        "LABEL_SOURCE_" + str(item.get("source", "operator")).upper()),
                    kind=str(item.get("kind", "")), id=str(item["id"]))
            except (ValueError, KeyError, TypeError) as error:
                log.error("ignoring bad line in %s: %s", path, error)
                continue
            if not self.spool.add_label(label.id, label.SerializeToString()):
                return  # the spool cannot be written: read these lines again next time
            log.info("label %s [%.0f, %.0f) anomalous=%s", label.kind or label.id,
                     label.start, label.end, label.anomalous)
        self.spool.set_meta("labels_offset", offset + len(complete))
