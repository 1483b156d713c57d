"""The background action worker: runs the controller's actions (fine-tune, reset) off the
serving threads, so a minute of training never delays a telemetry ack.

The queue holds at most one pending action per VM: a newer decision for a VM replaces an
older one that has not started (the controller answers each state report, and only its
latest answer reflects the latest state). The number of VMs bounds the queue. Actions run
one at a time, in the order their VMs first queued: training is CPU-bound and the
trainer shares its node with the VMs it serves. Label-free adaptations (a VM finished its
warm-up, or its normal drifted: `submit_adaptation`) queue beside the actions, at most one
per VM, and go first: they are quick and end a VM's warm-up. An adaptation may wait until
a given time (a label's refit held back by its rate limit, trainer/core.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from vmad.actions import Action, Decision
from vmad.trainer.transfer import TrainOutcome, VMModels

__all__ = ["ActionWorker", "WorkerStats"]

log = logging.getLogger("vmad.trainer.worker")


@dataclass
class WorkerStats:
    queued: int = 0
    replaced: int = 0
    done: int = 0
    failed: int = 0
    batches: int = 0
    running: str = ""


class ActionWorker:
    """One daemon thread executing `Decision`s against `VMModels`.

    on_done(outcome) is called (in the worker thread) after each action that changed a
    VM's model, so the service can push the new bundle to the agent.
    """

    def __init__(self, models: VMModels,
                 on_done: Callable[[TrainOutcome], None] | None = None) -> None:
        self.models = models
        self.on_done = on_done
        self.stats = WorkerStats()
        self._pending: OrderedDict[str, Decision] = OrderedDict()
        # VM -> the monotonic time its adaptation may start (0: now).
        self._adaptations: OrderedDict[str, float] = OrderedDict()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vmad-action-worker",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, vm_id: str, decision: Decision) -> None:
        """Queue `decision` for `vm_id` (keep is a no-op and never queued)."""
        if decision.action is Action.KEEP:
            return
        with self._cond:
            if vm_id in self._pending:
                self.stats.replaced += 1
            self._pending[vm_id] = decision
            self.stats.queued += 1
            self._cond.notify()

    def submit_adaptation(self, vm_id: str, not_before: float = 0.0,
                          after_running: bool = False) -> None:
        """Queue a label-free (re)fit of `vm_id`'s adaptation, to start no earlier than
        `not_before` (time.monotonic()). One already queued takes the earlier start.
        While one runs, nothing is queued unless `after_running`: a refit due to new
        samples sees them all, but a label stored after the running fit read its history
        needs a fit of its own."""
        with self._cond:
            if vm_id in self._adaptations:
                self._adaptations[vm_id] = min(self._adaptations[vm_id], not_before)
                self._cond.notify()
                return
            if self.stats.running == vm_id and not after_running:
                return
            self._adaptations[vm_id] = not_before
            self.stats.queued += 1
            self._cond.notify()

    def pending(self) -> dict[str, Decision]:
        with self._cond:
            return dict(self._pending)

    def busy(self, vm_id: str) -> bool:
        """True while an action for `vm_id` is queued or running, or its adaptation is
        due. An adaptation waiting to start (a deferred label refit, up to
        `label_refit_interval_s`) does not count: the VM's state until then is current."""
        with self._cond:
            return (vm_id in self._pending or self.stats.running == vm_id
                    or self._adaptations.get(vm_id, math.inf) <= time.monotonic())

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._adaptations and not self.stats.running

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self.idle, timeout)

    def _due_adaptation(self) -> str | None:
        now = time.monotonic()
        return next((vm_id for vm_id, at in self._adaptations.items() if at <= now), None)

    def _next_start_in(self) -> float | None:
        """Seconds until the earliest waiting adaptation may start (None: none waits)."""
        if not self._adaptations:
            return None
        return max(0.0, min(self._adaptations.values()) - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    due = self._due_adaptation()
                    if self._stopping or self._pending or due is not None:
                        break
                    self._cond.wait(self._next_start_in())
                if self._stopping:
                    return
                decision: Decision | None = None
                if due is not None:
                    del self._adaptations[due]
                    vm_id = due
                else:
                    vm_id, decision = self._pending.popitem(last=False)
                self.stats.running = vm_id
            try:
                outcome = self.execute(vm_id, decision) if decision is not None \
                    else self.adapt(vm_id)
            except Exception:
                # One VM's bad data must not stop training for the others.
                log.exception("%s for VM %s failed",
                              decision.action.value if decision else "adaptation", vm_id)
                with self._cond:
                    self.stats.failed += 1
                outcome = None
            with self._cond:
                self.stats.running = ""
                if outcome is not None:
                    self.stats.done += 1
                    self.stats.batches += outcome.batches
                self._cond.notify_all()
            if outcome is not None and self.on_done is not None and outcome.action != "keep":
                try:
                    self.on_done(outcome)
                except Exception:
                    log.exception("after action for VM %s", vm_id)

    def adapt(self, vm_id: str) -> TrainOutcome:
        outcome = self.models.adapt(vm_id)
        adaptation = self.models.adaptation(vm_id)
        quality = adaptation.quality if adaptation else {}
        weight = "-"
        if adaptation:
            used, preferred = adaptation.fusion.cnn_weight, adaptation.preferred_cnn_weight
            weight = f"{used:g}" if preferred is None or preferred == used else \
                f"{used:g} (this fit preferred {preferred:g}; taken up once the next agrees)"
        log.info("VM %s: adapted on %d samples in %.1f s -> %s; network weight %s; "
                 "deviation: %s; on its own history with injected faults: %s", vm_id,
                 adaptation.samples_fitted if adaptation else 0, outcome.seconds,
                 outcome.version, weight,
                 adaptation.describe() if adaptation else "-",
                 ", ".join(f"{k} {v:.3f}" for k, v in quality.items()) or "-")
        return outcome

    def execute(self, vm_id: str, decision: Decision) -> TrainOutcome:
        """Run one action now, in the caller's thread."""
        if decision.action is Action.RESET:
            return self.models.reset(vm_id)
        outcome = self.models.finetune(
            vm_id, decision.batches, reset=decision.action is Action.RESET_FINETUNE)
        log.info("VM %s: %s %d batches in %.1f s -> %s%s", vm_id, outcome.action,
                 outcome.batches, outcome.seconds, outcome.version,
                 f" (skipped: {outcome.skipped})" if outcome.skipped else "")
        return outcome
