"""The detection benchmark protocol (`vmad bench detection`).

For each target series folder in DIR (train part unlabelled, test part labelled):
1. pretrain a fresh model on the synthetic source plus the *other* series' labelled test
   parts (leave-one-out; `folds` > 0 groups series into folds to save compute, and then
   a target's pretraining leaves its whole fold out), early-stopping on the last
   `validation_share` of each source;
2. fine-tune on the first `finetune_share` (30 %) of the target's test part, at most
   200 mini-batches, early-stopped on every 4th block of that part, and keeping the
   pretrained weights when fine-tuning never beats them there (few target events
   overfit easily);
3. pick the threshold that maximizes point-wise F1 on that same 30 %;
4. score every sample of the remaining 70 % (a sample's score is that of the window
   ending at it) with point-wise and event-wise metrics, never point-adjusted.
Each series is normalized with statistics of its own train part (scale floor
`scale_floor`), as a deployed bundle carries statistics of its own VM. `pca` is fitted
on the target's train part only.

The label-free detectors need no pretraining per target, so they cost seconds:
- `residual`: the per-metric deviation of each sample from the train part's normal
  (trainer/residual.py), its largest contribution as the score;
- `fused`: the shipped pretrained Zoom-CNN (trainer/default_checkpoint, on the target's
  metrics that carry the default metrics' quantities, see SYNTHETIC_ALIASES) fused with
  `residual` as the agent's bundle does (trainer/adaptation.py). The network's weight
  is the one of `fusion_weights` that best ranks faults injected into the newest
  `history_samples` of the fitted data (trainer/injection.py's generic shifts, ramps
  and spikes, as the trainer does for metrics other than its default four), but no
  more than the previous fit preferred (`confirmed_weight`); with
  `weight_rule="head"` the head's labels pick it where they hold an anomaly, and with
  "fixed" it is `cnn_weight`.
With `labels="none"` no label of the target is used: thresholds flag `false_alarm_rate`
of the train part's samples, and the neural detectors are not fine-tuned.
`residual`, `subspace` and `fused` are refitted as the trainer refits a VM (every
`refresh` test samples on the newest `history` outside earlier alarms; see
ProtocolConfig), unless `refresh` is 0. Their AUC ranks each sample's margin over its
fit's threshold: for `fused` the logit of the bundle's score (in heights of the
threshold above the fit's median, `threshold_units`), for the others in the
detector's own units.
Attribution: for the detectors with per-metric contributions (`residual`, `fused`,
`pca`), HitRate@100 % / @150 % against `interpretation_label.txt` when the series
folder has one (NaN otherwise). `residual` and `fused` rank metrics as the bundle's
contributions output does (trainer/attribution.py, fitted on the train part); `pca`
by its squared residuals.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vmad.detectors import create
from vmad.evaluation import (
    DetectionScores,
    Interpretation,
    best_f1_threshold,
    events,
    false_alarm_threshold,
    hit_rate,
    read_interpretation_labels,
    score_detection,
    tail_threshold,
)
from vmad.series import Series, list_series_folders, read_series_folder
from vmad.synthetic import generate_fleet
from vmad.trainer import pca_detector, residual, states  # noqa: F401 - register detectors
from vmad.trainer.adaptation import (
    choose_cnn_weight,
    confirmed_weight,
    fit_fusion,
    obeyed_threshold,
    offset_floor,
    outside_alarms,
    threshold_units,
)
from vmad.trainer.attribution import AttributionModel
from vmad.trainer.checkpoint import load_default_checkpoint
from vmad.trainer.config import AdaptationSettings
from vmad.trainer.datasets import SYNTHETIC_ALIASES, WindowPool, WindowSource, align_metrics
from vmad.trainer.injection import injected_generic_series
from vmad.trainer.models import MODEL_KINDS, build_model
from vmad.trainer.residual import ResidualModel
from vmad.trainer.states import NormalStates
from vmad.trainer.training import TrainConfig, predict_logits, predict_proba, train
from vmad.windows import Normalizer, make_windows

__all__ = ["DETECTORS", "QUICK", "ProtocolConfig", "run_detection_benchmark"]

LABEL_FREE: tuple[str, ...] = ("residual", "subspace", "states", "fused", "pca")
DETECTORS: tuple[str, ...] = (*MODEL_KINDS, *LABEL_FREE)
LABEL_MODES: tuple[str, ...] = ("head", "none")
HEAD_RULES: tuple[str, ...] = ("refit", "best_f1")
WEIGHT_RULES: tuple[str, ...] = ("injected", "head", "fixed")
SYNTHETIC_SOURCE = "synthetic"


@dataclass(frozen=True)
class ProtocolConfig:
    """window: samples per window (T). finetune_share: head of the target's test part used
    to fine-tune and pick the threshold. synthetic_*: the generated source domain (VMs,
    samples each, share of pretraining draws). max_samples: cut each part to this many
    samples (quick runs). folds: 0 = leave-one-out pretraining per target.
    labels: "head" (labels of the first finetune_share of the test part are used) or
    "none". false_alarm_rate: the label-free threshold's target on the train part.
    scale_floor: least normalization scale, in the data's units (SMD is min-max scaled
    to [0, 1]: 0.05 is 5 % of a metric's full range). fusion_weights / cnn_weight: the
    network weights `fused` chooses from / its weight under `weight_rule="fixed"`.
    threshold_rule: without labels, "tail" (peaks over threshold, as the trainer does) or
    "quantile" (the empirical quantile of the train part's scores).
    head_rule: how the label-free rows use the head's labels. "refit" (as the trainer
    does when a VM has labels): refit on the train part plus the head's samples that no
    label marks anomalous (a window's length kept clear around every event), and take
    the threshold from the false-alarm target on what was fitted and on those head
    samples, labelled normal (`obeyed_threshold`).
    "best_f1": fit on the train part only, threshold with the best F1 on the head.
    min_deviation / network_floor: the trainer's floors under the threshold of
    `residual` and `fused` (trainer.yaml `adaptation`, trainer/adaptation.py).
    weight_rule: `fused`'s network weight: "injected" (as the trainer), "head" (the
    head's labels where they hold an anomaly, else injected) or "fixed" (`cnn_weight`).
    subspace_variance / normal_states: `fused`'s unsupervised part is the mean of the
    per-metric deviation, the distance from the subspace explaining this share of
    variance and the distance from the nearest of this many usual states, each
    standardized on the fitted samples (trainer.yaml `adaptation`); 0 = no such part.
    refresh / history: the rows the trainer ships (`residual`, `subspace`, `states`,
    `fused`) are refitted as the trainer refits a VM (trainer.yaml
    `adaptation.refresh_samples`, `history_samples`): every `refresh` samples of the
    test part on the newest `history` samples outside earlier alarms (and the head's
    events); 0 = one fit on the whole train part (and the head's normal samples), the
    protocol before the trainer's schedule was simulated. `pca`, the operator's
    baseline, is fitted once either way; so is every row under `head_rule="best_f1"`."""

    window: int = 64
    finetune_share: float = 0.3
    validation_share: float = 0.15
    validation_windows: int = 3000
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_batches=600, batch_size=128, lr=1e-3, eval_every=50, patience=4))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_batches=200, batch_size=64, lr=3e-4, eval_every=20, patience=3))
    synthetic_vms: int = 8
    synthetic_samples: int = 20_000
    synthetic_share: float = 0.1
    max_series: int | None = None
    max_samples: int | None = None
    folds: int = 0
    seed: int = 0
    labels: str = "head"
    false_alarm_rate: float = 0.005
    scale_floor: float = 0.05
    fusion_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cnn_weight: float = 0.5
    threshold_rule: str = "tail"
    head_rule: str = "refit"
    min_deviation: float = AdaptationSettings().min_deviation
    network_floor: bool = AdaptationSettings().network_floor
    weight_rule: str = "injected"
    subspace_variance: float = AdaptationSettings().subspace_variance
    normal_states: int = AdaptationSettings().normal_states
    refresh: int = AdaptationSettings().refresh_samples
    history: int = AdaptationSettings().history_samples


QUICK = ProtocolConfig(
    window=32,
    validation_windows=300,
    pretrain=TrainConfig(max_batches=30, batch_size=64, eval_every=10, patience=2),
    finetune=TrainConfig(max_batches=15, batch_size=32, lr=3e-4, eval_every=5, patience=2),
    synthetic_vms=2,
    synthetic_samples=2_000,
    max_series=3,
    max_samples=3_000,
)


@dataclass
class _Target:
    name: str
    train: Series
    test: Series
    normalizer: Normalizer
    interpretation: list[Interpretation] | None = None


def _load(data_dir: Path, config: ProtocolConfig) -> list[_Target]:
    folders = list_series_folders(data_dir)
    if not folders:
        raise ValueError(f"{data_dir} holds no series folders (each with train and test files)")
    folders = folders[: config.max_series] if config.max_series else folders
    targets = []
    for folder in folders:
        train_part, test_part = read_series_folder(folder)
        if config.max_samples:
            train_part = train_part.slice(0, config.max_samples)
            test_part = test_part.slice(0, config.max_samples)
        if test_part.labels is None:
            raise ValueError(f"{folder}: the test part has no label column")
        normalizer = Normalizer.fit(train_part.values, floor=config.scale_floor)
        labels_file = folder / "interpretation_label.txt"
        interpretation = read_interpretation_labels(labels_file) if labels_file.is_file() \
            else None
        targets.append(_Target(folder.name, train_part, test_part, normalizer, interpretation))
    metrics = targets[0].test.metrics
    for target in targets:
        if target.test.metrics != metrics or target.train.metrics != metrics:
            raise ValueError(f"series {target.name} has other metrics than {targets[0].name}")
    return targets


def _synthetic_sources(config: ProtocolConfig, metrics: Sequence[str]) -> list[Series]:
    fleet = generate_fleet(config.seed + 1000, config.synthetic_vms, config.synthetic_samples)
    aligned = [align_metrics(vm, metrics) for vm in fleet]
    return [vm for vm in aligned if vm is not None]


def _fold_of(index: int, folds: int) -> int:
    return index if folds <= 0 else index % folds


def _source_split(series: Series, normalizer: Normalizer, config: ProtocolConfig,
                  name: str) -> tuple[WindowSource, WindowSource]:
    cut = int(len(series) * (1 - config.validation_share))
    fit = WindowSource.from_series(series, normalizer, config.window, stop=cut)
    held_out = WindowSource.from_series(series, normalizer, config.window, start=cut)
    return replace(fit, name=name), held_out


def _pretraining_data(
    targets: list[_Target], target_index: int, synthetic: list[Series], config: ProtocolConfig,
) -> tuple[WindowPool, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    fold = _fold_of(target_index, config.folds)
    fit_sources, held_out = [], []
    for i, other in enumerate(targets):
        if _fold_of(i, config.folds) == fold:
            continue
        fit, val = _source_split(other.test, other.normalizer, config, other.name)
        fit_sources.append(fit)
        held_out.append(val)
    for vm in synthetic:
        fit, _ = _source_split(vm, Normalizer.fit(vm.values), config, SYNTHETIC_SOURCE)
        fit_sources.append(fit)
    pool = WindowPool(fit_sources)
    has_synthetic = any(s.name == SYNTHETIC_SOURCE for s in pool.sources)
    shares = {SYNTHETIC_SOURCE: config.synthetic_share} if has_synthetic else {}
    # Several synthetic VMs share one name: weights split that share by size among them.
    weights = pool.source_weights(shares)
    validation_pool = WindowPool(held_out)
    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.choice(len(validation_pool),
                              min(config.validation_windows, len(validation_pool)), replace=False))
    return pool, weights, (validation_pool[pick], validation_pool.labels[pick])


def _evaluate_neural(
    kind: str, target: _Target, pretraining: tuple[WindowPool, np.ndarray, tuple],
    config: ProtocolConfig, progress: bool, fold: int | None, pretrained: dict,
) -> tuple[DetectionScores, dict[str, float]]:
    pool, weights, validation = pretraining
    n_metrics = len(target.test.metrics)
    model = build_model(kind, n_metrics, config.window)
    started = time.perf_counter()
    key = (kind, fold)
    if key in pretrained:
        # Same fold, same pretraining data: the same weights, without paying again.
        state, pre_batches = pretrained[key]
        model.load_state_dict(state)
    else:
        pre = train(model, pool, pool.labels, config.pretrain, validation=validation,
                    sample_weights=weights,
                    progress=f"{target.name} {kind} pretrain" if progress else None)
        pre_batches = pre.batches
        if fold is not None:
            pretrained[key] = ({k: v.clone() for k, v in model.state_dict().items()},
                               pre.batches)
    cut = int(len(target.test) * config.finetune_share)
    held = WindowSource.from_series(target.test, target.normalizer, config.window, start=cut)
    if config.labels == "none":
        # No label of the target: the pretrained model as it is, its threshold flagging
        # false_alarm_rate of the train part's windows.
        train_windows = make_windows(target.normalizer.apply(target.train.values), config.window)
        threshold = false_alarm_threshold(predict_proba(model, train_windows),
                                          config.false_alarm_rate)
        scores = predict_proba(model, WindowPool([held]))
        cost = {"pretrain_batches": pre_batches, "finetune_batches": 0,
                "seconds": time.perf_counter() - started}
        return score_detection(held.labels, scores, threshold), cost
    tune = WindowSource.from_series(target.test, target.normalizer, config.window, stop=cut)
    tune_windows = tune.gather(np.arange(len(tune)))
    held_blocks = _held_blocks(tune.ends, config.window)
    if held_blocks.all() or not held_blocks.any():
        held_blocks[:] = False
    validation = (tune_windows[held_blocks], tune.labels[held_blocks]) if held_blocks.any() \
        else None
    fine = train(model, tune_windows[~held_blocks], tune.labels[~held_blocks], config.finetune,
                 validation=validation,
                 progress=f"{target.name} {kind} fine-tune" if progress else None)
    threshold = best_f1_threshold(tune.labels, predict_proba(model, tune_windows))
    scores = predict_proba(model, WindowPool([held]))
    cost = {"pretrain_batches": pre_batches, "finetune_batches": fine.batches,
            "seconds": time.perf_counter() - started}
    return score_detection(held.labels, scores, threshold), cost


def _held_blocks(ends: np.ndarray, window: int) -> np.ndarray:
    """Every 4th block of 8 windows' length, held out to early-stop fine-tuning. Blocks
    rather than a tail, so a fine-tuning part whose anomalies all sit at one end still
    shows some to each side."""
    return (ends // (8 * window)) % 4 == 3


def _network_columns(target: _Target, shipped: Any) -> list[int] | None:
    """The target's columns that carry the network's metrics, in its order; None when
    one is missing."""
    position = {name: i for i, name in enumerate(target.test.metrics)}
    columns = [position.get(name, position.get(SYNTHETIC_ALIASES.get(name, ""), -1))
               for name in shipped.metrics]
    return None if min(columns) < 0 else columns


def _shipped_logits(target: _Target, shipped: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The shipped network's logit per sample of the train and test parts (the window
    ending at it; NaN before the first full window), on the target's columns that carry
    the default metrics' quantities. None when the target has none of them."""
    columns = _network_columns(target, shipped)
    if columns is None:
        return None
    out = []
    for part in (target.train, target.test):
        normalized = target.normalizer.apply(part.values)[:, columns]
        logits = np.full(len(part), np.nan, dtype=np.float64)
        windows = make_windows(normalized, shipped.window)
        logits[shipped.window - 1:] = predict_logits(shipped.model, windows)
        out.append(logits)
    return out[0], out[1]


def _normal_head(labels: np.ndarray, window: int) -> np.ndarray:
    """Head samples fit to learn normal from: no label marks them anomalous and no event
    lies within a window's length of them (a window reaching into an event is not
    normal content, whatever its last sample says)."""
    keep = np.ones(len(labels), dtype=bool)
    for start, stop in events(labels):
        keep[max(0, start - window + 1):stop + window - 1] = False
    return keep


# The rows the trainer ships: under `refresh`, refitted on the trainer's schedule.
TRAINER_ROWS: tuple[str, ...] = ("residual", "subspace", "states", "fused")


def _evaluate_label_free(kind: str, target: _Target, config: ProtocolConfig,
                         shipped: Any) -> tuple[DetectionScores, dict]:
    started = time.perf_counter()
    train_values = target.normalizer.apply(target.train.values)
    test_values = target.normalizer.apply(target.test.values)
    labels = target.test.labels
    assert labels is not None
    cut = int(len(target.test) * config.finetune_share)
    # The first window - 1 samples have no full window for the neural detectors: score the
    # same samples for every detector.
    first = max(cut, config.window - 1, shipped.window - 1 if kind == "fused" else 0)
    refit = config.labels != "none" and config.head_rule == "refit"
    head = _normal_head(labels[:cut], config.window) if refit else np.zeros(cut, dtype=bool)
    logits = _shipped_logits(target, shipped) if kind == "fused" else None
    if kind in ("residual", "fused"):
        # What the bundle's contributions output names (the score is unaffected).
        contributions = AttributionModel.fit(train_values, config.window) \
            .contributions_of_series(test_values, config.window)
    part = _LabelFreeFit(kind, config, shipped, target, test_values, labels, cut,
                         None if logits is None else logits[1])
    rolling = config.refresh > 0 and kind in TRAINER_ROWS and (
        config.labels == "none" or refit)
    if not rolling:
        # One fit on the train part (and the head's normal samples, `refit`).
        fit_values = np.concatenate([train_values, test_values[:cut][head]])
        fit_logits = None if logits is None else \
            np.concatenate([logits[0], logits[1][:cut][head]])
        labelled_normal = np.arange(len(fit_values)) >= len(train_values)
        detector, scores, threshold, extra = part.fit(fit_values, fit_logits,
                                                      labelled_normal)
        if kind not in ("residual", "fused"):
            contributions = detector.contributions(test_values)
    else:
        # Each sample against the threshold of the fit it was scored by.
        scores, extra, detector = _refitted_margins(part, train_values, test_values, logits,
                                                    head)
        threshold = 0.0
        if kind in ("subspace", "states"):
            contributions = detector.contributions(test_values)  # the last fit's
    result = score_detection(labels[first:], scores[first:], threshold)
    if target.interpretation is not None:
        extra["hitrate_100"] = hit_rate(contributions, target.interpretation, 1.0,
                                        slice(first, None))
        extra["hitrate_150"] = hit_rate(contributions, target.interpretation, 1.5,
                                        slice(first, None))
    return result, {**extra, "seconds": time.perf_counter() - started}


def _refitted_margins(part: _LabelFreeFit, train_values: np.ndarray,
                      test_values: np.ndarray,
                      logits: tuple[np.ndarray, np.ndarray] | None,
                      head: np.ndarray) -> tuple[np.ndarray, dict[str, float], Any]:
    """Each test sample's score minus its threshold, refitted as the trainer refits a VM:
    every `refresh` samples on the newest `history` samples before them outside every
    window an earlier alarm covered and (with labels) outside the head's events, keeping
    the head's normal samples even where an alarm covered them
    (trainer/adaptation.py's `outside_alarms`). The head's samples are scored and raise
    alarms too, so the tail starts as a trainer that ran through the head would. Also
    what was chosen, averaged over the fits that reach the tail, and the last detector."""
    config = part.config
    values = np.concatenate([train_values, test_values])
    all_logits = None if logits is None else np.concatenate(logits)
    start_of_test = len(train_values)
    keep = np.ones(len(values), dtype=bool)
    normal = np.zeros(len(values), dtype=bool)  # labelled normal: kept though alarmed
    if config.labels != "none":
        keep[start_of_test:start_of_test + len(head)] = head
        normal[start_of_test:start_of_test + len(head)] = head
    index = np.arange(len(values), dtype=np.float64)
    alarms: list[np.ndarray] = []
    margins = np.full(len(test_values), np.nan)
    chosen: list[dict[str, float]] = []
    detector = None
    for begin in range(0, len(test_values), config.refresh):
        stop = min(begin + config.refresh, len(test_values))
        end = start_of_test + begin
        low = max(0, end - config.history)
        rows = outside_alarms(index[low:end], index[low:end],
                              np.concatenate(alarms) if alarms else np.zeros(0),
                              float(config.window), config.window,
                              keep=keep[low:end], normal=normal[low:end]).astype(np.int64)
        detector, scores, threshold, extra = part.fit(
            values[rows], None if all_logits is None else all_logits[rows], normal[rows])
        margins[begin:stop] = scores[begin:stop] - threshold
        alarms.append(begin + start_of_test + np.flatnonzero(margins[begin:stop] >= 0))
        if stop > part.cut:
            chosen.append(extra)
    keys = sorted({key for extra in chosen for key in extra})
    return margins, {**{key: float(np.mean([extra[key] for extra in chosen]))
                        for key in keys}, "refits": float(len(chosen))}, detector


class _LabelFreeFit:
    """One fit of a label-free row on given normalized samples (and, for `fused`, the
    network's logits on them): the detector, its scores on the whole test part, its
    threshold, and what was chosen (network weight, deviation)."""

    def __init__(self, kind: str, config: ProtocolConfig, shipped: Any, target: _Target,
                 test_values: np.ndarray, labels: np.ndarray, cut: int,
                 test_logits: np.ndarray | None) -> None:
        self.kind, self.config, self.shipped, self.target = kind, config, shipped, target
        self.test_values, self.labels, self.cut = test_values, labels, cut
        self.test_logits = test_logits
        # The network weight the previous fit preferred (trainer/adaptation.py's
        # `confirmed_weight`): fits follow one another as the trainer's refits do.
        self.preferred: float | None = None

    def fit(self, fit_values: np.ndarray, fit_logits: np.ndarray | None,
            labelled_normal: np.ndarray) -> tuple[Any, np.ndarray, float, dict[str, float]]:
        """`labelled_normal` marks the rows of `fit_values` labelled normal (the head's),
        on which the false-alarm target also holds where labels are used, as the
        trainer's (`obeyed_threshold`)."""
        kind, config, labels, cut = self.kind, self.config, self.labels, self.cut
        # The per-sample part comes from the detector registry; `fused` adds the network.
        detector = create("residual" if kind == "fused" else kind).fit(fit_values)
        fit_scores = detector.score_samples(fit_values)
        scores = detector.score_samples(self.test_values)
        floor = config.min_deviation if kind in ("residual", "subspace", "states") \
            else -np.inf
        extra: dict[str, float] = {}
        if fit_logits is not None and self.test_logits is not None:
            # As the trainer: the per-metric deviation, the distance from the principal
            # subspace and the distance from the nearest usual state share the
            # unsupervised part (each where its setting lets it: else None).
            parts = [detector.model,
                     ResidualModel.fit_normal_subspace(fit_values, config.subspace_variance),
                     NormalStates.fit_usual(fit_values, detector.model,
                                            config.normal_states)]
            # The deviation's scores are those above.
            fit_parts = [fit_scores] + [None if part is None else part.score_samples(
                fit_values) for part in parts[1:]]
            test_parts = [scores] + [None if part is None else part.score_samples(
                self.test_values) for part in parts[1:]]
            network = self.shipped.threshold if config.network_floor else None
            injected = _injected_parts(fit_values, self.target, self.shipped, parts, config) \
                if config.weight_rule != "fixed" else None
            fit_scores, scores, weight, floor, self.preferred = _fuse(
                (fit_logits, self.test_logits), fit_parts, test_parts, labels, cut, config,
                network, injected, self.preferred)
            extra = {"cnn_weight": weight}
        is_finite = np.isfinite(fit_scores)
        finite = fit_scores[is_finite]
        if config.labels == "none" or config.head_rule == "refit":
            threshold = tail_threshold(finite, config.false_alarm_rate) \
                if config.threshold_rule == "tail" else \
                false_alarm_threshold(finite, config.false_alarm_rate)
            threshold = obeyed_threshold(max(threshold, floor), finite,
                                         labelled_normal[is_finite], config.false_alarm_rate)
        else:
            threshold = best_f1_threshold(labels[:cut], scores[:cut])
        if kind == "fused":
            # As the bundle scores: in heights of the threshold above the fit's usual
            # level, so that margins compare across refits.
            units = threshold_units(finite, threshold)
            scores, threshold = (scores - threshold) * units, 0.0
        return detector, scores, float(threshold), extra


def _injected_parts(fit_values: np.ndarray, target: _Target, shipped: Any,
                    parts: Sequence[Any], config: ProtocolConfig,
                    ) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray] | None:
    """The network's logits, each unsupervised part's scores (None for a part that is
    None) and the labels of windows
    of the newest `history` fitted samples with faults injected (in normalized units:
    scale 1); None when the target has none of the network's metrics or too few
    samples."""
    columns = _network_columns(target, shipped)
    history = fit_values[-config.history:]
    if columns is None or len(history) < 4 * shipped.window:
        return None
    # The series, not their windows: 38 metrics' windows would be most of the cost.
    injected = injected_generic_series(history, shipped.window, np.ones(history.shape[1]),
                                       seed=config.seed)
    window = shipped.window
    logits = np.concatenate([predict_logits(shipped.model, np.ascontiguousarray(
        make_windows(np.ascontiguousarray(values[:, columns]), window)))
        for values in injected.values])
    scores = [None if part is None else np.concatenate([
        part.score_samples(values[window - 1:]) for values in injected.values])
        for part in parts]
    return logits, scores, injected.window_labels(window)


def _fuse(logits: tuple[np.ndarray, np.ndarray], fit_parts: list[np.ndarray | None],
          test_parts: list[np.ndarray | None], labels: np.ndarray, cut: int,
          config: ProtocolConfig, network_threshold: float | None,
          injected: tuple[np.ndarray, list[np.ndarray | None], np.ndarray] | None = None,
          preferred_before: float | None = None,
          ) -> tuple[np.ndarray, np.ndarray, float, float, float | None]:
    """Fused fitting-data and test scores, the network weight used, the floor under
    the threshold (trainer/adaptation.py's `offset_floor`) and the weight this fit
    preferred (None: no choice). The unsupervised parts are the deviation, the distance
    from the subspace and the distance from the nearest state, in that order (None: not
    part of the score).

    The weight is the one of `fusion_weights` whose fused score ranks the `injected`
    faults best (logits, parts, labels; `choose_cnn_weight`), as the trainer does;
    with `weight_rule="head"` and labelled anomalies on the head, the one that ranks
    those best; `cnn_weight` without either. A chosen weight is no more than
    `preferred_before`, the previous fit's preference (`confirmed_weight`)."""
    fit_logits, test_logits = logits
    usable = np.isfinite(fit_logits)
    # The head's samples with a full window for the network.
    head = slice(min(cut, int(np.argmax(np.isfinite(test_logits)))), cut)
    deviation, distance, state = (None if part is None else part[usable]
                                  for part in fit_parts)
    fusion = fit_fusion(fit_logits[usable], deviation, config.cnn_weight, distance, state)
    # Samples without a full window yet: the network part sits at its median (neutral).
    fit_logits = np.where(usable, fit_logits, fusion.cnn_center)
    test_logits = np.where(np.isfinite(test_logits), test_logits, fusion.cnn_center)
    preferred = None
    if config.weight_rule == "head" and config.labels != "none" and cut \
            and labels[head].any() and not labels[head].all():
        preferred = choose_cnn_weight(fusion, test_logits[head], test_parts[0][head],
                                      labels[head], config.fusion_weights,
                                      *(None if part is None else part[head]
                                        for part in test_parts[1:]))
    elif injected is not None:
        injected_logits, injected_parts, injected_labels = injected
        preferred = choose_cnn_weight(fusion, injected_logits, injected_parts[0],
                                      injected_labels, config.fusion_weights,
                                      *injected_parts[1:])
    weight = config.cnn_weight if preferred is None else \
        confirmed_weight(preferred, preferred_before)
    fusion = replace(fusion, cnn_weight=weight)
    floor = offset_floor(fusion, config.min_deviation, network_threshold)
    return (fusion.z(fit_logits, *fit_parts), fusion.z(test_logits, *test_parts),
            float(weight), floor, preferred)


def run_detection_benchmark(
    data_dir: str | Path,
    detectors: Sequence[str] = DETECTORS,
    config: ProtocolConfig = ProtocolConfig(),
    *,
    progress: bool = False,
    on_result: Callable[[str, str, DetectionScores], None] | None = None,
) -> dict:
    """Run the protocol; returns the JSON-ready result (`mean` and per-`series` scores)."""
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
    if config.labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {config.labels!r}")
    if config.weight_rule not in WEIGHT_RULES:
        raise ValueError(f"weight_rule must be one of {', '.join(WEIGHT_RULES)}, "
                         f"got {config.weight_rule!r}")
    if config.head_rule not in HEAD_RULES:
        raise ValueError(f"head_rule must be one of {', '.join(HEAD_RULES)}, "
                         f"got {config.head_rule!r}")
    if config.refresh < 0 or config.history < config.window + 16:
        raise ValueError(f"need refresh >= 0 and history >= window + 16 samples, got "
                         f"{config.refresh} and {config.history}")
    targets = _load(Path(data_dir), config)
    neural = [d for d in detectors if d not in LABEL_FREE]
    synthetic = _synthetic_sources(config, targets[0].test.metrics) \
        if config.synthetic_vms and neural else []
    shipped = load_default_checkpoint() if "fused" in detectors else None
    per_series: dict[str, dict[str, dict[str, float]]] = {}
    pretrained: dict = {}
    for index, target in enumerate(targets):
        fold = _fold_of(index, config.folds) if config.folds > 0 else None
        per_series[target.name] = {}
        pretraining = _pretraining_data(targets, index, synthetic, config) if neural else None
        for detector in detectors:
            if detector in LABEL_FREE:
                scores, cost = _evaluate_label_free(detector, target, config, shipped)
            else:
                scores, cost = _evaluate_neural(detector, target, pretraining, config, progress,
                                                fold, pretrained)
            if target.interpretation is not None:
                # Detectors without per-metric contributions name no metric to blame.
                cost = {"hitrate_100": float("nan"), "hitrate_150": float("nan"), **cost}
            per_series[target.name][detector] = {**scores.to_dict(), **cost}
            if on_result is not None:
                on_result(target.name, detector, scores)
    mean = {}
    for detector in detectors:
        keys = sorted({k for s in per_series for k in per_series[s][detector]})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a key NaN on every series
            mean[detector] = {key: float(np.nanmean(
                [per_series[s][detector].get(key, np.nan) for s in per_series]))
                for key in keys}
    return {
        "protocol": {**asdict(config), "data": str(data_dir), "detectors": list(detectors)},
        "mean": mean,
        "series": per_series,
    }


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
