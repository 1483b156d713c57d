"""Shapes of every model, training determinism, and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmad.trainer.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from vmad.trainer.models import MODEL_KINDS, ZoomCNN, ZoomLayer, build_model, early_layers
from vmad.trainer.training import TrainConfig, predict_proba, train
from vmad.windows import Normalizer


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize(("metrics", "window"), [(1, 64), (4, 64), (38, 64), (5, 32), (3, 17)])
def test_every_model_maps_windows_to_one_logit(kind: str, metrics: int, window: int) -> None:
    model = build_model(kind, metrics, window)
    out = model(torch.randn(3, metrics, window))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


def test_zoom_layer_concatenates_scales_along_time() -> None:
    layer = ZoomLayer(window=64, kernels=(2, 4, 8, 16), channels=5)
    out = layer(torch.randn(2, 7, 64))
    assert layer.length == 32 + 16 + 8 + 4
    assert out.shape == (2, 5, 7, 60)


def test_zoom_layer_shares_weights_across_metrics() -> None:
    layer = ZoomLayer(window=16, kernels=(4,), channels=3)
    x = torch.randn(1, 1, 16)
    out = layer(torch.cat([x, x], dim=1))
    assert torch.allclose(out[:, :, 0], out[:, :, 1])


def test_zoom_kernels_larger_than_window_are_rejected() -> None:
    with pytest.raises(ValueError, match="exceed the window"):
        ZoomCNN(4, 8, kernels=(16,))


def test_unknown_model_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="zoom-cnn"):
        build_model("transformer", 4, 64)


def _separable_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    windows = rng.normal(size=(600, 4, 32)).astype(np.float32)
    labels = (rng.random(600) < 0.1).astype(np.int8)
    windows[labels == 1, 1, -8:] += 4.0  # anomalies: a memory jump at the end of the window
    return windows, labels


def test_training_learns_a_separable_problem_and_is_deterministic() -> None:
    windows, labels = _separable_problem()
    config = TrainConfig(max_batches=80, batch_size=32, seed=3)
    first, second = build_model("zoom-cnn", 4, 32), build_model("zoom-cnn", 4, 32)
    second.load_state_dict(first.state_dict())
    result = train(first, windows, labels, config)
    train(second, windows, labels, config)
    scores = predict_proba(first, windows)
    assert result.batches == 80
    assert scores[labels == 1].mean() > scores[labels == 0].mean() + 0.5
    np.testing.assert_array_equal(scores, predict_proba(second, windows))


def test_freeze_early_keeps_feature_layers_fixed() -> None:
    windows, labels = _separable_problem()
    model = build_model("zoom-cnn", 4, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, windows, labels, TrainConfig(max_batches=10, freeze_early=True))
    after = model.state_dict()
    frozen = {id(p) for layer in early_layers(model) for p in layer.parameters()}
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        assert changed != (id(parameter) in frozen), name
    assert all(p.requires_grad for p in model.parameters())


def test_early_stopping_keeps_the_best_weights() -> None:
    windows, labels = _separable_problem()
    model = build_model("mlp", 4, 32)
    config = TrainConfig(max_batches=2000, eval_every=5, patience=2, lr=1e-2)
    result = train(model, windows, labels, config, validation=(windows[:200], labels[:200]))
    assert result.stopped_early and result.batches < 2000
    assert result.best_validation_loss is not None


def test_checkpoint_round_trip_and_corruption(tmp_path) -> None:
    model = build_model("zoom-cnn", 4, 64)
    normalizer = Normalizer((1.0, 2.0, 3.0, 4.0), (1.0, 1.0, 2.0, 2.0))
    checkpoint = Checkpoint(model, "zoom-cnn", ("a", "b", "c", "d"), 64, normalizer, 0.4,
                            {"seed": 1})
    save_checkpoint(tmp_path / "ck", checkpoint)
    loaded = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 4, 64)
    assert torch.equal(loaded.model(x), model.eval()(x))
    assert loaded.threshold == 0.4 and loaded.normalizer == normalizer
    weights = tmp_path / "ck" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path / "ck")


def test_fine_tuning_that_never_helps_keeps_the_starting_weights() -> None:
    """A model already good on the validation windows, then trained on inverted labels:
    every evaluation is worse than the start, so the start is what comes back."""
    windows, labels = _separable_problem()
    model = build_model("mlp", 4, 32)
    train(model, windows, labels, TrainConfig(max_batches=80, batch_size=32, seed=1))
    before = predict_proba(model, windows)
    result = train(model, windows, 1 - labels,
                   TrainConfig(max_batches=40, eval_every=10, patience=10, seed=2),
                   validation=(windows, labels))
    assert result.batches == 40
    np.testing.assert_array_equal(predict_proba(model, windows), before)
