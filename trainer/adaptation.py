"""Label-free adaptation of a detector to one VM: its own normalizer, its own unsupervised
per-metric score, the fusion of that score with the Zoom-CNN's, and a threshold set to a
target false-alarm rate on its own windows. Nothing here needs a label.

`fit_adaptation` takes a VM's raw samples (its first hours, or its recent normal
history on a refresh) and the network it runs, and returns a `VMAdaptation`; the
exported bundle (trainer/export.py) computes, inside one ONNX graph:

    z = w * (logit - cnn_center) / cnn_scale
        + (1 - w) * [(1 - s - t) * (log1p(deviation) - dev_center) / dev_scale
                     + s * (log1p(distance) - sub_center) / sub_scale
                     + t * (log1p(state) - state_center) / state_scale]
    score = sigmoid(z - offset)

where `deviation` is the largest per-metric contribution of the window's newest sample,
`distance` the newest sample's distance from the VM's principal subspace
(trainer/residual.py) and `state` its largest per-metric distance from the nearest of
the VM's usual states (trainer/states.py), and the centres and scales are the median
and robust spread of each part on the VM's own windows, so every part speaks in "how
unusual for this VM". The unsupervised parts present share equally (s = t = 1/3; with
one of the last two, 1/2): one metric far off, many metrics a little off together and
a state the VM is never in are all anomalies, no label says which to trust more, and
the mean of standardized detectors is the plainest ensemble (measured on SMD,
docs/detection.md). The last two are fitted only on wide metric sets (16 metrics or
more); on the agent's 4 default metrics, or with `subspace_variance` 0 (s = 0) and
`normal_states` 0 (t = 0), the deviation stands alone.
`offset` is the threshold on z, placed by a peaks-over-threshold fit of z on the VM's
own windows (vmad.evaluation.tail_threshold) so that `target false-alarm rate` of
normal windows exceed it, and never below two floors: the z of a window whose network
part is at its median and one of whose metrics is `min_deviation` spreads off (the
deviation, the distance and the state distance all at `min_deviation`), and
the z of a window whose deviation is at its median and whose network logit is at the
network's own calibrated threshold (`network_threshold`, the checkpoint's threshold,
calibrated on unseen VMs). The second floor is why the network part cannot raise alarms
on a VM whose first hour was quieter than its later normal: a quiet warm-up puts the
tail of the logit low, and on 10 unseen synthetic VMs that tail alone flagged 1.6 % of
later normal windows (bench/normalization.py). The score is 0.5 exactly at the offset,
and the bundle's threshold is 0.5. Centring on the threshold keeps float32 scores
away from saturation where it matters. Last, z is rescaled so that the VM's median
window scores `USUAL_SCORE` (`in_threshold_units`): z - offset then counts heights of
the threshold above the VM's usual level, the same scale on every VM and every refit.
Verdicts do not change; scores become comparable, where they were in units of each
fit's spread, and a fit whose threshold a floor raised far above its usual level
(measured on SMD) ranked its anomalies below the normal windows of the fits around it.
With w = 1, centre 0, scale 1 and offset 0 the score is the network's probability:
that is the pooled warm-up bundle, which keeps its shipped threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from torch import nn

from vmad.evaluation import tail_threshold
from vmad.state import age_text
from vmad.trainer.attribution import AttributionModel
from vmad.trainer.injection import InjectedSet
from vmad.trainer.residual import ResidualModel
from vmad.trainer.states import NormalStates
from vmad.windows import Normalizer, make_windows

__all__ = ["USUAL_SCORE", "Fusion", "VMAdaptation", "alarm_covered",
           "best_ranking", "choose_cnn_weight", "confirmed_weight", "fit_adaptation",
           "fit_fusion", "in_threshold_units", "offset_floor", "outside_alarms", "refit_values",
           "robust_location", "threshold_units"]

# Spread floor of each fused part in its own units: a part that hardly varies on the
# VM's own windows must not be blown up into the dominant one. The deviation's is
# larger: a quiet warm-up says little about how far an ordinary day strays (log1p units).
_PART_SCALE_FLOOR = 0.05
_DEVIATION_SCALE_FLOOR = 0.5


@dataclass(frozen=True)
class Fusion:
    cnn_center: float = 0.0
    cnn_scale: float = 1.0
    dev_center: float = 0.0
    dev_scale: float = 1.0
    cnn_weight: float = 1.0
    offset: float = 0.0
    # The distance from the principal subspace: its share of the unsupervised part
    # (0: none) and its median and spread on the VM's windows.
    sub_share: float = 0.0
    sub_center: float = 0.0
    sub_scale: float = 1.0
    # The distance from the nearest usual state, likewise.
    state_share: float = 0.0
    state_center: float = 0.0
    state_scale: float = 1.0

    def z(self, logits: np.ndarray, deviation: np.ndarray,
          distance: np.ndarray | None = None, state: np.ndarray | None = None,
          ) -> np.ndarray:
        """`distance` is needed when `sub_share` > 0, `state` when `state_share` > 0."""
        w = self.cnn_weight
        cnn = (np.asarray(logits, np.float64) - self.cnn_center) / self.cnn_scale
        unsupervised = (1.0 - self.sub_share - self.state_share) * \
            (np.log1p(np.asarray(deviation, np.float64)) - self.dev_center) / self.dev_scale
        for name, share, values, center, scale in (
                ("the distance from the subspace", self.sub_share, distance,
                 self.sub_center, self.sub_scale),
                ("the distance from the nearest state", self.state_share, state,
                 self.state_center, self.state_scale)):
            if share > 0.0:
                if values is None:
                    raise ValueError(f"this fusion needs {name}")
                unsupervised = unsupervised + share * (
                    np.log1p(np.asarray(values, np.float64)) - center) / scale
        return w * cnn + (1.0 - w) * unsupervised

    def score(self, logits: np.ndarray, deviation: np.ndarray,
              distance: np.ndarray | None = None,
              state: np.ndarray | None = None) -> np.ndarray:
        z = self.z(logits, deviation, distance, state) - self.offset
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict) -> Fusion:
        # A key saved before it existed takes its default (no share).
        defaults = cls()
        fusion = cls(**{k: float(data.get(k, getattr(defaults, k)))
                        for k in cls.__dataclass_fields__})
        if not (fusion.cnn_scale > 0 and fusion.dev_scale > 0 and fusion.sub_scale > 0
                and fusion.state_scale > 0 and 0 <= fusion.cnn_weight <= 1
                and fusion.sub_share >= 0 and fusion.state_share >= 0
                and fusion.sub_share + fusion.state_share <= 1):
            raise ValueError(f"invalid fusion parameters {data}")
        return fusion


# What the fused score of a VM's median window reads, on every VM and after every refit.
USUAL_SCORE = 0.05


def threshold_units(fitted_z: np.ndarray, threshold: float) -> float:
    """The factor that puts `z - threshold` in the units of the score's logit: heights of
    `threshold` above the median of `fitted_z` (the VM's usual level), the median at
    logit(`USUAL_SCORE`)."""
    height = max(float(threshold) - float(np.median(fitted_z)), 1e-6)
    return math.log((1.0 - USUAL_SCORE) / USUAL_SCORE) / height


def in_threshold_units(fusion: Fusion, fitted_z: np.ndarray) -> Fusion:
    """`fusion` (with its `offset`) rescaled by `threshold_units`: the same verdicts, and
    the median of `fitted_z` (its z on the windows it was fitted on) scores
    `USUAL_SCORE`. Folded into the scales, so the bundle's graph is unchanged."""
    factor = threshold_units(fitted_z, fusion.offset)
    return replace(fusion, cnn_scale=fusion.cnn_scale / factor,
                   dev_scale=fusion.dev_scale / factor, sub_scale=fusion.sub_scale / factor,
                   state_scale=fusion.state_scale / factor, offset=fusion.offset * factor)


def robust_location(values: np.ndarray, floor: float = _PART_SCALE_FLOOR) -> tuple[float, float]:
    """Median and IQR / 1.349 (at least `floor`) of `values`."""
    values = np.asarray(values, np.float64)
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q50), float(max((q75 - q25) / 1.349, floor))


def fit_fusion(logits: np.ndarray, deviation: np.ndarray, cnn_weight: float,
               distance: np.ndarray | None = None,
               state: np.ndarray | None = None) -> Fusion:
    """Standardize every part on the VM's own (mostly normal) windows; the unsupervised
    part is the mean of the deviation and those of `distance` (from the principal
    subspace) and `state` (from the nearest usual state) that are given."""
    cc, cs = robust_location(logits)
    dc, ds = robust_location(np.log1p(np.asarray(deviation, np.float64)),
                             _DEVIATION_SCALE_FLOOR)
    fusion = Fusion(cc, cs, dc, ds, float(cnn_weight))
    share = 1.0 / (1 + (distance is not None) + (state is not None))
    if distance is not None:
        sc, ss = robust_location(np.log1p(np.asarray(distance, np.float64)),
                                 _DEVIATION_SCALE_FLOOR)
        fusion = replace(fusion, sub_share=share, sub_center=sc, sub_scale=ss)
    if state is not None:
        tc, ts = robust_location(np.log1p(np.asarray(state, np.float64)),
                                 _DEVIATION_SCALE_FLOOR)
        fusion = replace(fusion, state_share=share, state_center=tc, state_scale=ts)
    return fusion


@dataclass(frozen=True)
class VMAdaptation:
    """What makes the shared network this VM's detector, fitted without labels."""

    normalizer: Normalizer
    residual: ResidualModel
    fusion: Fusion
    threshold: float
    samples_fitted: int  # samples the fit used
    received_at_fit: int  # the VM's received-sample counter when it was fitted
    fitted_at: float
    generation: int = 1
    # Scores on the VM's own history with synthetic faults injected (trainer/injection.py):
    # the quality estimate the trainer reports without any label.
    quality: dict[str, float] = field(default_factory=dict)
    # Per-metric scale of the contributions that name the metric to blame
    # (trainer/attribution.py). None: saved before it existed; the export then uses the
    # floor for every metric.
    attribution: AttributionModel | None = None
    # The principal subspace whose distance shares the unsupervised part (`fusion.
    # sub_share`); None: no such part.
    subspace: ResidualModel | None = None
    # The usual states whose distance shares it (`fusion.state_share`); None: no such part.
    states: NormalStates | None = None
    # The network weight this fit's injected faults preferred (`choose_cnn_weight`); the
    # next fit uses no more than it (`fit_adaptation`'s `preferred_before`). None: no
    # choice was made (or saved before it was kept).
    preferred_cnn_weight: float | None = None
    # How far windows labelled normal raised the threshold (`obeyed_threshold`): its
    # height above the VM's usual level over the false-alarm target's; 1: not at all.
    label_raise: float = 1.0
    # The store's newest label id when this fit read the VM's history: a label of
    # normal with a higher id has not been fitted (a trainer stopped before its label
    # refit ran). None: saved before it was kept.
    labels_seen: int | None = None

    def score(self, logits: np.ndarray, newest: np.ndarray) -> np.ndarray:
        """The fused score (what the bundle's graph computes) of windows whose network
        logits are `logits[N]` and whose newest normalized samples are `newest[N, M]`."""
        distance = None if self.subspace is None else self.subspace.score_samples(newest)
        state = None if self.states is None else self.states.score_samples(newest)
        return self.fusion.score(logits, self.residual.score_samples(newest), distance,
                                 state)

    def describe(self) -> str:
        """For log lines: what the unsupervised part measures."""
        parts = [part.describe() for part in (self.residual, self.subspace, self.states)
                 if part is not None]
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]

    def summary(self, now: float) -> str:
        """For `vmad status`: which fit runs and how old it is (at `now`), how well it
        catches faults injected into the VM's own history, and whether labels of normal
        raised its threshold."""
        parts = [f"fit {self.generation}, {age_text(now - self.fitted_at)} ago, on "
                 f"{self.samples_fitted} samples"]
        if "recall" in self.quality and "false_alarm_rate" in self.quality:
            parts.append(f"injected faults: recall {self.quality['recall']:.2f}, "
                         f"false alarms {100 * self.quality['false_alarm_rate']:.1f} %")
        if self.label_raise > 1.0:
            parts.append(f"labels raise threshold x{self.label_raise:.1f}")
        return "; ".join(parts)

    def to_json(self) -> str:
        data = {
            "normalization": self.normalizer.to_dict(), "residual": self.residual.to_dict(),
            "fusion": self.fusion.to_dict(), "threshold": self.threshold,
            "samples_fitted": self.samples_fitted, "received_at_fit": self.received_at_fit,
            "fitted_at": self.fitted_at, "generation": self.generation,
            "quality": self.quality}
        if self.attribution is not None:
            data["attribution"] = self.attribution.to_dict()
        if self.subspace is not None:
            data["subspace"] = self.subspace.to_dict()
        if self.states is not None:
            data["states"] = self.states.to_dict()
        if self.preferred_cnn_weight is not None:
            data["preferred_cnn_weight"] = self.preferred_cnn_weight
        if self.label_raise != 1.0:
            data["label_raise"] = self.label_raise
        if self.labels_seen is not None:
            data["labels_seen"] = self.labels_seen
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> VMAdaptation:
        data = json.loads(text)
        threshold = float(data["threshold"])
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"adaptation threshold must lie in [0, 1], got {threshold}")
        fusion = Fusion.from_dict(data["fusion"])
        subspace = ResidualModel.from_dict(data["subspace"]) if data.get("subspace") else None
        if (subspace is None) != (fusion.sub_share == 0.0):
            raise ValueError("adaptation's fusion and subspace disagree: a subspace share "
                             "needs a subspace and a subspace needs a share")
        states = NormalStates.from_dict(data["states"]) if data.get("states") else None
        if (states is None) != (fusion.state_share == 0.0):
            raise ValueError("adaptation's fusion and states disagree: a state share "
                             "needs states and states need a share")
        residual = ResidualModel.from_dict(data["residual"])
        if states is not None and len(states.mean) != len(residual.mean):
            raise ValueError("adaptation's states and residual have different metric counts")
        preferred = data.get("preferred_cnn_weight")
        if preferred is not None:
            preferred = float(preferred)
            if not 0.0 <= preferred <= 1.0:
                raise ValueError(f"adaptation's preferred network weight must lie in [0, 1], "
                                 f"got {preferred}")
        label_raise = float(data.get("label_raise", 1.0))
        if not (math.isfinite(label_raise) and label_raise >= 1.0):
            raise ValueError(f"adaptation's label_raise must be a number >= 1, "
                             f"got {label_raise}")
        labels_seen = data.get("labels_seen")
        if labels_seen is not None and (not isinstance(labels_seen, int) or labels_seen < 0):
            raise ValueError(f"adaptation's labels_seen must be an integer >= 0, "
                             f"got {labels_seen!r}")
        return cls(Normalizer.from_dict(data["normalization"]), residual, fusion,
                   threshold, int(data["samples_fitted"]), int(data["received_at_fit"]),
                   float(data["fitted_at"]), int(data["generation"]),
                   {k: float(v) for k, v in (data.get("quality") or {}).items()},
                   AttributionModel.from_dict(data["attribution"]) if data.get("attribution")
                   else None, subspace, states, preferred, label_raise, labels_seen)


# How far above the highest labelled window it keeps below `obeyed_threshold` puts the
# threshold, as a share of that window's height above the usual level: clear of float32
# rounding in the agent's graph.
_OBEYED_MARGIN = 1e-3


def obeyed_threshold(threshold: float, scores: np.ndarray, labelled_normal: np.ndarray
                     | None, false_alarm_rate: float) -> float:
    """`threshold` raised, where needed, so that no more than `false_alarm_rate` of the
    windows an operator labelled normal reach it: `scores` are a fit's scores on its
    own windows, `labelled_normal` (aligned with them) marks those that end on a sample
    labelled normal. The false-alarm target then holds on what the operator called
    normal, not only on the whole history, where a refit counts a short label as a few
    samples among hours of the VM's usual level (measured on Bitbrains,
    docs/detection.md). Under 1 / `false_alarm_rate` labelled windows (200 at 0.5 %:
    a label of a false alarm) none may reach it, so that label is obeyed; a long
    stretch labelled normal keeps the target's share."""
    if labelled_normal is None or not np.any(labelled_normal):
        return threshold
    labelled = np.sort(np.asarray(scores)[np.asarray(labelled_normal, bool)])[::-1]
    top = float(labelled[int(false_alarm_rate * len(labelled))])
    if top < threshold:
        return threshold
    usual = float(np.median(scores))
    return top + _OBEYED_MARGIN * max(top - usual, 1e-6)


def offset_floor(fusion: Fusion, min_deviation: float = 0.0,
                 network_threshold: float | None = None) -> float:
    """The least offset (threshold on z) the fused score may have: neither the
    unsupervised part nor the network, with the other at its usual level, may raise an
    alarm below its own floor (the deviation and the distances from the subspace and the
    nearest state all below `min_deviation` spreads, the network below its calibrated
    `network_threshold`, a probability). -inf when neither floor applies."""
    floor = -math.inf
    if min_deviation > 0:
        off = np.array([min_deviation])
        floor = float(fusion.z(np.array([fusion.cnn_center]), off, off, off)[0])
    if network_threshold is not None and fusion.cnn_weight > 0.0:
        p = min(max(float(network_threshold), 1e-6), 1 - 1e-6)
        # Every unsupervised part at its median.
        usual = (np.array([math.expm1(fusion.dev_center)]),
                 np.array([math.expm1(fusion.sub_center)]),
                 np.array([math.expm1(fusion.state_center)]))
        floor = max(floor, float(fusion.z(np.array([math.log(p / (1 - p))]), *usual)[0]))
    return floor


def best_ranking(scores: Sequence[np.ndarray], labels: np.ndarray) -> int:
    """Index of the score in `scores` (each `[N]`) that ranks `labels[N]` best: AUC to 3
    decimals, which needs no threshold (what transfers worst); ties go to the earlier
    score, so list the simpler choice first. -1 when the labels hold one class."""
    from vmad.evaluation import roc_auc

    labels = np.asarray(labels)
    if not len(scores) or labels.all() or not labels.any():
        return -1
    aucs = [round(roc_auc(labels, score), 3) for score in scores]
    return int(max(range(len(aucs)), key=lambda i: (aucs[i], -i)))


def choose_cnn_weight(fusion: Fusion, logits: np.ndarray, deviation: np.ndarray,
                      labels: np.ndarray, weights: Sequence[float],
                      distance: np.ndarray | None = None,
                      state: np.ndarray | None = None) -> float:
    """The network weight of `weights` whose fused score ranks `labels` best
    (`best_ranking`); ties go to the lower network weight, so a network that adds
    nothing is left out. The labels are faults injected into the VM's own history, or
    real ones where there are. Keeps `fusion.cnn_weight` when the labels hold one class
    or no weight is offered."""
    ordered = sorted(weights)
    best = best_ranking([replace(fusion, cnn_weight=w).z(logits, deviation, distance, state)
                         for w in ordered], labels)
    return fusion.cnn_weight if best < 0 else float(ordered[best])


def confirmed_weight(preferred: float, preferred_before: float | None) -> float:
    """The network weight a fit uses: the lower of the one it `preferred` and the one the
    previous fit preferred (its own on a first fit, `preferred_before` None)."""
    return preferred if preferred_before is None else min(preferred, preferred_before)


def outside_alarms(values: np.ndarray, timestamps: np.ndarray, alarm_times: np.ndarray,
                   span: float, window: int, keep: np.ndarray | None = None,
                   normal: np.ndarray | None = None) -> np.ndarray:
    """What a refit learns normal from: the rows of `values` (taken at `timestamps`)
    outside every window an alarm covered (`alarm_covered`) and where `keep` allows (no
    anomalous label); all of them when fewer than `window` + 16 remain. Rows an operator
    labelled `normal` are kept even where an alarm covered them: a false alarm, once
    labelled, is learnt as normal at the next refit instead of being left out (and
    alarming again)."""
    covered = alarm_covered(timestamps, alarm_times, span, normal)
    return refit_values(values, ~covered if keep is None else np.asarray(keep, bool) & ~covered,
                        window)


def alarm_covered(timestamps: np.ndarray, alarm_times: np.ndarray, span: float,
                  normal: np.ndarray | None = None) -> np.ndarray:
    """Which `timestamps` an alarm covered (an alarm at time t covers (t - span, t]: the
    whole window, not only its newest sample), less those labelled `normal`."""
    timestamps = np.asarray(timestamps, dtype=float)
    ends = np.sort(np.asarray(alarm_times, dtype=float))
    # A sample is covered when the first alarm at or after it ends within `span` of it:
    # one binary search per sample instead of one pass per alarm.
    first_end = np.searchsorted(ends, timestamps, side="left")
    ends_after = np.append(ends, np.inf)[first_end]
    covered = ends_after < timestamps + span
    if normal is not None:
        covered &= ~np.asarray(normal, bool)
    return covered


def refit_values(values: np.ndarray, kept: np.ndarray, window: int) -> np.ndarray:
    """`values[kept]`, or all of `values` when fewer than `window` + 16 are kept: too
    few to fit on, so a refit learns what its alarms covered."""
    return values[kept] if kept.sum() >= window + 16 else values


def fit_adaptation(
    model: nn.Module, raw: np.ndarray, window: int, *,
    floors: float | Sequence[float] = 0.0, components: int = 0, cnn_weight: float = 0.5,
    false_alarm_rate: float = 0.005, min_deviation: float = 0.0,
    network_threshold: float | None = None, received: int = 0, now: float = 0.0,
    generation: int = 1,
    normalizer: Normalizer | None = None,
    injected: InjectedSet | None = None, cnn_weights: Sequence[float] = (),
    subspace_variance: float = 0.0, normal_states: int = 0,
    preferred_before: float | None = None, labelled_normal: np.ndarray | None = None,
) -> VMAdaptation:
    """Fit a VM's adaptation on its raw samples `raw[N, M]` (N >= window + 1).

    The fused score's 0.5 sits where `false_alarm_rate` of the VM's own windows (taken as
    normal: no label is used) are expected above it; the threshold is 0.5. `normalizer` keeps given
    statistics (the network was just fine-tuned on them) instead of fitting new ones.
    `min_deviation` and `network_threshold` (a probability: the network's own calibrated
    threshold) are the floors of the offset described in the module docstring.
    With `injected` (raw windows of the VM's history with faults injected,
    trainer/injection.py) the network's weight is the one of `cnn_weights` that ranks
    those faults best (`choose_cnn_weight`), else `cnn_weight`; but no more than
    `preferred_before`, the weight the VM's previous fit preferred: the network's share
    grows only when two fits in a row want it, and shrinks as soon as one does not.
    (Injected faults rank the weights apart by a few thousandths of AUC; a preference
    that flips from one refit to the next is noise, and each flip changes what the
    score measures.)
    The unsupervised part is the mean (`fit_fusion`) of the per-metric deviation and,
    with `subspace_variance` > 0 (and a wide metric set), the distance from the
    principal subspace explaining that share of the VM's variance, and with
    `normal_states` > 0 (and a wide metric set) the distance from the nearest of that
    many usual states (trainer/states.py). The defaults here leave both out; the
    trainer passes its settings.
    `labelled_normal[N]` marks the samples of `raw` an operator labelled normal: the
    threshold is raised, where needed, so that the false-alarm target holds on the
    windows ending on one too (`obeyed_threshold`).
    """
    from vmad.trainer.training import predict_logits

    raw = np.asarray(raw, np.float64)
    if len(raw) < window + 1:
        raise ValueError(f"need at least {window + 1} samples to adapt, got {len(raw)}")
    if labelled_normal is not None and len(labelled_normal) != len(raw):
        raise ValueError(f"labelled_normal has {len(labelled_normal)} rows for "
                         f"{len(raw)} samples")
    if normalizer is None:
        normalizer = Normalizer.fit(raw, floor=floors)
    normalized = normalizer.apply(raw)
    logits = predict_logits(model, np.ascontiguousarray(make_windows(normalized, window)))
    # Spread floor in normalized units: the normalizer's floor already bounds the scale,
    # so one normalized unit is the least spread a metric may claim.
    residual = ResidualModel.fit(normalized, components=components, spread_floor=1.0)
    subspace = ResidualModel.fit_normal_subspace(normalized, subspace_variance)
    states = NormalStates.fit_usual(normalized, residual, normal_states)
    newest = normalized[window - 1:]
    deviation = residual.score_samples(newest)
    distance = None if subspace is None else subspace.score_samples(newest)
    state = None if states is None else states.score_samples(newest)
    fusion = fit_fusion(logits, deviation, cnn_weight, distance, state)
    preferred = None
    if injected is not None and len(cnn_weights):
        windows = normalizer.apply_windows(injected.windows)
        last = windows[:, :, -1]
        preferred = choose_cnn_weight(
            fusion, predict_logits(model, windows), residual.score_samples(last),
            injected.labels, cnn_weights,
            None if subspace is None else subspace.score_samples(last),
            None if states is None else states.score_samples(last))
        fusion = replace(fusion, cnn_weight=confirmed_weight(preferred, preferred_before))
    fitted_z = fusion.z(logits, deviation, distance, state)
    target = max(tail_threshold(fitted_z, false_alarm_rate),
                 offset_floor(fusion, min_deviation, network_threshold))
    offset = obeyed_threshold(target, fitted_z, None if labelled_normal is None
                              else np.asarray(labelled_normal, bool)[window - 1:],
                              false_alarm_rate)
    usual = float(np.median(fitted_z))
    raise_ = (offset - usual) / max(target - usual, 1e-6) if offset > target else 1.0
    fusion = in_threshold_units(replace(fusion, offset=offset), fitted_z)
    attribution = AttributionModel.fit(normalized, window)
    return VMAdaptation(normalizer, residual, fusion, 0.5, len(raw),
                        received, now, generation, attribution=attribution,
                        subspace=subspace, states=states, preferred_cnn_weight=preferred,
                        label_raise=max(raise_, 1.0))
