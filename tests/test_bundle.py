"""Bundle export parity (ONNX Runtime vs PyTorch) and the loader's rejections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vmad.bundle import METADATA_FILE, ONNX_FILE, Bundle, BundleError, load_bundle
from vmad.trainer.checkpoint import Checkpoint
from vmad.trainer.export import export_bundle
from vmad.trainer.models import MODEL_KINDS, build_model
from vmad.trainer.training import predict_proba
from vmad.windows import Normalizer

METRICS = ("cpu_percent", "memory_percent", "disk_mb_s", "net_mb_s")


def _checkpoint(kind: str = "zoom-cnn", window: int = 64) -> Checkpoint:
    model = build_model(kind, len(METRICS), window)
    normalizer = Normalizer((20.0, 50.0, 1.0, 1.0), (10.0, 5.0, 2.0, 2.0))
    return Checkpoint(model, kind, METRICS, window, normalizer, 0.5, {"test": True})


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_onnx_runtime_matches_pytorch(kind: str) -> None:
    checkpoint = _checkpoint(kind)
    bundle = export_bundle(checkpoint, "v1")
    rng = np.random.default_rng(7)
    windows = rng.normal(scale=3.0, size=(257, 4, 64)).astype(np.float32)
    diff = np.abs(bundle.probabilities(windows) - predict_proba(checkpoint.model, windows))
    assert diff.max() < 1e-5


def test_score_normalizes_raw_windows_with_bundle_statistics() -> None:
    checkpoint = _checkpoint()
    bundle = export_bundle(checkpoint, "v1")
    raw = np.random.default_rng(1).normal(30.0, 10.0, size=(5, 4, 64)).astype(np.float32)
    normalized = checkpoint.normalizer.apply(raw.transpose(0, 2, 1)).transpose(0, 2, 1)
    np.testing.assert_allclose(bundle.score(raw), predict_proba(checkpoint.model, normalized),
                               atol=1e-5)


def test_one_window_path_gives_exactly_the_batch_numbers() -> None:
    """The agent scores one window through preallocated, bound buffers
    (`Bundle.score_window`); its score and contributions must be the batch path's, bit
    for bit, whatever the window's memory layout, for the shipped bundle and an adapted
    one (per-VM residual with components, fusion, attribution)."""
    from vmad.bundle import load_default_bundle
    from vmad.synthetic import generate_vm
    from vmad.trainer.adaptation import fit_adaptation

    checkpoint = _checkpoint(window=16)
    vm, _ = generate_vm(5, 800)
    adaptation = fit_adaptation(checkpoint.model, vm.values[:600], 16, components=2,
                                cnn_weight=0.5, false_alarm_rate=0.01)
    rng = np.random.default_rng(3)
    for bundle in (load_default_bundle(), export_bundle(checkpoint, "a", adaptation=adaptation)):
        m, t = len(bundle.metrics), bundle.window
        ring = (rng.random((m, 2 * t)) * 80).astype(np.float32)
        ring[:, 3], ring[:, 9] = 1e7, -1e7  # past the clip on both sides
        checked = 0
        for start in (0, 1, t // 2, t):
            raw = ring[:, start:start + t]  # a strided view, as the agent passes it
            for window in (raw, raw.astype(np.float64) + 0.1):  # float32 first, both paths
                score, contributions = bundle.score_window(window)
                scores, expected = bundle.score_with_contributions(window[None])
                assert expected is not None and len(contributions) == m
                assert score == float(scores[0])
                assert contributions == tuple(expected[0].tolist())
                checked += 1
        assert checked == 8


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    export_bundle(_checkpoint(), "v1", tmp_path / "bundle")
    return tmp_path / "bundle"


def test_saved_bundle_loads_with_expected_metrics_and_window(saved: Path) -> None:
    bundle = load_bundle(saved, expect_metrics=METRICS, expect_window=64)
    assert bundle.metadata.version == "v1" and bundle.metadata.model_kind == "zoom-cnn"


def test_bad_checksum_is_refused(saved: Path) -> None:
    onnx = saved / ONNX_FILE
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(saved)


def test_wrong_metric_names_are_refused(saved: Path) -> None:
    with pytest.raises(BundleError, match="metrics"):
        load_bundle(saved, expect_metrics=("cpu", "mem", "disk", "net"))


def test_wrong_window_is_refused(saved: Path) -> None:
    with pytest.raises(BundleError, match="window 64 differs from expected 32"):
        load_bundle(saved, expect_window=32)


def test_metadata_that_lies_about_the_shape_is_refused(saved: Path) -> None:
    meta_path = saved / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["window"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="does not match metadata"):
        load_bundle(saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, "format_version"),
        ({"threshold": 1.5}, "threshold"),
        ({"metrics": ["a", "a", "b", "c"]}, "repeats"),
        ({"window": "64"}, "'window' has the wrong type"),
        ({"alarm_after": 0}, "alarm_after must be an integer in"),
        ({"alarm_after": "3"}, "alarm_after must be an integer in"),
        ({"alarm_after": True}, "alarm_after must be an integer in"),
        ({"alarm_after": 10**6}, "alarm_after must be an integer in"),
        ({"normalization": {"kind": "robust", "center": [0], "scale": [1]}}, "covers 1 metrics"),
    ],
)
def test_malformed_metadata_is_refused(saved: Path, change: dict, message: str) -> None:
    meta_path = saved / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta.update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        load_bundle(saved)


def test_missing_files_and_garbage_are_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "nowhere")
    meta = (saved / METADATA_FILE).read_bytes()
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.from_parts(b"{not json", b"")
    with pytest.raises(BundleError):
        Bundle.from_parts(meta, b"garbage that is not onnx")


def test_alarm_after_travels_and_defaults_to_every_window(saved: Path) -> None:
    """A bundle written before `alarm_after` existed flags every window on its own; one
    that carries it is read back with it, and its offline verdicts count the run as the
    agent does (windows just before the scored ones included)."""
    meta_path = saved / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta.pop("alarm_after", None)
    meta_path.write_text(json.dumps(meta))
    assert load_bundle(saved).metadata.alarm_after == 1
    meta["alarm_after"] = 3
    meta_path.write_text(json.dumps(meta))
    assert not load_bundle(saved).verdicts(np.ones(5)).any()  # a warm-up bundle: never
    meta["warmup"] = False
    meta_path.write_text(json.dumps(meta))
    bundle = load_bundle(saved)
    assert bundle.metadata.alarm_after == 3
    threshold = bundle.metadata.threshold
    scores = np.array([1.0, 1.0, 1.0, 0.0, 1.0]) * (threshold + 0.1)
    assert bundle.verdicts(scores).tolist() == [False, False, True, False, False]
    assert bundle.verdicts(scores, before=2).tolist() == [True, True, True, False, False]
