"""The trainer's logic, apart from gRPC: ingest telemetry into the store, hand bundles to
the agents that watch for them, and report VM states to the controller on a timer,
queueing whatever it answers on the action worker.

trainer/service.py adapts this to the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vmad.actions import Action, Decision
from vmad.bundle import Bundle
from vmad.state import VMState
from vmad.trainer.intake import metrics_problem
from vmad.trainer.store import IngestResult, LabelInterval, TelemetryStore
from vmad.trainer.transfer import TrainOutcome, VMModels
from vmad.trainer.worker import ActionWorker

__all__ = ["ReportRefused", "ReportStats", "TrainerCore"]

log = logging.getLogger("vmad.trainer")

# Decide(state) -> decision; raises on a failed call (controller down, deadline), and
# ReportRefused when the controller refused this one state.
ReportFn = Callable[[VMState], Decision]


class ReportRefused(Exception):
    """The controller refused one VM's state (it names why); the others still report."""


@dataclass
class ReportStats:
    rounds: int = 0
    reports: int = 0
    failures: int = 0
    refused: int = 0
    last_error: str = ""
    actions: dict[str, int] | None = None
    bundles_pushed: int = 0
    label_refits: int = 0
    label_refits_deferred: int = 0


class TrainerCore:
    def __init__(self, store: TelemetryStore, models: VMModels) -> None:
        self.store = store
        self.models = models
        self.worker = ActionWorker(models, on_done=self._model_changed)
        self.stats = ReportStats(actions={a.value: 0 for a in Action})
        self._bundle_cond = threading.Condition()
        # Bumped whenever a VM's model changes; watchers wake and compare versions.
        self._generation: dict[str, int] = {}
        self._stopping = threading.Event()
        self._reporter: threading.Thread | None = None
        # Called (in the worker thread) with the id of a VM whose model changed.
        self.on_model_changed: Callable[[str], None] | None = None
        # VM -> when (time.monotonic()) its latest label refit was let start.
        self._label_refit_at: dict[str, float] = {}
        # VMs with metrics of their own whose warm-up bundle was announced.
        self._own_metrics_seen: set[str] = set()
        self._label_lock = threading.Lock()

    # -- telemetry --------------------------------------------------------------------

    def ingest(self, vm_id: str, metrics: Sequence[str], seqs: np.ndarray,
               timestamps: np.ndarray, values: np.ndarray,
               verdicts: Sequence[tuple] = (),
               labels: Sequence[LabelInterval] = ()) -> IngestResult:
        problem = metrics_problem(metrics, self.models.metrics)
        if problem:
            raise ValueError(f"VM {vm_id}: {problem}")
        result = self.store.ingest(vm_id, metrics, seqs, timestamps, values,
                                   verdicts=verdicts, labels=labels)
        self.stored(vm_id, result, labels, metrics)
        return result

    def stored(self, vm_id: str, result: IngestResult,
               labels: Sequence[LabelInterval] = (), metrics: Sequence[str] = ()) -> None:
        """After new samples (and labels) of `vm_id` are stored: adapt its detector once
        it has streamed its warm-up samples, again every refresh period (label-free), and
        at once when an interval of an adapted VM is labelled normal. A VM whose
        `metrics` extend the network's is told of the warm-up bundle that reads them."""
        if metrics and tuple(metrics) != self.models.metrics and \
                vm_id not in self._own_metrics_seen:
            self._own_metrics_seen.add(vm_id)
            self._bundle_changed(vm_id)
        if result.stored and self.models.needs_adaptation(vm_id):
            self.worker.submit_adaptation(vm_id)
        if self._labelled_normal(vm_id, labels):
            self._refit_for_label(vm_id)

    def add_labels(self, vm_id: str, labels: Sequence[LabelInterval]) -> None:
        self.store.add_labels(vm_id, labels)
        if self._labelled_normal(vm_id, labels):
            self._refit_for_label(vm_id)

    def _labelled_normal(self, vm_id: str, labels: Sequence[LabelInterval]) -> bool:
        """A label of normal on an adapted VM is an operator ending a false alarm (the
        agent prints the command): refitted now, not at the next hourly refit, which
        the alarm, or the job behind it, may not wait for."""
        return any(not label.anomalous for label in labels) \
            and self.models.adaptation(vm_id) is not None

    def _refit_for_label(self, vm_id: str) -> None:
        """Refit `vm_id` for a label of normal: at once, but no sooner than
        `label_refit_interval_s` after its previous label refit, so a flood of labels
        (a script, a misbehaving agent) costs one refit (about a second of a core) per
        interval, not one per label. A label held back is fitted by that later refit,
        or by an earlier scheduled one."""
        interval = self.models.adaptation_settings.label_refit_interval_s
        now = time.monotonic()
        with self._label_lock:
            previous = self._label_refit_at.get(vm_id)
            if previous is not None and previous > now:
                start = previous  # one already waits for the interval; it reads this label
            else:
                start = now if previous is None else max(now, previous + interval)
                self._label_refit_at[vm_id] = start
                if start > now:
                    log.info("VM %s: labelled normal again within %.0f s of its last label "
                             "refit; refitting in %.0f s (adaptation.label_refit_interval_s)",
                             vm_id, interval, start - now)
            if start > now:
                self.stats.label_refits_deferred += 1
            else:
                self.stats.label_refits += 1
        # Queued again even if a refit is running or waiting: this merges into the one
        # waiting, and a running one may have read the history before this label.
        self.worker.submit_adaptation(vm_id, not_before=start, after_running=True)

    # -- bundles ----------------------------------------------------------------------

    def _model_changed(self, outcome: TrainOutcome) -> None:
        self._bundle_changed(outcome.vm_id)

    def _bundle_changed(self, vm_id: str) -> None:
        with self._bundle_cond:
            self._generation[vm_id] = self._generation.get(vm_id, 0) + 1
            self._bundle_cond.notify_all()
        if self.on_model_changed is not None:
            self.on_model_changed(vm_id)

    def next_bundle(self, vm_id: str, running_version: str, timeout: float) -> Bundle | None:
        """The bundle `vm_id` should run if it is not `running_version`, waiting up to
        `timeout` seconds for one to appear; None when there is nothing new."""
        deadline = time.monotonic() + timeout
        while True:
            with self._bundle_cond:
                generation = self._generation.get(vm_id, 0)
            bundle = self.models.bundle(vm_id)
            if bundle.metadata.version != running_version:
                return bundle
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return None
            with self._bundle_cond:
                self._bundle_cond.wait_for(
                    lambda seen=generation: self._generation.get(vm_id, 0) != seen
                    or self._stopping.is_set(), remaining)

    def bundle_sent(self) -> None:
        with self._bundle_cond:
            self.stats.bundles_pushed += 1

    # -- reporting --------------------------------------------------------------------

    def report_round(self, report: ReportFn) -> list[tuple[str, Decision]]:
        """Report every VM not busy training once; queue the answers. One failed call
        ends the round (the controller is down; the next round tries again); a state the
        controller refuses is skipped."""
        answered: list[tuple[str, Decision]] = []
        self.stats.rounds += 1
        for vm_id in self.store.vm_ids():
            if self._stopping.is_set():
                break
            if self.worker.busy(vm_id):
                # Its state is about to change; report the new model next round.
                continue
            state = self.models.state(vm_id)
            try:
                decision = report(state)
            except ReportRefused as error:
                self.stats.refused += 1
                log.warning("state report for VM %s refused by the controller: %s", vm_id,
                            error)
                continue
            except Exception as error:  # grpc.RpcError and friends: keep serving agents
                self.stats.failures += 1
                self.stats.last_error = _describe(error)
                log.warning("state report for VM %s failed: %s", vm_id, self.stats.last_error)
                break
            self.stats.reports += 1
            assert self.stats.actions is not None
            self.stats.actions[decision.action.value] += 1
            self.worker.submit(vm_id, decision)
            answered.append((vm_id, decision))
        return answered

    def refit_unfitted_labels(self) -> list[str]:
        """Queue a label refit for every adapted VM whose store holds a label of normal
        newer than its adaptation's fit: the refit it was owed when the trainer stopped
        (a label refit waits in memory, up to `label_refit_interval_s`). Returns them."""
        owed = []
        for vm_id in self.store.vm_ids():
            adaptation = self.models.adaptation(vm_id)
            if adaptation is None or adaptation.labels_seen is None:
                continue
            if self.store.last_label_id(vm_id, normal_only=True) > adaptation.labels_seen:
                owed.append(vm_id)
                self._refit_for_label(vm_id)
        if owed:
            log.info("refitting %d VMs on labels of normal stored since their last fit: %s",
                     len(owed), ", ".join(owed[:10]) + (" ..." if len(owed) > 10 else ""))
        return owed

    def start(self, report: ReportFn | None, interval_s: float) -> None:
        self.worker.start()
        self.refit_unfitted_labels()
        if report is None:
            return

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.report_round(report)
                except Exception:
                    log.exception("state report round failed")

        self._reporter = threading.Thread(target=loop, name="vmad-reporter", daemon=True)
        self._reporter.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._bundle_cond:
            self._bundle_cond.notify_all()
        self.worker.stop()
        if self._reporter is not None:
            self._reporter.join(5)


def _describe(error: Exception) -> str:
    """One line that says what went wrong: a gRPC error's status and details (its str()
    starts with a line that says neither)."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"[:300]
    return (str(error).splitlines() or [type(error).__name__])[0][:300]
