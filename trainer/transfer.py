"""Per-VM models on the trainer: the paper's transfer training module.

The trainer holds one pretrained checkpoint and, per VM, either "use the pretrained one"
or a fine-tuned copy of it. Fine-tuning starts from the VM's current model (or from the
pretrained weights after a reset), trains on the VM's recent labelled windows from the
store, and exports a bundle for the agent. Fine-tuned checkpoints live under
`models_dir/<vm>/` and their bookkeeping in the store, so a restarted trainer serves the
same model to the same VM.

Concurrency: training runs on a *copy* of the model in the worker thread; the finished
model replaces the VM's entry under a lock, so readers (state reports, bundle pushes)
always see a whole model, old or new, never one half-trained.
"""

from __future__ import annotations

import copy
import hashlib
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vmad.bundle import Bundle
from vmad.state import VMState, compute_state
from vmad.trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from vmad.trainer.store import TelemetryStore, VMModelInfo
from vmad.windows import Normalizer, make_windows

__all__ = ["LabelledWindows", "TrainOutcome", "TransferSettings", "VMModels"]


@dataclass(frozen=True)
class TransferSettings:
    """How fine-tuning uses a VM's data (keys of `training` in trainer.yaml).

    lr / batch_size / freeze_early: passed to trainer/training.py's TrainConfig.
    max_windows: newest labelled windows used for fine-tuning and for the state report.
    state_samples: newest samples summarized in the state report (drift, summary).
    refit_normalization: refit the normalizer on the VM's own recent data when
        fine-tuning, so the model sees this VM's "normal" as normal.
    assume_normal_unlabelled: count windows nobody labelled as normal. Real agents only
        ship labels for injected faults and operator marks; with this on, everything else
        is taken as normal, which is what an operator who marks every incident means.
    """

    lr: float = 3e-4
    batch_size: int = 64
    freeze_early: bool = False
    max_windows: int = 4_000
    state_samples: int = 2_000
    refit_normalization: bool = True
    assume_normal_unlabelled: bool = False


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
                 settings: TransferSettings | None = None, seed: int = 0) -> None:
        from vmad.trainer.export import export_bundle

        self.pretrained = pretrained
        self.store = store
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings or TransferSettings()
        self.seed = seed
        self._lock = threading.Lock()
        self._models: dict[str, Checkpoint] = {}
        self._bundles: dict[str, Bundle] = {}
        # Versions name the weights: the same pretrained model gets the same version on
        # every trainer and after every restart, so agents are not pushed a copy they run.
        digest = hashlib.sha256(
            b"".join(t.detach().numpy().tobytes()
                     for t in pretrained.model.state_dict().values())).hexdigest()[:10]
        self.pretrained_version = f"{pretrained.kind}-pretrained-{digest}"
        self.pretrained_bundle = export_bundle(pretrained, self.pretrained_version)

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.pretrained.metrics

    @property
    def window(self) -> int:
        return self.pretrained.window

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
        """The bundle the VM's agent should run."""
        info = self.info(vm_id)
        if not info.finetuned:
            return self.pretrained_bundle
        with self._lock:
            cached = self._bundles.get(vm_id)
        if cached is not None and cached.metadata.version == info.version:
            return cached
        from vmad.trainer.export import export_bundle

        bundle = export_bundle(self.checkpoint(vm_id), info.version)
        with self._lock:
            self._bundles[vm_id] = bundle
        return bundle

    # -- data -------------------------------------------------------------------------

    def labelled_windows(self, vm_id: str, limit: int | None = None) -> LabelledWindows:
        """The newest labelled windows of the VM (label = its last sample's label)."""
        window = self.window
        limit = self.settings.max_windows if limit is None else limit
        recent = self.store.recent(vm_id, limit + window - 1)
        empty = LabelledWindows(np.zeros((0, len(self.metrics), window), np.float32),
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
        """The VM's state for the controller (see trainer/state.py)."""
        from vmad.trainer.training import predict_proba

        now = time.time() if now is None else now
        checkpoint = self.checkpoint(vm_id)
        info = self.info(vm_id)
        data = self.labelled_windows(vm_id)
        probabilities = np.zeros(0, np.float32)
        if len(data.labels):
            normalized = _normalize(data.raw, checkpoint.normalizer)
            probabilities = predict_proba(checkpoint.model, normalized)
        recent = self.store.recent(vm_id, self.settings.state_samples)
        _, _, flagged = self.store.verdicts(vm_id, self.settings.state_samples)
        counters = self.store.counters(vm_id)
        received = counters.received if counters else 0
        values = recent.values if len(recent) else np.zeros((0, len(self.metrics)), np.float32)
        return compute_state(
            vm_id, timestamp=now, recent_values=values, normalizer=checkpoint.normalizer,
            probabilities=probabilities, labels=data.labels, threshold=checkpoint.threshold,
            agent_verdicts=flagged, recent_windows=max(0, len(recent) - self.window + 1),
            last_trained_at=info.trained_at,
            samples_since_training=received - info.samples_at_training,
            batches_trained=info.batches_trained, finetuned=info.finetuned,
            model_version=info.version,
        )

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
        return TrainOutcome(vm_id, "reset", 0, float("nan"), 0.0, self.pretrained_version,
                            self.pretrained_bundle)

    def finetune(self, vm_id: str, batches: int, *, reset: bool = False,
                 now: float | None = None) -> TrainOutcome:
        """Fine-tune the VM's model (or the pretrained one when `reset`) for `batches`
        mini-batches on its labelled windows, export, and make it current."""
        from vmad.trainer.export import export_bundle
        from vmad.trainer.training import TrainConfig, train

        started = time.perf_counter()
        info = self.info(vm_id)
        data = self.labelled_windows(vm_id)
        if len(data.labels) == 0 or batches <= 0:
            outcome = self.reset(vm_id, now) if reset else None
            bundle = outcome.bundle if outcome else self.bundle(vm_id)
            return TrainOutcome(vm_id, "reset" if reset else "keep", 0, float("nan"), 0.0,
                                bundle.metadata.version, bundle,
                                skipped="no labelled windows" if batches > 0 else "")
        base = self.pretrained if reset or not info.finetuned else self.checkpoint(vm_id)
        model = copy.deepcopy(base.model)
        normalizer = base.normalizer
        if self.settings.refit_normalization:
            recent = self.store.recent(vm_id, self.settings.max_windows + self.window - 1)
            normalizer = Normalizer.fit(recent.values)
        config = TrainConfig(max_batches=batches, batch_size=self.settings.batch_size,
                             lr=self.settings.lr, freeze_early=self.settings.freeze_early,
                             seed=self.seed + info.batches_trained)
        result = train(model, _normalize(data.raw, normalizer), data.labels, config)
        spent = (0 if reset or not info.finetuned else info.batches_trained) + result.batches
        n = info.pushed + 1
        version = f"{base.kind}-{_safe_name(vm_id)}-ft{n}"
        provenance = {**base.provenance, "finetuned_for": vm_id, "finetune_batches": spent,
                      "labelled_windows": len(data.labels),
                      "anomalous_windows": int(data.labels.sum())}
        checkpoint = Checkpoint(model, base.kind, base.metrics, base.window, normalizer,
                                base.threshold, provenance)
        bundle = export_bundle(checkpoint, version)
        save_checkpoint(self.models_dir / _safe_name(vm_id), checkpoint)
        counters = self.store.counters(vm_id)
        now = time.time() if now is None else now
        self.store.set_model_info(vm_id, VMModelInfo(
            version, True, spent, now, counters.received if counters else 0,
            base.threshold, n))
        with self._lock:
            self._models[vm_id] = checkpoint
            self._bundles[vm_id] = bundle
        return TrainOutcome(vm_id, "reset_finetune" if reset else "finetune", result.batches,
                            result.final_loss, time.perf_counter() - started, version, bundle)


def _normalize(raw: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """Raw `[W, M, T]` -> normalized, the layout models take."""
    return np.ascontiguousarray(normalizer.apply(raw.transpose(0, 2, 1)).transpose(0, 2, 1))
