"""Window pools, metric alignment and the PCA baseline."""

from __future__ import annotations

import numpy as np
import pytest

from vmad.series import Series
from vmad.trainer.datasets import WindowPool, WindowSource, align_metrics
from vmad.trainer.pca_detector import PCADetector
from vmad.windows import Normalizer, make_windows


def _series(name: str, n: int, metrics: tuple[str, ...], seed: int) -> Series:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, len(metrics))).astype(np.float32)
    labels = (rng.random(n) < 0.2).astype(np.int8)
    return Series(name, np.arange(n, dtype=np.int64) * 60, values, metrics, labels)


def test_pool_gathers_the_same_windows_as_materializing_them() -> None:
    metrics = ("a", "b")
    parts = [_series("x", 50, metrics, 0), _series("y", 30, metrics, 1)]
    identity = Normalizer((0.0, 0.0), (1.0, 1.0))
    sources = [WindowSource.from_series(s, identity, 8, start=10) for s in parts]
    pool = WindowPool(sources)
    expected = np.concatenate(
        [make_windows(s.values, 8)[10 - 7:] for s in parts]
    )
    assert len(pool) == len(expected) == (50 - 10) + (30 - 10)
    index = np.array([0, 39, 40, 59, 5, 45])
    np.testing.assert_array_equal(pool[index], expected[index])
    np.testing.assert_array_equal(pool[2:5], expected[2:5])
    np.testing.assert_array_equal(pool.labels[:40], parts[0].labels[10:])


def test_source_weights_give_a_named_source_its_share() -> None:
    metrics = ("a",)
    identity = Normalizer((0.0,), (1.0,))
    pool = WindowPool([
        WindowSource.from_series(_series("big", 1000, metrics, 0), identity, 4),
        WindowSource.from_series(_series("synthetic", 100, metrics, 1), identity, 4),
    ])
    weights = pool.source_weights({"synthetic": 0.1})
    assert weights.sum() == pytest.approx(1.0)
    assert weights[pool.offsets[1]:].sum() == pytest.approx(0.1)


def test_align_metrics_moves_synthetic_metrics_to_their_aliases() -> None:
    synthetic = _series("vm", 20, ("cpu_percent", "memory_percent", "disk_mb_s", "net_mb_s"), 0)
    aligned = align_metrics(synthetic, ("cpu_r", "load_1", "mem_u"))
    assert aligned is not None and aligned.metrics == ("cpu_r", "load_1", "mem_u")
    np.testing.assert_array_equal(aligned.values[:, 0], synthetic.values[:, 0])
    np.testing.assert_array_equal(aligned.values[:, 1], 0.0)
    np.testing.assert_array_equal(aligned.values[:, 2], synthetic.values[:, 1])
    assert align_metrics(synthetic, ("unrelated",)) is None


def test_pca_scores_off_subspace_points_higher() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(500, 2))
    mixing = rng.normal(size=(2, 6))
    normal = latent @ mixing + 0.01 * rng.normal(size=(500, 6))
    detector = PCADetector(variance=0.99).fit(normal)
    assert detector.components is not None and len(detector.components) == 2
    outlier = normal[:1] + 3.0 * np.linalg.svd(mixing)[2][-1]  # orthogonal to the subspace
    assert detector.score(outlier)[0] > 100 * np.median(detector.score(normal))
