"""Per-VM models on the trainer: the paper's transfer training module.

The trainer holds one pretrained checkpoint and, per VM, either "use the pretrained one"
or a fine-tuned copy of it, plus the VM's label-free adaptation (trainer/adaptation.py:
its own statistics, per-metric score, fusion and threshold), fitted once the VM has
streamed `adaptation.warmup_samples` and refitted every `refresh_samples` more. Until
then the VM gets the pooled warm-up bundle, on which its agent raises no alarm.
Fine-tuning starts from the VM's current model (or from the pretrained weights after a
reset), trains on the VM's recent labelled windows from the store, normalized with the
VM's own statistics, and exports a bundle for the agent. A VM may report metrics of its
own after the network's (trainer/intake.py): the network reads its own columns, trains on
them alone, and everything else of the VM's detector (statistics, deviation, distances,
attribution) reads all of them. Fine-tuned checkpoints live under
`models_dir/<vm>/` and their bookkeeping in the store, so a restarted trainer serves the
same model to the same VM.

Concurrency: training runs on a *copy* of the model in the worker thread; the finished
model replaces the VM's entry under a lock, so readers (state reports, bundle pushes)
always see a whole model, old or new, never one half-trained.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vmad.bundle import Bundle
from vmad.schema import DEFAULT_METRICS, DEFAULT_SCALE_FLOORS
from vmad.state import VMState, blame_text, compute_state
from vmad.trainer.adaptation import VMAdaptation, alarm_covered, fit_adaptation, refit_values
from vmad.trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vmad.trainer.config import AdaptationSettings, TrainingSettings
from vmad.trainer.injection import (
    InjectedSet,
    injected_generic_set,
    injected_quality,
    injected_validation_set,
)
from vmad.trainer.store import TelemetryStore, VMModelInfo
from vmad.windows import Normalizer, make_windows

if TYPE_CHECKING:
    from vmad.trainer.self_supervised import SelfSupervisedData

__all__ = ["LabelledWindows", "TrainOutcome", "VMModels"]

log = logging.getLogger("vmad.trainer.transfer")


@dataclass(frozen=True)
class LabelledWindows:
    raw: np.ndarray  # float32 [W, M, T], un-normalized
    labels: np.ndarray  # int8 [W], 0/1
    end_timestamps: np.ndarray  # float64 [W]


@dataclass(frozen=True)
class TrainOutcome:
    vm_id: str
    action: str
    batches: int
    final_loss: float
    seconds: float
    version: str
    bundle: Bundle
    skipped: str = ""


def _safe_name(vm_id: str) -> str:
    """A folder name for any VM id: readable prefix plus a hash, so ids never collide or
    escape the models folder."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", vm_id)[:40]
    return f"{prefix}-{hashlib.sha256(vm_id.encode()).hexdigest()[:8]}"


class VMModels:
    """The pretrained checkpoint plus one current model per VM."""

    def __init__(self, pretrained: Checkpoint, store: TelemetryStore, models_dir: str | Path,
                 settings: TrainingSettings | None = None, seed: int = 0,
                 adaptation: AdaptationSettings | None = None) -> None:
        from vmad.trainer.export import export_bundle

        self.pretrained = pretrained
        self.store = store
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings or TrainingSettings()
        self.adaptation_settings = adaptation or AdaptationSettings()
        self.seed = seed
        self._lock = threading.Lock()
        self._models: dict[str, Checkpoint] = {}
        self._bundles: dict[str, Bundle] = {}
        self._adaptations: dict[str, VMAdaptation | None] = {}
        # Versions name the weights: the same pretrained model gets the same version on
        # every trainer and after every restart, so agents are not pushed a copy they run.
        digest = hashlib.sha256(
            b"".join(t.detach().numpy().tobytes()
                     for t in pretrained.model.state_dict().values())).hexdigest()[:10]
        self.pretrained_version = f"{pretrained.kind}-pretrained-{digest}"
        # The warm-up bundle says so in its version: `vmad status` shows which VMs warm up.
        self.pretrained_bundle = export_bundle(pretrained, f"{self.pretrained_version}-warmup")
        # Warm-up bundles by the metrics a VM reports: the network's, and those of VMs
        # with metrics of their own (made when first asked for).
        self._warmup_bundles: dict[tuple[str, ...], Bundle] = {
            pretrained.metrics: self.pretrained_bundle}

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.pretrained.metrics

    @property
    def window(self) -> int:
        return self.pretrained.window

    def vm_metrics(self, vm_id: str) -> tuple[str, ...]:
        """The metrics the VM reports: the network's, then any of its own."""
        counters = self.store.counters(vm_id)
        return counters.metrics if counters is not None and counters.metrics else self.metrics

    def _as_seen_by(self, metrics: tuple[str, ...], checkpoint: Checkpoint) -> Checkpoint:
        """`checkpoint` over a VM's `metrics`: the network reads its own columns of the
        VM's windows, the statistics of the VM's own metrics start unscaled."""
        if metrics == checkpoint.metrics:
            return checkpoint
        from vmad.trainer.models import NetworkColumns

        return replace(checkpoint, model=NetworkColumns(checkpoint.model, len(checkpoint.metrics)),
                       metrics=metrics, normalizer=checkpoint.normalizer.widened(len(metrics)))

    def info(self, vm_id: str) -> VMModelInfo:
        info = self.store.model_info(vm_id)
        if info is None:
            info = VMModelInfo(self.pretrained_version, False, 0, None, 0,
                               self.pretrained.threshold, 0)
        return info

    def checkpoint(self, vm_id: str) -> Checkpoint:
        """The VM's current model (the pretrained one unless fine-tuned)."""
        with self._lock:
            cached = self._models.get(vm_id)
        if cached is not None:
            return cached
        info = self.info(vm_id)
        if not info.finetuned:
            return self.pretrained
        try:
            checkpoint = load_checkpoint(self.models_dir / _safe_name(vm_id))
        except Exception:
            # A lost or corrupt per-VM model falls back to the pretrained one: the VM keeps
            # being served, and the controller sees `finetuned: false` and can act again.
            self.store.set_model_info(vm_id, replace(
                info, version=self.pretrained_version, finetuned=False, batches_trained=0))
            return self.pretrained
        with self._lock:
            self._models[vm_id] = checkpoint
        return checkpoint

    def bundle(self, vm_id: str) -> Bundle:
        """The bundle the VM's agent should run: the pooled warm-up bundle until the VM
        is adapted, then its weights with its own adaptation."""
        from vmad.trainer.export import export_bundle

        adaptation = self.adaptation(vm_id)
        info = self.info(vm_id)
        metrics = self.vm_metrics(vm_id)
        if adaptation is None and not info.finetuned:
            with self._lock:
                warmup = self._warmup_bundles.get(metrics)
            if warmup is None:
                # Its own version: a bundle watch that sent the network's warm-up bundle
                # before the VM's first batch named its metrics sends this one.
                warmup = export_bundle(self._as_seen_by(metrics, self.pretrained),
                                       f"{self.pretrained_version}-{len(metrics)}metrics-warmup")
                with self._lock:
                    self._warmup_bundles[metrics] = warmup
            return warmup
        version = info.version if adaptation is None else \
            f"{info.version}+{_safe_name(vm_id)}-a{adaptation.generation}"
        with self._lock:
            cached = self._bundles.get(vm_id)
        if cached is not None and cached.metadata.version == version:
            return cached
        bundle = export_bundle(self._as_seen_by(metrics, self.checkpoint(vm_id)), version,
                               adaptation=adaptation,
                               warmup=adaptation is None and not info.finetuned,
                               alarm_after=self.adaptation_settings.alarm_after)
        with self._lock:
            self._bundles[vm_id] = bundle
        return bundle

    # -- label-free adaptation ----------------------------------------------------------

    def _adaptation_file(self, vm_id: str) -> Path:
        return self.models_dir / _safe_name(vm_id) / "adaptation.json"

    def adaptation(self, vm_id: str) -> VMAdaptation | None:
        """The VM's adaptation, None while it warms up."""
        with self._lock:
            if vm_id in self._adaptations:
                return self._adaptations[vm_id]
        path = self._adaptation_file(vm_id)
        adaptation = None
        if path.is_file():
            try:
                adaptation = VMAdaptation.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError):
                # A corrupt file: the VM warms up again and is refitted.
                adaptation = None
        with self._lock:
            self._adaptations[vm_id] = adaptation
        return adaptation

    def needs_adaptation(self, vm_id: str) -> bool:
        """True when the VM has streamed enough for its first adaptation, or enough more
        since the last one for a refresh. Cheap: called after every ingested batch."""
        counters = self.store.counters(vm_id)
        if counters is None:
            return False
        settings = self.adaptation_settings
        current = self.adaptation(vm_id)
        if current is None:
            return counters.received >= self._first_fit_samples()
        return counters.received - current.received_at_fit >= settings.refresh_samples

    def _first_fit_samples(self) -> int:
        """Samples a VM streams before its first fit: the warm-up, and at least enough
        for a window and a few more."""
        return max(self.adaptation_settings.warmup_samples, self.window + 16)

    def _scale_floors(self, metrics: tuple[str, ...]) -> list[float]:
        """Least normalization scale of each of a VM's `metrics`: the network's from
        `adaptation.scale_floors` (or the default metrics' own), the VM's own metrics
        from `adaptation.own_metric_floors` (the first pattern that matches), else none
        (vmad.windows.Normalizer's fallbacks: the units are the VM's)."""
        floors = self.adaptation_settings.scale_floors
        if floors is not None:
            if len(floors) != len(self.metrics):
                raise ValueError(f"adaptation.scale_floors has {len(floors)} values for "
                                 f"{len(self.metrics)} metrics")
        else:
            floors = list(DEFAULT_SCALE_FLOORS) if self.metrics == DEFAULT_METRICS \
                else [0.0] * len(self.metrics)
        patterns = self.adaptation_settings.own_metric_floors
        own = [next((floor for pattern, floor in patterns.items()
                     if fnmatch.fnmatchcase(name, pattern)), 0.0)
               for name in metrics[len(self.metrics):]]
        return list(floors) + own

    def _normal_history(self, vm_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw samples to fit on: the newest `history_samples` outside anomalous labels
        and flagged windows (unless labelled normal), and which of them are labelled
        normal. The first fit takes the same: the
        warm-up bundle raises no alarm, so a new VM's warm-up is all of it, and a VM that
        arrives with a backlog (an agent's spool after the trainer was unreachable, a
        trainer that lost its models) is fitted on all of that, outside what alarmed."""
        settings = self.adaptation_settings
        recent = self.store.recent(vm_id, settings.history_samples)
        if not len(recent):
            return recent.values, np.zeros(0, dtype=bool)
        times, _, flagged = self.store.verdicts(vm_id, len(recent))
        span = self.window * max(float(np.median(np.diff(recent.timestamps))), 1e-9) \
            if len(recent) > 1 else 0.0
        labels = self.store.labels_at(vm_id, recent.timestamps)
        # outside_alarms, in its two steps: the covered rows also feed the warning.
        covered = alarm_covered(recent.timestamps, times[flagged], span, normal=labels == 0)
        kept = (labels != 1) & ~covered
        fitted = refit_values(recent.values, kept, self.window)
        if covered.sum() > len(recent) // 2:
            # A fault that lasts, or a normal that moved: only an operator can say which.
            first, last = recent.timestamps[covered][[0, -1]]
            log.warning("VM %s: alarms cover %d of its newest %d samples (%.0f-%.0f), %s; "
                        "if that is its new normal: vmad label --vm %s --normal --start "
                        "%.0f --end %.0f", vm_id, covered.sum(), len(recent), first, last,
                        "too many to leave out, so this refit learns them as normal"
                        if len(fitted) == len(recent) else "left out of this refit",
                        vm_id, first, last)
        return fitted, refit_values(labels == 0, kept, self.window)

    def adapt(self, vm_id: str, now: float | None = None, *,
              keep_normalizer: bool = False) -> TrainOutcome:
        """Fit (or refresh) the VM's adaptation on its own samples, without labels.
        `keep_normalizer`: the weights changed, the statistics stay (refit the rest)."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        previous = self.adaptation(vm_id)
        settings = self.adaptation_settings
        counters = self.store.counters(vm_id)
        labels_seen = self.store.last_label_id(vm_id)  # before the history is read
        raw, labelled_normal = self._normal_history(vm_id)
        metrics = self.vm_metrics(vm_id)
        checkpoint = self._as_seen_by(metrics, self.checkpoint(vm_id))
        floors = self._scale_floors(metrics)
        injected = self._injected_set(raw, metrics, floors)
        self._warn_unscaled(vm_id, metrics, floors, raw)
        adaptation = fit_adaptation(
            checkpoint.model, raw, self.window, floors=floors,
            components=settings.components, cnn_weight=settings.cnn_weight,
            injected=injected, cnn_weights=settings.cnn_weights,
            subspace_variance=settings.subspace_variance,
            normal_states=settings.normal_states,
            false_alarm_rate=settings.target_false_alarm_rate,
            min_deviation=settings.min_deviation,
            network_threshold=checkpoint.threshold if settings.network_floor else None,
            received=counters.received if counters else 0, now=now,
            generation=previous.generation + 1 if previous else 1,
            normalizer=previous.normalizer if keep_normalizer and previous else None,
            preferred_before=previous.preferred_cnn_weight if previous else None,
            labelled_normal=labelled_normal)
        adaptation = replace(adaptation, labels_seen=labels_seen)
        if adaptation.label_raise > 1.0:
            log.info("VM %s: %d samples labelled normal raise its threshold to %.1f times "
                     "the false-alarm target's height above its usual level", vm_id,
                     labelled_normal.sum(), adaptation.label_raise)
        self._save_adaptation(vm_id, adaptation)
        bundle = self.bundle(vm_id)
        quality = self._injected_quality(injected, bundle) if injected is not None else {}
        if quality:
            self._save_adaptation(vm_id, replace(adaptation, quality=quality))
        return TrainOutcome(vm_id, "adapt", 0, float("nan"), time.perf_counter() - started,
                            bundle.metadata.version, bundle)

    def _warn_unscaled(self, vm_id: str, metrics: tuple[str, ...], floors: list[float],
                       raw: np.ndarray) -> None:
        """Log the VM's own metrics that have no floor and barely moved in the history
        being fitted: their scale falls back to a tiny standard deviation, and their
        first ordinary wobble reads as many spreads off (on SMD, fused false alarms 1.1 %
        with a floor, 5.3 % without; docs/detection.md)."""
        if not len(raw):
            return
        q75, q25 = np.percentile(raw, [75, 25], axis=0)
        unscaled = [name for name, floor, spread in zip(metrics, floors, q75 - q25,
                                                        strict=True)
                    if floor == 0.0 and spread <= 1e-9 and name not in self.metrics]
        if unscaled:
            log.warning("VM %s: %d of its own metrics barely moved in its history and have "
                        "no floor (%s%s); set adaptation.own_metric_floors in their units",
                        vm_id, len(unscaled), ", ".join(unscaled[:5]),
                        ", ..." if len(unscaled) > 5 else "")

    def _injected_set(self, raw: np.ndarray, metrics: tuple[str, ...],
                      floors: list[float]) -> InjectedSet | None:
        """The VM's own history with synthetic faults injected (trainer/injection.py: the
        fault kinds of vmad.synthetic for the default metrics, shifts, ramps and spikes
        in each metric's own scale for others); None when too short to hold faults."""
        if len(raw) < 4 * self.window:
            return None
        if metrics == DEFAULT_METRICS:
            return injected_validation_set(raw, self.window, seed=self.seed)
        scale = np.asarray(Normalizer.fit(raw, floor=floors).scale)
        return injected_generic_set(raw, self.window, scale, seed=self.seed)

    def _injected_quality(self, injected: InjectedSet, bundle: Bundle) -> dict[str, float]:
        """The VM's detector on its own history with synthetic faults injected."""
        result = injected_quality(bundle.score(injected.windows), injected,
                                  bundle.metadata.threshold, bundle.metadata.alarm_after)
        return {k: float(getattr(result, k)) for k in (
            "precision", "recall", "point_f1", "false_alarm_rate", "event_recall", "auc")}

    def _self_supervised_data(self, vm_id: str,
                              labelled: LabelledWindows) -> SelfSupervisedData | None:
        """The label-free fine-tuning set of an adapted VM: its own normal history with
        faults injected, its real labelled windows first; None when switched off, for
        other metric sets, or with too little history."""
        from vmad.trainer.self_supervised import self_supervised_data

        if not self.settings.self_supervised or self.vm_metrics(vm_id) != DEFAULT_METRICS:
            return None
        history, _ = self._normal_history(vm_id)
        try:
            return self_supervised_data(history, self.window, seed=self.seed,
                                        real_windows=labelled.raw, real_labels=labelled.labels)
        except ValueError:
            return None

    def _save_adaptation(self, vm_id: str, adaptation: VMAdaptation) -> None:
        path = self._adaptation_file(vm_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(".adaptation.json.tmp")
        staging.write_text(adaptation.to_json())
        staging.replace(path)
        with self._lock:
            self._adaptations[vm_id] = adaptation

    # -- data -------------------------------------------------------------------------

    def labelled_windows(self, vm_id: str, limit: int | None = None) -> LabelledWindows:
        """The newest labelled windows of the VM (label = its last sample's label)."""
        window = self.window
        limit = self.settings.max_windows if limit is None else limit
        recent = self.store.recent(vm_id, limit + window - 1)
        empty = LabelledWindows(np.zeros((0, len(self.vm_metrics(vm_id)), window), np.float32),
                                np.zeros(0, np.int8), np.zeros(0))
        if len(recent) < window:
            return empty
        labels = self.store.labels_at(vm_id, recent.timestamps)
        if self.settings.assume_normal_unlabelled:
            labels = np.where(labels < 0, 0, labels).astype(np.int8)
        windows = make_windows(recent.values, window)
        # Windows spanning a gap in sequence numbers (agent down, samples lost) mix two
        # separate stretches of time: leave them out.
        gaps = np.concatenate([[0], np.cumsum(np.diff(recent.seqs) != 1)])
        whole = gaps[window - 1:] == gaps[: len(gaps) - window + 1]
        end_labels = labels[window - 1:]
        keep = whole & (end_labels >= 0)
        return LabelledWindows(np.ascontiguousarray(windows[keep]), end_labels[keep],
                               recent.timestamps[window - 1:][keep])

    def state(self, vm_id: str, now: float | None = None) -> VMState:
        """The VM's state for the controller (see vmad/state.py)."""
        from vmad.trainer.training import predict_proba

        now = time.time() if now is None else now
        metrics = self.vm_metrics(vm_id)
        checkpoint = self._as_seen_by(metrics, self.checkpoint(vm_id))
        adaptation = self.adaptation(vm_id)
        normalizer = adaptation.normalizer if adaptation else checkpoint.normalizer
        info = self.info(vm_id)
        data = self.labelled_windows(vm_id)
        probabilities = np.zeros(0, np.float32)
        if len(data.labels):
            normalized = normalizer.apply_windows(data.raw)
            probabilities = predict_proba(checkpoint.model, normalized)
        recent = self.store.recent(vm_id, self.settings.state_samples)
        _, _, flagged = self.store.verdicts(vm_id, self.settings.state_samples)
        counters = self.store.counters(vm_id)
        received = counters.received if counters else 0
        values = recent.values if len(recent) else np.zeros((0, len(metrics)), np.float32)
        last_blamed = self.store.last_blamed(vm_id)
        blamed = blame_text(metrics, last_blamed[1], 3) \
            if last_blamed is not None and len(last_blamed[1]) == len(metrics) else ""
        return compute_state(
            vm_id, timestamp=now, recent_values=values, normalizer=normalizer,
            probabilities=probabilities, labels=data.labels, threshold=checkpoint.threshold,
            agent_verdicts=flagged, recent_windows=max(0, len(recent) - self.window + 1),
            last_trained_at=info.trained_at,
            samples_since_training=received - info.samples_at_training,
            batches_trained=info.batches_trained, finetuned=info.finetuned,
            model_version=self.bundle(vm_id).metadata.version, blamed=blamed,
            detector=self._detector_summary(adaptation, received, info.finetuned, now),
        )

    def _detector_summary(self, adaptation: VMAdaptation | None, received: int,
                          finetuned: bool, now: float) -> str:
        if adaptation is not None:
            return adaptation.summary(now)
        if finetuned:
            return "fine-tuned, not yet adapted"
        needed = self._first_fit_samples()
        return f"warming up: {min(received, needed)} of {needed} samples, no alarms"

    # -- actions ----------------------------------------------------------------------

    def reset(self, vm_id: str, now: float | None = None) -> TrainOutcome:
        """Back to the pretrained model."""
        now = time.time() if now is None else now
        info = self.info(vm_id)
        counters = self.store.counters(vm_id)
        self.store.set_model_info(vm_id, VMModelInfo(
            self.pretrained_version, False, 0, now, counters.received if counters else 0,
            self.pretrained.threshold, info.pushed))
        with self._lock:
            self._models.pop(vm_id, None)
            self._bundles.pop(vm_id, None)
        if self.adaptation(vm_id) is not None:
            # Other weights, other scores: refit fusion and threshold on the same statistics.
            self.adapt(vm_id, now, keep_normalizer=True)
        bundle = self.bundle(vm_id)
        return TrainOutcome(vm_id, "reset", 0, float("nan"), 0.0, bundle.metadata.version,
                            bundle)

    def finetune(self, vm_id: str, batches: int, *, reset: bool = False,
                 now: float | None = None) -> TrainOutcome:
        """Fine-tune the VM's model (or the pretrained one when `reset`) for `batches`
        mini-batches on its labelled windows, export, and make it current."""
        from vmad.trainer.self_supervised import finetune_self_supervised, validation_threshold
        from vmad.trainer.training import TrainConfig, calibrated_threshold, train

        started = time.perf_counter()
        info = self.info(vm_id)
        data = self.labelled_windows(vm_id)
        adaptation = self.adaptation(vm_id)
        # Injecting faults into the history costs time: only when a fine-tune will run.
        injected = self._self_supervised_data(vm_id, data) \
            if adaptation is not None and batches > 0 else None
        if (len(data.labels) == 0 and injected is None) or batches <= 0:
            outcome = self.reset(vm_id, now) if reset else None
            bundle = outcome.bundle if outcome else self.bundle(vm_id)
            return TrainOutcome(vm_id, "reset" if reset else "keep", 0, float("nan"), 0.0,
                                bundle.metadata.version, bundle,
                                skipped="no labelled windows" if batches > 0 else "")
        base = self.pretrained if reset or not info.finetuned else self.checkpoint(vm_id)
        model = copy.deepcopy(base.model)
        # The network trains on its own metrics (the first columns of the VM's).
        network = len(self.metrics)
        normalizer = base.normalizer
        if adaptation is not None:
            # The VM's own, fitted without labels.
            normalizer = adaptation.normalizer.narrowed(network)
        elif self.settings.refit_normalization:
            recent = self.store.recent(vm_id, self.settings.max_windows + self.window - 1)
            normalizer = Normalizer.fit(recent.values[:, :network])
        config = TrainConfig(max_batches=batches, batch_size=self.settings.batch_size,
                             lr=self.settings.lr, freeze_early=self.settings.freeze_early,
                             seed=self.seed + info.batches_trained)
        # The network's own threshold moves with its weights (the network floor under
        # the fused threshold uses it): recalibrated as `vmad finetune` does, on the
        # injected validation set when there is one, else on the labelled windows.
        threshold: float | None
        if injected is not None:
            result = finetune_self_supervised(
                model, injected, normalizer.apply_windows, config)
            threshold = validation_threshold(model, injected, normalizer.apply_windows)
        else:
            windows = normalizer.apply_windows(data.raw[:, :network])
            result = train(model, windows, data.labels, config)
            threshold = calibrated_threshold(model, windows, data.labels)
        if threshold is None:
            # Too few windows of one kind to place a threshold: the network keeps its old one.
            log.warning("VM %s: the fine-tuned network keeps its threshold %.3f: its %s "
                        "windows hold one class", vm_id, base.threshold,
                        "labelled" if injected is None else "validation")
            threshold = base.threshold
        spent = (0 if reset or not info.finetuned else info.batches_trained) + result.batches
        n = info.pushed + 1
        version = f"{base.kind}-{_safe_name(vm_id)}-ft{n}"
        provenance = {**base.provenance, "finetuned_for": vm_id, "finetune_batches": spent,
                      "labelled_windows": len(data.labels),
                      "anomalous_windows": int(data.labels.sum()),
                      "injected_windows": 0 if injected is None
                      else len(injected.labels) - injected.real_labelled}
        checkpoint = Checkpoint(model, base.kind, base.metrics, base.window, normalizer,
                                threshold, provenance)
        save_checkpoint(self.models_dir / _safe_name(vm_id), checkpoint)
        counters = self.store.counters(vm_id)
        now = time.time() if now is None else now
        self.store.set_model_info(vm_id, VMModelInfo(
            version, True, spent, now, counters.received if counters else 0,
            threshold, n))
        with self._lock:
            self._models[vm_id] = checkpoint
            self._bundles.pop(vm_id, None)
        if adaptation is not None:
            # New weights, new scores: refit fusion and threshold on the same statistics.
            self.adapt(vm_id, now, keep_normalizer=True)
        bundle = self.bundle(vm_id)
        version = bundle.metadata.version
        return TrainOutcome(vm_id, "reset_finetune" if reset else "finetune", result.batches,
                            result.final_loss, time.perf_counter() - started, version, bundle)
