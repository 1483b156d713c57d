"""PCA reconstruction error: the unsupervised baseline of the detection benchmark.

Fitted on a series' (unlabelled, mostly normal) train part; a sample's score is the
squared distance between it and its projection on the principal subspace that explains
`variance` of the training variance. Scores are not probabilities: thresholds are picked
on labelled data like every other detector's.
"""

from __future__ import annotations

import numpy as np

from vmad.detectors import register
from vmad.trainer.residual import explained_components

__all__ = ["PCADetector"]


class PCADetector:
    def __init__(self, variance: float = 0.9) -> None:
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must lie in (0, 1], got {variance}")
        self.variance = variance
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def fit(self, values: np.ndarray) -> PCADetector:
        """Fit on normalized `values[N, M]`."""
        values = np.asarray(values, dtype=np.float64)
        self.mean = values.mean(axis=0)
        _, singular, vt = np.linalg.svd(values - self.mean, full_matrices=False)
        self.components = vt[: explained_components(singular, self.variance)]
        return self

    def contributions(self, values: np.ndarray) -> np.ndarray:
        """Squared reconstruction error per sample and metric `[N, M]`."""
        if self.mean is None or self.components is None:
            raise RuntimeError("PCADetector used before fit")
        centred = np.asarray(values, dtype=np.float64) - self.mean
        residual = centred - (centred @ self.components.T) @ self.components
        return residual**2

    def score_samples(self, values: np.ndarray) -> np.ndarray:
        """Squared reconstruction error per sample of normalized `values[N, M]`."""
        return self.contributions(values).sum(axis=1)

    score = score_samples


register("pca", PCADetector)
