"""The unsupervised per-VM score: how far the newest sample sits from the VM's own normal,
metric by metric.

Fitted on a VM's own (normalized, unlabelled, mostly normal) history: the principal
subspace of its normal samples (`components` directions) and, per metric, the spread
of the residual outside that subspace on the fitting data. A sample's contribution of
metric m is |residual_m| / spread_m: how many of its usual residual widths metric m
is off what the other metrics predict for it. The score is the largest contribution
(`norm="max"`: one metric far off), or their Euclidean norm (`norm="l2"`: the distance
from the subspace, which also counts many metrics a little off together, as PCA's
reconstruction error does). Spreads have a floor (`spread_floor`, in normalized
units), so a metric that never moved while fitting cannot turn a tiny wobble into a
huge contribution.

The same arithmetic runs in three places: here (NumPy, for the benchmarks and the
trainer's own calibration), inside the exported ONNX graph (trainer/export.py) and
nowhere else; a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmad.detectors import FittedModelDetector, register

__all__ = ["NORMS", "SUBSPACE_MIN_METRICS", "SUBSPACE_VARIANCE", "ResidualDetector",
           "ResidualModel", "components_for_variance", "explained_components"]

NORMS = ("max", "l2")
# The share of variance the subspace keeps whose distance joins the fused score
# (trainer.yaml `adaptation.subspace_variance`): the PCA baseline's usual 90 %.
SUBSPACE_VARIANCE = 0.9
# The fewest metrics the distance from a subspace is fitted on. On the agent's 4 default
# metrics 90 % of the variance takes 1-3 directions, the distance of a one-metric fault
# from the subspace is a fraction of its deviation, and averaged in it cost recall (or,
# with a lower floor, false alarms) on the unseen synthetic VMs. On random subsets of
# SMD's metrics it cost point F1 at 4, 8 and 12 metrics and gained at 19 and 38
# (docs/detection.md); nothing was measured between 12 and 19.
SUBSPACE_MIN_METRICS = 16


def explained_components(singular: np.ndarray, variance: float) -> int:
    """How many of the principal directions with singular values `singular` (largest
    first) explain `variance` (0 < v <= 1) of the variance."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must lie in (0, 1], got {variance}")
    explained = np.cumsum(singular**2) / max(float(np.sum(singular**2)), 1e-12)
    return min(int(np.searchsorted(explained, variance) + 1), len(singular))


def components_for_variance(values: np.ndarray, variance: float) -> int:
    """How many principal components of `values[N, M]` explain `variance` of their
    variance."""
    values = np.asarray(values, dtype=np.float64)
    return explained_components(
        np.linalg.svd(values - values.mean(axis=0), compute_uv=False), variance)


@dataclass(frozen=True)
class ResidualModel:
    mean: np.ndarray  # float64 [M]
    components: np.ndarray  # float64 [K, M], orthonormal rows (K may be 0)
    spread: np.ndarray  # float64 [M], > 0
    norm: str = "max"  # how contributions make the score: one of NORMS

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"residual norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    @classmethod
    def fit(cls, values: np.ndarray, components: int = 10,
            spread_floor: float = 0.25, norm: str = "max") -> ResidualModel:
        """Fit on normalized `values[N, M]`; `components` is capped below M so some
        residual always remains."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) < 2:
            raise ValueError(f"need [samples >= 2, metrics] values, got {values.shape}")
        mean = values.mean(axis=0)
        keep = max(0, min(components, values.shape[1] - 1, len(values) - 1))
        if keep:
            _, _, vt = np.linalg.svd(values - mean, full_matrices=False)
            basis = vt[:keep]
        else:
            basis = np.zeros((0, values.shape[1]))
        model = cls(mean, basis, np.ones(values.shape[1]), norm)
        residual = model.residuals(values)
        spread = np.maximum(np.sqrt(np.mean(residual**2, axis=0)), spread_floor)
        return cls(mean, basis, spread, norm)

    @classmethod
    def fit_normal_subspace(cls, values: np.ndarray,
                            variance: float = SUBSPACE_VARIANCE) -> ResidualModel | None:
        """The distance from the principal subspace that explains `variance` of
        normalized `values[N, M]`, where a low-dimensional normal has room to show: at
        least `SUBSPACE_MIN_METRICS` metrics, the subspace spanning at most half of them.
        Else None, and the per-metric deviation stands alone. None also for `variance`
        0."""
        values = np.asarray(values, dtype=np.float64)
        if variance <= 0 or values.shape[1] < SUBSPACE_MIN_METRICS:
            return None
        components = components_for_variance(values, variance)
        if components > values.shape[1] // 2:
            return None
        return cls.fit(values, components, 1.0, norm="l2")

    @classmethod
    def identity(cls, n_metrics: int) -> ResidualModel:
        """No subspace, unit spread: contributions are the normalized values' magnitudes."""
        return cls(np.zeros(n_metrics), np.zeros((0, n_metrics)), np.ones(n_metrics))

    def residuals(self, values: np.ndarray) -> np.ndarray:
        centred = np.asarray(values, dtype=np.float64) - self.mean
        return centred - (centred @ self.components.T) @ self.components

    def contributions(self, values: np.ndarray) -> np.ndarray:
        """|residual| / spread per metric of normalized `values[N, M]` -> `[N, M]`."""
        return np.abs(self.residuals(values)) / self.spread

    def score_samples(self, values: np.ndarray) -> np.ndarray:
        """The largest contribution per sample (or their norm, `norm="l2"`) -> `[N]`."""
        contributions = self.contributions(values)
        if self.norm == "l2":
            return np.sqrt(np.sum(contributions**2, axis=1))
        return contributions.max(axis=1)

    def describe(self) -> str:
        """For log lines: which score this is."""
        if self.norm == "l2":
            return f"distance from a {len(self.components)}-component subspace"
        if len(self.components):
            return f"largest metric residual off {len(self.components)} components"
        return "largest per-metric deviation"

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "spread": self.spread.tolist(), "norm": self.norm}

    @classmethod
    def from_dict(cls, data: dict) -> ResidualModel:
        mean = np.asarray(data["mean"], dtype=np.float64)
        components = np.asarray(data["components"], dtype=np.float64).reshape(-1, len(mean))
        spread = np.asarray(data["spread"], dtype=np.float64)
        if spread.shape != mean.shape or not np.all(np.isfinite(spread)) or np.any(spread <= 0):
            raise ValueError("residual spread must be finite, positive, one per metric")
        # Saved before the norm existed: the largest contribution.
        return cls(mean, components, spread, str(data.get("norm", "max")))


class ResidualDetector(FittedModelDetector):
    """`ResidualModel` behind the `vmad.detectors.Detector` interface."""

    def __init__(self, components: int = 0, spread_floor: float = 1.0, norm: str = "max",
                 variance: float | None = None) -> None:
        """`variance`, when given, sets the components to those explaining that share."""
        self.components = components
        self.spread_floor = spread_floor
        self.norm = norm
        self.variance = variance
        self.model: ResidualModel | None = None

    def fit(self, train: np.ndarray) -> ResidualDetector:
        components = self.components if self.variance is None \
            else components_for_variance(train, self.variance)
        self.model = ResidualModel.fit(train, components, self.spread_floor, self.norm)
        return self


register("residual", ResidualDetector)
register("subspace", lambda **options: ResidualDetector(
    **{"norm": "l2", "variance": SUBSPACE_VARIANCE, **options}))
