"""The one interface every sample-scoring detector offers, and the registry of them by name.

Like scikit-learn's `fit` / `score_samples`: `fit(train)` on normalized, unlabelled,
mostly normal samples `[N, M]`, then `score_samples(values)` gives one score per sample
(larger = more anomalous). Detectors that can say which metric is to blame also offer
`contributions(values)` `[N, M]`. Components register their detectors here
(`register`); benches and CLIs create them by name (`create`) instead of branching on
strings. The planner's streaming detectors (LA, DLA, WHA, its anomaly likelihood) are
univariate: `fit` streams the history through them, `score_samples` goes on streaming.
Windowed networks are built by `vmad.trainer.models.MODEL_BUILDERS` and scored through
bundles. NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Detector", "FittedModelDetector", "create", "names", "register"]


@runtime_checkable
class Detector(Protocol):
    def fit(self, train: np.ndarray) -> Detector: ...

    def score_samples(self, values: np.ndarray) -> np.ndarray: ...


class FittedModelDetector:
    """A detector whose `fit` builds one model (`self.model`) that scores and blames
    samples itself: scoring before `fit` is refused by name instead of failing on None."""

    model: Any = None

    def _fitted(self) -> Any:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} used before fit")
        return self.model

    def score_samples(self, values: np.ndarray) -> np.ndarray:
        return self._fitted().score_samples(values)

    def contributions(self, values: np.ndarray) -> np.ndarray:
        return self._fitted().contributions(values)


_REGISTRY: dict[str, Callable[..., Detector]] = {}


def register(name: str, factory: Callable[..., Detector]) -> None:
    """Make `factory(**options)` available as `name` (a second registration replaces the
    first)."""
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def create(name: str, **options: object) -> Detector:
    """A fresh, unfitted detector registered as `name`, built with `options` (its
    settings, e.g. a config section's values)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(_REGISTRY)}")
    return factory(**options)
