"""The trainer's Prometheus metrics (served on `metrics.listen`, docs/operations.md).

Two kinds:
- live instruments updated where things happen, through three hooks in
  trainer/service.py: `count_ack` reads each telemetry ack (batches accepted, batches
  refused by reason), `timed_report` wraps the state-report call (latency), and the
  action worker's `on_done` callback (fine-tune seconds);
- counts that already exist, read at scrape time by `_TrainerCollector`: per-VM samples
  received / duplicate / lost (persisted in the store, so they survive restarts), the
  service's own counts (open streams and bundle watches, values refused one by one and
  whole calls refused, by reason), the reporter's and the action worker's counters, and
  token refusals.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vmad.http_endpoint import ServedMetrics, counts_by, token_refusals
from vmad.security import TokenInterceptor
from vmad.trainer.core import TrainerCore
from vmad.trainer.store import TelemetryStore
from vmad.trainer.transfer import TrainOutcome

__all__ = ["TrainerMetrics", "refusal_reason"]


# The bad-batch messages of trainer/intake.py and trainer/service.py -> a bounded label.
# (Single bad values are refused one by one and counted in vmad_trainer_values_refused.)
_BATCH_REASONS = (
    ("has no vm_id", "missing_vm_id"),
    ("characters, above", "id_too_long"),
    ("could not store", "store_failed"),
    ("may not send for", "vm_id_not_client"),
    ("one value per metric", "shape"),
    ("NaN or infinite", "non_finite"),
    ("sends metrics", "metrics_mismatch"),
    ("metrics, above", "too_many_metrics"),
    ("is not 1-64 letters", "bad_metric_name"),
    ("twice", "metric_twice"),
)


def refusal_reason(error: str) -> str:
    """A bounded label for a refused batch's error text (`other` when unknown)."""
    for fragment, reason in _BATCH_REASONS:
        if fragment in error:
            return reason
    return "other"


class TrainerMetrics(ServedMetrics):
    def __init__(self, store: TelemetryStore, core: TrainerCore,
                 token_check: TokenInterceptor | None, service_stats: Any = None) -> None:
        # service_stats: trainer/service.py's ServiceStats (plain counters it keeps).
        super().__init__()
        self.token_check = token_check
        self.service_stats = service_stats
        r = self.registry
        self.batches = Counter("vmad_trainer_batches", "telemetry batches accepted",
                               registry=r)
        self.refused = Counter("vmad_trainer_batches_refused",
                               "telemetry batches refused, by reason", ["reason"], registry=r)
        self.report_seconds = Histogram(
            "vmad_trainer_report_seconds", "state report round trip to the controller",
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.finetune_seconds = Histogram(
            "vmad_trainer_action_seconds", "time per model action (fine-tune, reset)",
            ["action"], registry=r, buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        r.register(_TrainerCollector(store, core, self))
        previous = core.worker.on_done

        def on_done(outcome: TrainOutcome) -> None:
            self.finetune_seconds.labels(outcome.action).observe(outcome.seconds)
            if previous is not None:
                previous(outcome)

        core.worker.on_done = on_done


    def count_ack(self, ack: Any) -> None:
        """Count one telemetry ack: accepted, or refused with a bounded reason."""
        error = getattr(ack, "error", "")
        if error:
            self.refused.labels(refusal_reason(error)).inc()
        else:
            self.batches.inc()

    def timed_report(self, report: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`report` (plain or async) timed into vmad_trainer_report_seconds."""
        if inspect.iscoroutinefunction(report):
            async def timed_async(state: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await report(state)
                finally:
                    self.report_seconds.observe(time.perf_counter() - started)

            return timed_async

        def timed(state: Any) -> Any:
            started = time.perf_counter()
            try:
                return report(state)
            finally:
                self.report_seconds.observe(time.perf_counter() - started)

        return timed


_DETECTOR_GAUGES = {
    "adapted": "1: the VM runs its own adaptation; 0: it warms up (its agent raises no alarm)",
    "injected_recall": "share of faults injected into the VM's own history that its "
                       "current fit flags",
    "injected_false_alarm_rate": "share of the VM's own normal windows its current fit flags",
    "threshold_label_raise": "how far labels of normal raised the VM's threshold "
                             "(1: not at all)",
}


class _TrainerCollector(Collector):
    def __init__(self, store: TelemetryStore, core: TrainerCore,
                 owner: TrainerMetrics) -> None:
        self.store = store
        self.core = core
        self.owner = owner

    def _detectors(self, vm_ids: list[str]) -> Iterable[Any]:
        """Each VM's detector: adapted or warming up, its quality on faults injected into
        its own history (the estimate made without labels), and how far labels of
        normal raised its threshold."""
        families = {name: GaugeMetricFamily(f"vmad_trainer_vm_{name}", text, labels=["vm_id"])
                    for name, text in _DETECTOR_GAUGES.items()}
        for vm_id in vm_ids:
            adaptation = self.core.models.adaptation(vm_id)
            families["adapted"].add_metric([vm_id], 0 if adaptation is None else 1)
            if adaptation is None:
                continue
            families["threshold_label_raise"].add_metric([vm_id], adaptation.label_raise)
            for measure in ("recall", "false_alarm_rate"):
                if measure in adaptation.quality:
                    families[f"injected_{measure}"].add_metric(
                        [vm_id], adaptation.quality[measure])
        return families.values()

    def collect(self) -> Iterable[Any]:
        received = CounterMetricFamily("vmad_trainer_samples_received",
                                       "new samples stored, per VM (persisted)", labels=["vm_id"])
        duplicate = CounterMetricFamily("vmad_trainer_samples_duplicate",
                                        "samples received again and dropped, per VM (persisted)",
                                        labels=["vm_id"])
        lost = CounterMetricFamily("vmad_trainer_samples_lost",
                                   "sequence numbers that never arrived, per VM (persisted)",
                                   labels=["vm_id"])
        vm_ids = self.store.vm_ids()
        for vm_id in vm_ids:
            counters = self.store.counters(vm_id)
            if counters is None:
                continue
            received.add_metric([vm_id], counters.received)
            duplicate.add_metric([vm_id], counters.duplicates)
            lost.add_metric([vm_id], counters.lost)
        yield from (received, duplicate, lost)
        yield from self._detectors(vm_ids)
        yield GaugeMetricFamily("vmad_trainer_vms", "VMs in this trainer's store",
                                value=len(vm_ids))
        service = self.owner.service_stats
        if service is not None:
            yield GaugeMetricFamily("vmad_trainer_agents_connected", "open telemetry streams",
                                    value=service.open_streams)
            yield GaugeMetricFamily("vmad_trainer_bundle_watches", "open bundle watches",
                                    value=service.open_watches)
            yield counts_by(
                "vmad_trainer_values_refused",
                "samples, verdicts and labels refused one by one at the wire, by reason",
                "reason", service.refused)
            yield counts_by(
                "vmad_trainer_calls_refused",
                "whole calls refused (too many agents, identity, idle), by reason",
                "reason", service.calls_refused)

        stats = self.core.stats
        yield CounterMetricFamily("vmad_trainer_reports", "state reports answered",
                                  value=stats.reports)
        yield CounterMetricFamily("vmad_trainer_reports_refused",
                                  "state reports the controller refused (each logged)",
                                  value=stats.refused)
        yield CounterMetricFamily("vmad_trainer_report_failures",
                                  "state report calls that failed", value=stats.failures)
        yield counts_by("vmad_trainer_decisions", "controller decisions received, by action",
                        "action", stats.actions or {})
        yield CounterMetricFamily("vmad_trainer_bundles_pushed", "bundles sent to agents",
                                  value=stats.bundles_pushed)
        yield counts_by(
            "vmad_trainer_label_refits",
            "refits for a label of normal, by when: now, or deferred (a later label within "
            "adaptation.label_refit_interval_s of the last, waiting for one refit)",
            "when", {"now": stats.label_refits, "deferred": stats.label_refits_deferred})

        worker = self.core.worker.stats
        actions = CounterMetricFamily("vmad_trainer_actions", "model actions run, by result",
                                      labels=["result"])
        actions.add_metric(["done"], worker.done)
        actions.add_metric(["failed"], worker.failed)
        yield actions
        yield CounterMetricFamily("vmad_trainer_finetune_batches",
                                  "fine-tuning mini-batches run", value=worker.batches)
        yield GaugeMetricFamily("vmad_trainer_actions_pending", "actions waiting to run",
                                value=len(self.core.worker.pending()))

        yield counts_by("vmad_trainer_calls_unauthenticated",
                        "calls refused for a missing or wrong token, by reason", "reason",
                        token_refusals(self.owner.token_check))
