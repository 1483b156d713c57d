"""Which metric is to blame (trainer/attribution.py): the NumPy reference, its running-sum
form and the exported ONNX graph agree; what changed within the window is ranked above
what drifted long ago, and a fault that outlasts the window is still blamed; each
metric's scale is its own usual change, never below the floor; adaptations saved before
attribution existed still load and export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.trainer_fixtures import small_checkpoint
from vmad.schema import DEFAULT_METRICS
from vmad.synthetic import generate_vm
from vmad.trainer.adaptation import VMAdaptation, fit_adaptation
from vmad.trainer.attribution import FAR_WEIGHT, AttributionModel, split
from vmad.trainer.checkpoint import Checkpoint
from vmad.trainer.export import export_bundle
from vmad.trainer.residual import ResidualModel
from vmad.windows import make_windows

WINDOW = 16


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    import torch

    torch.manual_seed(0)
    return small_checkpoint("zoom-cnn", WINDOW, threshold=0.9)


def test_split_halves_the_window() -> None:
    assert split(64) == (32, 32) and split(7) == (3, 4)
    with pytest.raises(ValueError):
        split(1)


def test_series_form_equals_the_window_form() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 2, size=(300, 5)) + np.linspace(0, 30, 300)[:, None]
    model = AttributionModel.fit(values[:150], 9)
    by_window = model.contributions(make_windows(values, 9))
    by_series = model.contributions_of_series(values, 9)
    assert np.allclose(by_series[8:], by_window, atol=1e-9)
    # No full window yet: the distance from normal alone.
    far = np.abs(values[:8] - model.mean) / model.spread
    assert np.allclose(by_series[:8], FAR_WEIGHT * far)


def test_onnx_contributions_equal_numpy(checkpoint: Checkpoint) -> None:
    vm, _ = generate_vm(5, 1200)
    adaptation = fit_adaptation(checkpoint.model, vm.values[:600], WINDOW,
                                floors=[1.0, 0.5, 0.5, 0.2], cnn_weight=0.5,
                                false_alarm_rate=0.01)
    assert adaptation.attribution is not None
    # Fitted on this VM: not every metric at the floor.
    assert np.any(adaptation.attribution.scale > 1.0)
    bundle = export_bundle(checkpoint, "adapted", adaptation=adaptation)
    raw = make_windows(vm.values[600:1000], WINDOW)
    _, contributions = bundle.score_with_contributions(raw)
    normalized = make_windows(adaptation.normalizer.apply(vm.values[600:1000]), WINDOW)
    expected = adaptation.attribution.contributions(normalized)
    assert contributions is not None and contributions.shape == expected.shape
    assert np.allclose(contributions, expected, rtol=1e-4, atol=1e-4)


def test_a_jump_outranks_a_drift_from_long_ago() -> None:
    """Metric 0 drifted far from the VM's normal days ago and stays there; metric 1 jumps
    in the newest half of the window. The metric to blame is 1; the distance from the
    long-run normal (the score's per-metric deviation) would name 0."""
    rng = np.random.default_rng(2)
    history = rng.normal(0, 1, size=(2000, 3))
    model = AttributionModel.fit(history, WINDOW)
    now = rng.normal(0, 1, size=(WINDOW, 3))
    now[:, 0] += 25.0  # drifted long before this window
    now[WINDOW // 2:, 1] += 10.0  # just broke
    contributions = model.contributions(now.T[None])[0]
    assert int(np.argmax(contributions)) == 1
    far = ResidualModel.fit(history, components=0).contributions(now[-1:])[0]
    assert int(np.argmax(far)) == 0


def test_a_fault_that_outlasts_the_window_is_still_blamed() -> None:
    """Metric 2 has sat 30 spreads off normal for longer than the window: nothing changes
    within it, yet it is ranked first over metrics that only jitter as usual."""
    rng = np.random.default_rng(4)
    history = rng.normal(0, 1, size=(2000, 3))
    model = AttributionModel.fit(history, WINDOW)
    now = rng.normal(0, 1, size=(WINDOW, 3))
    now[:, 2] += 30.0
    offset = np.array([0.0, 0.0, 30.0])
    for _ in range(20):
        contributions = model.contributions(now.T[None])[0]
        assert int(np.argmax(contributions)) == 2
        now = np.vstack([now[1:], rng.normal(0, 1, size=(1, 3)) + offset])


def test_scale_is_each_metrics_usual_change_with_a_floor() -> None:
    rng = np.random.default_rng(3)
    history = np.column_stack([rng.normal(0, 8, 3000), rng.normal(0, 0.01, 3000),
                               np.zeros(3000)])
    model = AttributionModel.fit(history, WINDOW)
    assert model.scale[0] > 5.0  # a jittery metric must jitter more than usual
    assert model.scale[1] == model.scale[2] == 1.0  # quiet or constant: the floor
    # The same jump counts for less on the jittery metric.
    window = np.zeros((3, WINDOW))
    window[:, WINDOW // 2:] = 10.0
    contributions = model.contributions(window[None])[0]
    assert contributions[0] < contributions[1] == contributions[2]
    assert np.array_equal(AttributionModel.fit(history[:5], WINDOW).scale, np.ones(3))
    with pytest.raises(ValueError):
        AttributionModel.from_dict({"scale": [1.0, 0.0, 1.0], "mean": [0.0] * 3,
                                    "spread": [1.0] * 3})
    with pytest.raises(ValueError):
        AttributionModel.from_dict({"scale": [1.0] * 3, "mean": [0.0] * 2, "spread": [1.0] * 3})


def test_adaptation_saved_before_attribution_still_loads_and_exports(
        checkpoint: Checkpoint) -> None:
    vm, _ = generate_vm(6, 800)
    adaptation = fit_adaptation(checkpoint.model, vm.values[:400], WINDOW)
    again = VMAdaptation.from_json(adaptation.to_json())
    assert again.attribution is not None
    assert np.array_equal(again.attribution.scale, adaptation.attribution.scale)  # type: ignore[union-attr]
    old = json.loads(adaptation.to_json())
    del old["attribution"]
    legacy = VMAdaptation.from_json(json.dumps(old))
    assert legacy.attribution is None
    bundle = export_bundle(checkpoint, "legacy", adaptation=legacy)
    raw = make_windows(vm.values[400:500], WINDOW)
    _, contributions = bundle.score_with_contributions(raw)
    expected = AttributionModel.identity(4).contributions(
        make_windows(legacy.normalizer.apply(vm.values[400:500]), WINDOW))
    assert np.allclose(contributions, expected, rtol=1e-4, atol=1e-4)


def test_newest_anomalous_verdicts_blame_reaches_vmad_status(checkpoint, tmp_path,
                                                             monkeypatch, capsys) -> None:
    """Trainer state -> wire -> controller registry -> `vmad status`: the metrics to
    blame in the VM's newest anomalous verdict; a state without them (an older trainer)
    still reads, as empty."""
    from vmad.actions import Action, Decision
    from vmad.cli import main
    from vmad.controller.registry import Registry
    from vmad.controller.reward import reward
    from vmad.protos.vmad.v1 import control_pb2
    from vmad.trainer.config import TrainingSettings
    from vmad.trainer.store import TelemetryStore
    from vmad.trainer.transfer import VMModels
    from vmad.wire import state_from_message, state_to_message

    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings())
    vm, _ = generate_vm(7, 100, fault_rate=0.0)
    store.ingest("vm-1", DEFAULT_METRICS, np.arange(1, 101), vm.timestamps, vm.values,
                 verdicts=[(float(vm.timestamps[50]), 0.9, True, "v", (0.1, 9.0, 0.2, 3.0)),
                           (float(vm.timestamps[60]), 0.2, False, "v", (8.0, 0.1, 0.0, 0.0)),
                           (float(vm.timestamps[40]), 0.9, True, "v", (5.0, 0.0, 0.0, 0.0))])
    state = models.state("vm-1")
    assert state.blamed == "memory_percent=9.0,net_mb_s=3.0,disk_mb_s=0.2"
    assert models.state("vm-2").blamed == ""
    wired = state_from_message(state_to_message(state))
    assert wired == state
    older = control_pb2.VMState.FromString(state_to_message(state).SerializeToString())
    older.ClearField("blamed")
    assert state_from_message(older).blamed == ""

    registry = Registry(tmp_path / "r.sqlite")
    registry.record_report("t1", wired, Decision(Action.KEEP, 0, "fine"), "rules", reward)
    registry.close()
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["status", "--database", str(tmp_path / "r.sqlite")]) == 0
    assert "memory_percent=9.0,net_mb_s=3.0" in capsys.readouterr().out
