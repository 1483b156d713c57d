"""The third unsupervised per-VM score: how far the newest sample sits from the nearest of
the VM's usual states, metric by metric.

A VM's normal is often several normal states, not one: a batch VM idles and then
works flat out, a web VM has its night and its day. The per-metric deviation
(trainer/residual.py) measures from one centre, so a VM's busy state already counts
as half-way to an anomaly and a fault inside the idle state's range goes unseen; the
distance from the principal subspace assumes one linear normal. Here the VM's own
normalized history is summarized by `states` centres (k-means in the deviation's
units: each metric's offset from the VM's mean over its spread), and a sample's score
is its largest per-metric distance from the nearest centre: a metric `d` of its spreads
off the state the VM is in scores `d`, whichever state that is. A sample between two
states, or in no state the VM has been in, scores high.

The same arithmetic runs here (NumPy) and inside the exported ONNX graph
(trainer/export.py); a test holds them equal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from vmad.detectors import FittedModelDetector, register
from vmad.trainer.residual import SUBSPACE_MIN_METRICS, ResidualModel

__all__ = ["NORMAL_STATES", "STATES_MIN_METRICS", "NormalStates", "StatesDetector"]

# How many usual states a VM's history is summarized by (trainer.yaml
# `adaptation.normal_states`). Measured on SMD at 8, 16 and 32 (docs/detection.md):
# event F1 rose at every count; 16 was fixed first.
NORMAL_STATES = 16
# The fewest metrics the fused score's state distance is fitted on. On the agent's 4
# default metrics 16 states cover the space densely enough that a fault lands near a
# centre some rare excursion of the history earned: on 9 draws of 10 unseen synthetic
# VMs recall fell by up to 0.13 and one VM's false alarms rose to 2.7 %, while on SMD's
# 38 metrics event F1 rose on 10-11 of 12 machines (docs/detection.md). The subspace's
# boundary, not one measured for the states.
STATES_MIN_METRICS = SUBSPACE_MIN_METRICS
_KMEANS_ITERATIONS = 10
# k-means++ from one seed lands in a different local optimum per seed; the fit keeps the
# lowest-inertia of a few starts (as scikit-learn's `n_init`), so a VM's states depend
# less on the draw. On SMD one start's point F1 ranged 0.374-0.381 over three seeds
# (docs/detection.md, step 10).
_KMEANS_STARTS = 4
_SCORE_CHUNK = 4096  # samples per block when scoring: bounds the [chunk, P, M] array


@dataclass(frozen=True)
class NormalStates:
    mean: np.ndarray  # float64 [M], the deviation's
    spread: np.ndarray  # float64 [M], > 0, the deviation's
    centres: np.ndarray  # float64 [P, M], P >= 1, in spreads from `mean`

    @classmethod
    def fit(cls, values: np.ndarray, deviation: ResidualModel, states: int = NORMAL_STATES,
            seed: int = 0) -> NormalStates:
        """At most `states` usual states of normalized `values[N, M]`, in the units of
        `deviation` (the per-metric deviation fitted on the same values)."""
        if states < 1:
            raise ValueError(f"normal states must be >= 1 to fit, got {states}")
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) < 2:
            raise ValueError(f"need [samples >= 2, metrics] values, got {values.shape}")
        # Here, not at the top: the trainer's config imports this module, and `vmad
        # validate` checks a trainer.yaml on an agent's install, which has no scipy.
        from scipy.cluster.vq import kmeans2

        units = (values - deviation.mean) / deviation.spread
        rng = np.random.default_rng(seed)
        with warnings.catch_warnings():
            # An empty cluster keeps its seed point; it is dropped below.
            warnings.simplefilter("ignore")
            starts = [kmeans2(units, min(states, len(units)), iter=_KMEANS_ITERATIONS,
                              minit="++", seed=rng) for _ in range(_KMEANS_STARTS)]
        # The least inertia (squared distance of each sample from its centre); ties go to
        # the earlier start.
        centres, members = min(starts, key=lambda start: float(
            np.sum((units - start[0][start[1]]) ** 2)))
        used = np.bincount(members, minlength=len(centres)) > 0
        return cls(deviation.mean.copy(), deviation.spread.copy(), centres[used])

    @classmethod
    def fit_usual(cls, values: np.ndarray, deviation: ResidualModel,
                  states: int = NORMAL_STATES) -> NormalStates | None:
        """The states the fused score uses: `fit`, where the VM reports at least
        `STATES_MIN_METRICS` metrics and `states` > 0 (0 turns them off); else None."""
        if states < 0:
            raise ValueError(f"normal states must be >= 0, got {states}")
        if states == 0 or np.shape(values)[1] < STATES_MIN_METRICS:
            return None
        return cls.fit(values, deviation, states)

    def units(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.mean) / self.spread

    def score_samples(self, values: np.ndarray) -> np.ndarray:
        """The largest per-metric distance from the nearest state -> `[N]`."""
        return self.contributions(values).max(axis=1)

    def contributions(self, values: np.ndarray) -> np.ndarray:
        """Each metric's distance from the state nearest to the sample (nearest by the
        largest per-metric distance) -> `[N, M]`."""
        units = self.units(values)
        contributions = np.empty_like(units)
        for start in range(0, len(units), _SCORE_CHUNK):
            block = np.abs(units[start:start + _SCORE_CHUNK, None, :] - self.centres[None])
            nearest = block.max(axis=2).argmin(axis=1)
            contributions[start:start + _SCORE_CHUNK] = block[np.arange(len(block)), nearest]
        return contributions

    def describe(self) -> str:
        """For log lines: which score this is."""
        return f"largest per-metric distance from the nearest of {len(self.centres)} states"

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.tolist(), "spread": self.spread.tolist(),
                "centres": self.centres.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> NormalStates:
        mean = np.asarray(data["mean"], dtype=np.float64)
        spread = np.asarray(data["spread"], dtype=np.float64)
        centres = np.asarray(data["centres"], dtype=np.float64)
        if mean.ndim != 1 or spread.shape != mean.shape or \
                not np.all(np.isfinite(spread)) or np.any(spread <= 0):
            raise ValueError("normal states' spread must be finite, positive, one per metric")
        if centres.ndim != 2 or centres.shape[1] != len(mean) or len(centres) < 1 or \
                not np.all(np.isfinite(centres)):
            raise ValueError(f"normal states' centres must be [states >= 1, {len(mean)}] "
                             f"finite values, got shape {centres.shape}")
        return cls(mean, spread, centres)


class StatesDetector(FittedModelDetector):
    """`NormalStates` behind the `vmad.detectors.Detector` interface, in the units of the
    per-metric deviation fitted on the same samples (as the trainer fits both)."""

    def __init__(self, states: int = NORMAL_STATES, spread_floor: float = 1.0) -> None:
        self.states = states
        self.spread_floor = spread_floor
        self.model: NormalStates | None = None

    def fit(self, train: np.ndarray) -> StatesDetector:
        deviation = ResidualModel.fit(train, components=0, spread_floor=self.spread_floor)
        self.model = NormalStates.fit(train, deviation, max(self.states, 1))
        return self


register("states", StatesDetector)
