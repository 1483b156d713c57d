"""Label-free per-VM adaptation: the fused ONNX graph equals its NumPy definition, a VM's
first hours give it its own bundle without a label, warm-up bundles never alarm, verdict
contributions reach the store, and HitRate counts what it should."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tests.trainer_fixtures import small_checkpoint
from vmad.evaluation import hit_rate, read_interpretation_labels
from vmad.schema import DEFAULT_METRICS
from vmad.synthetic import generate_vm
from vmad.trainer.adaptation import (
    USUAL_SCORE,
    VMAdaptation,
    alarm_covered,
    fit_adaptation,
    obeyed_threshold,
)
from vmad.trainer.checkpoint import Checkpoint
from vmad.trainer.config import AdaptationSettings, TrainingSettings
from vmad.trainer.export import export_bundle
from vmad.trainer.residual import ResidualModel
from vmad.trainer.store import TelemetryStore
from vmad.trainer.training import predict_logits
from vmad.windows import Normalizer, make_windows

if TYPE_CHECKING:
    from vmad.trainer.transfer import VMModels

WINDOW = 16


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    import torch

    torch.manual_seed(0)
    return small_checkpoint("zoom-cnn", WINDOW, threshold=0.9)


@pytest.fixture(scope="module")
def wide_checkpoint() -> Checkpoint:
    """A network over 16 metrics: wide enough for the distance from a subspace."""
    import torch

    torch.manual_seed(0)
    return small_checkpoint("zoom-cnn", WINDOW, threshold=0.9,
                            metrics=tuple(f"m{i}" for i in range(16)))


def test_fused_onnx_graph_matches_numpy(checkpoint: Checkpoint,
                                        wide_checkpoint: Checkpoint) -> None:
    import onnx

    vm, _ = generate_vm(5, 1200)
    wide = _wide_vm(1200, 5)
    for components, weight, variance, states in (
            (0, 0.5, 0.0, 0), (2, 0.5, 0.0, 0), (0, 0.0, 0.0, 0), (0, 0.5, 0.0, 8),
            (0, 0.5, 0.9, 0), (2, 0.0, 0.9, 0), (0, 0.5, 0.9, 16)):
        # The subspace and the states need a wide metric set (SUBSPACE_MIN_METRICS).
        network, values = (wide_checkpoint, wide) if variance or states \
            else (checkpoint, vm.values)
        adaptation = fit_adaptation(network.model, values[:600], WINDOW,
                                    floors=0.5, components=components,
                                    cnn_weight=weight, false_alarm_rate=0.01,
                                    subspace_variance=variance, normal_states=states)
        assert (adaptation.subspace is not None) == (variance > 0)
        assert (adaptation.states is not None) == (states > 0)
        bundle = export_bundle(network, "adapted", adaptation=adaptation)
        assert not bundle.metadata.warmup
        raw = make_windows(values[600:900], WINDOW)
        scores, contributions = bundle.score_with_contributions(raw)
        normalized = adaptation.normalizer.apply(values[600:900])
        assert adaptation.attribution is not None
        expected_contrib = adaptation.attribution.contributions(make_windows(normalized, WINDOW))
        logits = predict_logits(network.model, make_windows(normalized, WINDOW))
        expected = adaptation.score(logits, normalized[WINDOW - 1:])
        assert np.allclose(contributions, expected_contrib, atol=1e-3)
        assert np.allclose(scores, expected, atol=1e-4)
        # A VM whose network weight is 0 does not run the network at all.
        ops = {node.op_type for node in onnx.load_from_string(bundle.onnx_bytes).graph.node}
        assert ("Conv" in ops) == (weight > 0), ops


def test_threshold_meets_the_false_alarm_target_on_own_windows(checkpoint) -> None:
    vm, _ = generate_vm(6, 3000, fault_rate=0.0)
    adaptation = fit_adaptation(checkpoint.model, vm.values[:2000], WINDOW,
                                false_alarm_rate=0.01)
    normalized = adaptation.normalizer.apply(vm.values[:2000])
    logits = predict_logits(checkpoint.model, make_windows(normalized, WINDOW))
    scores = adaptation.score(logits, normalized[WINDOW - 1:])
    flagged = scores >= adaptation.threshold
    # The tail fit extrapolates: about the target, not exactly it, on the fitting data.
    assert adaptation.threshold == 0.5 and flagged.mean() <= 0.02
    # Scores are in heights of the threshold above the VM's usual level: its median
    # window reads USUAL_SCORE on every VM and refit.
    assert np.median(scores) == pytest.approx(USUAL_SCORE, abs=0.005)


def test_windows_labelled_normal_stay_below_the_refits_threshold(checkpoint) -> None:
    """A label of normal is obeyed: the refit's threshold rises, where needed, just
    above every window ending on a labelled sample, and says by how much; unlabelled,
    the same excursion stays above it."""
    vm, _ = generate_vm(6, 2000, fault_rate=0.0)
    raw = vm.values.copy()
    raw[1500:1530, 1] = np.minimum(raw[1500:1530, 1] + 25.0, 100.0)  # memory, briefly
    labelled = np.zeros(len(raw), dtype=bool)
    labelled[1490:1540] = True

    def burst_scores(adaptation) -> np.ndarray:
        normalized = adaptation.normalizer.apply(raw)
        logits = predict_logits(checkpoint.model, make_windows(normalized, WINDOW))
        return adaptation.score(logits, normalized[WINDOW - 1:])[labelled[WINDOW - 1:]]

    learnt = fit_adaptation(checkpoint.model, raw, WINDOW)
    obeyed = fit_adaptation(checkpoint.model, raw, WINDOW, labelled_normal=labelled)
    assert burst_scores(learnt).max() >= learnt.threshold and learnt.label_raise == 1.0
    assert burst_scores(obeyed).max() < obeyed.threshold and obeyed.label_raise > 1.0
    assert VMAdaptation.from_json(obeyed.to_json()).label_raise == obeyed.label_raise
    # A label the target already keeps below the threshold raises nothing.
    quiet = np.zeros(len(raw), dtype=bool)
    quiet[100:150] = True
    assert fit_adaptation(checkpoint.model, raw, WINDOW,
                          labelled_normal=quiet).label_raise == 1.0
    with pytest.raises(ValueError, match="labelled_normal has 10 rows for 2000 samples"):
        fit_adaptation(checkpoint.model, raw, WINDOW, labelled_normal=labelled[:10])


def test_the_false_alarm_target_holds_on_the_windows_labelled_normal() -> None:
    """A short label (under 200 windows at 0.5 %) is obeyed outright; on a long stretch
    labelled normal 0.5 % of its windows may still reach the threshold; a label below
    the threshold changes nothing."""
    scores = np.arange(1000.0)
    newest = np.arange(1000) >= 990
    raised = obeyed_threshold(990.0, scores, newest, 0.005)
    assert 999.0 < raised < 1010.0
    everything = obeyed_threshold(990.0, scores, np.ones(1000, bool), 0.005)
    assert 994.0 < everything < 995.0 and (scores >= everything).sum() == 5
    assert obeyed_threshold(990.0, scores, np.arange(1000) < 500, 0.005) == 990.0
    assert obeyed_threshold(990.0, scores, None, 0.005) == 990.0


def test_tail_threshold_extrapolates_beyond_the_sample() -> None:
    from vmad.evaluation import tail_threshold

    rng = np.random.default_rng(0)
    few = rng.exponential(1.0, 300)
    # Exponential scores: the true 0.1 % quantile is ln(1000) = 6.9, above most samples.
    assert 5.5 < tail_threshold(few, 0.001) < 8.5
    many = rng.exponential(1.0, 200_000)
    assert (many > tail_threshold(few, 0.005)).mean() < 0.012
    with pytest.raises(ValueError):
        tail_threshold(few, 0.2)


def test_scale_floor_keeps_a_constant_metric_from_exploding() -> None:
    values = np.column_stack([np.full(500, 3.0), np.random.default_rng(0).normal(50, 5, 500)])
    bare = Normalizer.fit(values)
    floored = Normalizer.fit(values, floor=[0.5, 0.5])
    wobble = np.array([[3.2, 50.0]])
    assert bare.scale[0] == 1.0  # no spread, no floor: unit scale
    assert floored.scale[0] == 0.5 and abs(floored.apply(wobble)[0, 0] - 0.4) < 1e-6
    with pytest.raises(ValueError, match="floor"):
        Normalizer.fit(values, floor=[-1.0, 0.0])
    residual = ResidualModel.fit(floored.apply(values), spread_floor=1.0)
    assert residual.spread[0] == 1.0


def test_vm_is_adapted_from_its_own_first_samples_without_labels(checkpoint, tmp_path) -> None:
    from vmad.trainer.transfer import VMModels

    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings(),
                      adaptation=AdaptationSettings(warmup_samples=300, refresh_samples=200,
                                                    history_samples=300))
    vm, _ = generate_vm(7, 800, fault_rate=0.0)
    seqs = np.arange(1, 801)
    store.ingest("vm", DEFAULT_METRICS, seqs[:250], vm.timestamps[:250], vm.values[:250])
    assert not models.needs_adaptation("vm")
    assert models.bundle("vm").metadata.warmup  # the pooled model: the agent stays quiet
    store.ingest("vm", DEFAULT_METRICS, seqs[250:300], vm.timestamps[250:300],
                 vm.values[250:300])
    assert models.needs_adaptation("vm")
    outcome = models.adapt("vm")
    bundle = models.bundle("vm")
    assert outcome.action == "adapt" and not bundle.metadata.warmup
    assert bundle.metadata.alarm_after == AdaptationSettings().alarm_after
    # The network's weight was chosen on faults injected into the VM's own first samples.
    assert models.adaptation("vm").fusion.cnn_weight in AdaptationSettings().cnn_weights
    assert bundle.metadata.version == outcome.version
    assert not models.needs_adaptation("vm")
    # A restarted trainer finds the same adaptation on disk.
    again = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings())
    assert again.bundle("vm").metadata.version == bundle.metadata.version
    # The VM drifts on: a refresh after refresh_samples more, a new version.
    store.ingest("vm", DEFAULT_METRICS, seqs[300:], vm.timestamps[300:], vm.values[300:],
                 verdicts=[(float(vm.timestamps[700]), 0.99, True, bundle.metadata.version,
                            (0.1, 7.0, 0.2, 0.3))])
    assert models.needs_adaptation("vm")
    first = models.adaptation("vm")
    models.adapt("vm")
    second = models.adaptation("vm")
    assert second.generation == 2
    # The refit uses no more network weight than the first fit preferred.
    assert first.preferred_cnn_weight is not None and second.preferred_cnn_weight is not None
    assert second.fusion.cnn_weight == min(first.preferred_cnn_weight,
                                           second.preferred_cnn_weight)
    assert models.bundle("vm").metadata.version != bundle.metadata.version
    [(ts, contributions)] = store.contributions("vm")
    assert ts == float(vm.timestamps[700]) and contributions[1] == pytest.approx(7.0)


def _short_history_models(checkpoint: Checkpoint, tmp_path: Path,
                          ) -> tuple[TelemetryStore, VMModels]:
    """A store and the trainer's per-VM models on it, with a warm-up of 300 samples, a
    refit every 100 and a history of 600."""
    from vmad.trainer.transfer import VMModels

    store = TelemetryStore(tmp_path / "s.sqlite")
    return store, VMModels(checkpoint, store, tmp_path / "models", TrainingSettings(),
                           adaptation=AdaptationSettings(warmup_samples=300,
                                                         refresh_samples=100,
                                                         history_samples=600))


def test_a_vm_that_arrives_with_a_backlog_is_first_fitted_on_all_of_it(checkpoint,
                                                                       tmp_path) -> None:
    from vmad.labels import LabelInterval

    store, models = _short_history_models(checkpoint, tmp_path)
    vm, _ = generate_vm(7, 800, fault_rate=0.0)
    # 800 samples in one go (an agent's spool after the trainer was unreachable), 100 of
    # them labelled anomalous and one window that alarmed (under a bundle of a trainer
    # that lost its models): the first fit takes the newest 600 but those.
    store.ingest("vm", DEFAULT_METRICS, np.arange(1, 801), vm.timestamps, vm.values,
                 verdicts=[(float(vm.timestamps[700]), 0.99, True, "lost",
                            (0.0, 9.0, 0.0, 0.0))])
    store.add_labels("vm", [LabelInterval(float(vm.timestamps[500]),
                                          float(vm.timestamps[599]), True, "operator")])
    assert models.needs_adaptation("vm")
    models.adapt("vm")
    assert models.adaptation("vm").generation == 1
    assert models.adaptation("vm").samples_fitted == 600 - 100 - WINDOW


def test_a_false_alarm_labelled_normal_is_learnt_at_the_next_refit(checkpoint, tmp_path,
                                                                  caplog) -> None:
    from vmad.labels import LabelInterval

    store, models = _short_history_models(checkpoint, tmp_path)
    vm, _ = generate_vm(7, 600, fault_rate=0.0)
    seqs, times, values = np.arange(1, 601), vm.timestamps, vm.values
    store.ingest("vm", DEFAULT_METRICS, seqs[:300], times[:300], values[:300])
    models.adapt("vm")
    version = models.bundle("vm").metadata.version
    # The VM's normal moves (more memory in use); every window after it is flagged.
    moved = values[300:].copy()
    moved[:, 1] = np.minimum(moved[:, 1] + 25.0, 100.0)
    flagged = [(float(t), 0.99, True, version, (0.0, 9.0, 0.0, 0.0)) for t in times[300:]]
    store.ingest("vm", DEFAULT_METRICS, seqs[300:], times[300:], moved, verdicts=flagged)
    with caplog.at_level("WARNING", logger="vmad.trainer.transfer"):
        models.adapt("vm")
    # Alarmed windows (each alarm covers its whole window) are left out of the refit:
    # the moved level is not learnt, and the log says how an operator would end it.
    covered = 300 + WINDOW - 1
    assert models.adaptation("vm").samples_fitted == 600 - covered
    [warning] = [r.getMessage() for r in caplog.records if r.name == "vmad.trainer.transfer"]
    assert f"alarms cover {covered} of its newest 600" in warning
    assert "left out of this refit" in warning and "vmad label --vm vm --normal" in warning
    # The operator labels most of it a false alarm: the next refit learns that part,
    # while an interval labelled anomalous stays out whatever the alarms say.
    store.add_labels("vm", [LabelInterval(float(times[400]), float(times[549]), False,
                                          "operator"),
                            LabelInterval(float(times[550]), float(times[599]), True,
                                          "operator")])
    caplog.clear()
    with caplog.at_level("WARNING", logger="vmad.trainer.transfer"):
        models.adapt("vm")
    assert models.adaptation("vm").samples_fitted == 600 - (covered - 150)
    assert not [r for r in caplog.records if r.name == "vmad.trainer.transfer"]


def test_a_burst_labelled_normal_does_not_alarm_after_the_refit(checkpoint, tmp_path,
                                                                 caplog) -> None:
    """The trainer obeys a label of normal: the refit's bundle (the ONNX graph the agent
    runs) scores every window of the labelled interval below its threshold, and the log
    says the label raised it. Unlabelled, the same history gives the same fit, and the
    burst alarms."""
    from vmad.labels import LabelInterval
    from vmad.trainer.transfer import VMModels

    vm, _ = generate_vm(6, 2000, fault_rate=0.0)
    seqs, times, values = np.arange(1, 2001), vm.timestamps, vm.values.copy()
    values[1500:1505, 1] = np.minimum(values[1500:1505, 1] + 25.0, 100.0)
    labelled = slice(1490, 1525)  # every window reaching into the burst ends in it
    windows = np.ascontiguousarray(make_windows(values, WINDOW))
    ends = np.arange(WINDOW - 1, 2000)
    in_label = (ends >= labelled.start) & (ends < labelled.stop)
    peaks = []
    for label in (False, True):
        store = TelemetryStore(tmp_path / f"{label}.sqlite")
        models = VMModels(checkpoint, store, tmp_path / f"models-{label}", TrainingSettings(),
                          adaptation=AdaptationSettings(warmup_samples=300,
                                                        history_samples=2000))
        store.ingest("vm", DEFAULT_METRICS, seqs, times, values)
        if label:
            store.add_labels("vm", [LabelInterval(float(times[labelled.start]),
                                                  float(times[labelled.stop - 1]), False,
                                                  "operator")])
        with caplog.at_level("INFO", logger="vmad.trainer.transfer"):
            models.adapt("vm")
        bundle = models.bundle("vm")
        peaks.append(bundle.score(windows)[in_label].max() / bundle.metadata.threshold)
    assert peaks[0] >= 1.0 > peaks[1]
    assert any("35 samples labelled normal raise its threshold" in r.getMessage()
               for r in caplog.records)


def test_status_and_metrics_say_what_each_vms_detector_is(checkpoint, tmp_path,
                                                          monkeypatch, capsys) -> None:
    """A warming-up VM and an adapted one whose labels raised its threshold: the state
    report says which (through the wire and `vmad status`), and the trainer's /metrics
    export the same per VM."""
    from prometheus_client import generate_latest

    from vmad.actions import Action, Decision
    from vmad.cli import main
    from vmad.controller.registry import Registry
    from vmad.controller.reward import reward
    from vmad.labels import LabelInterval
    from vmad.trainer.core import TrainerCore
    from vmad.trainer.metrics import TrainerMetrics
    from vmad.trainer.transfer import VMModels
    from vmad.wire import state_from_message, state_to_message

    vm, _ = generate_vm(6, 2000, fault_rate=0.0)
    values = vm.values.copy()
    values[1500:1505, 1] = np.minimum(values[1500:1505, 1] + 25.0, 100.0)
    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings(),
                      adaptation=AdaptationSettings(warmup_samples=300, history_samples=2000))
    store.ingest("vm-adapted", DEFAULT_METRICS, np.arange(1, 2001), vm.timestamps, values)
    store.add_labels("vm-adapted", [LabelInterval(float(vm.timestamps[1490]),
                                                  float(vm.timestamps[1524]), False,
                                                  "operator")])
    store.ingest("vm-new", DEFAULT_METRICS, np.arange(1, 101), vm.timestamps[:100],
                 vm.values[:100])
    models.adapt("vm-adapted")
    adaptation = models.adaptation("vm-adapted")
    assert adaptation is not None and adaptation.label_raise > 1.0

    adapted = models.state("vm-adapted", now=adaptation.fitted_at + 300).detector
    assert adapted.startswith(f"fit 1, 5 min ago, on {adaptation.samples_fitted} samples; "
                              f"injected faults: recall {adaptation.quality['recall']:.2f}")
    assert adapted.endswith(f"labels raise threshold x{adaptation.label_raise:.1f}")
    warming = models.state("vm-new")
    assert warming.detector == "warming up: 100 of 300 samples, no alarms"
    assert state_from_message(state_to_message(warming)) == warming

    registry = Registry(tmp_path / "r.sqlite")
    registry.record_report("t1", state_from_message(state_to_message(models.state(
        "vm-adapted"))), Decision(Action.KEEP, 0, "fine"), "rules", reward)
    registry.close()
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["status", "--database", str(tmp_path / "r.sqlite")]) == 0
    assert f"labels raise threshold x{adaptation.label_raise:.1f}" in capsys.readouterr().out

    metrics = TrainerMetrics(store, TrainerCore(store, models), None).registry
    gauge = metrics.get_sample_value
    assert gauge("vmad_trainer_vm_adapted", {"vm_id": "vm-new"}) == 0.0
    assert gauge("vmad_trainer_vm_adapted", {"vm_id": "vm-adapted"}) == 1.0
    assert gauge("vmad_trainer_vm_threshold_label_raise", {"vm_id": "vm-adapted"}) == \
        pytest.approx(adaptation.label_raise)
    assert gauge("vmad_trainer_vm_injected_recall", {"vm_id": "vm-adapted"}) == \
        pytest.approx(adaptation.quality["recall"])
    assert gauge("vmad_trainer_vm_injected_false_alarm_rate", {"vm_id": "vm-adapted"}) == \
        pytest.approx(adaptation.quality["false_alarm_rate"])
    assert 'vmad_trainer_vm_injected_recall{vm_id="vm-new"}' not in \
        generate_latest(metrics).decode()


def test_an_adapted_vm_fine_tunes_without_labels_on_injected_faults(checkpoint,
                                                                     tmp_path) -> None:
    from vmad.trainer.self_supervised import self_supervised_data
    from vmad.trainer.transfer import VMModels

    vm, _ = generate_vm(8, 600, fault_rate=0.0)
    store = TelemetryStore(tmp_path / "s.sqlite")
    store.ingest("vm", DEFAULT_METRICS, np.arange(1, 601), vm.timestamps, vm.values)
    adaptation = AdaptationSettings(warmup_samples=300, history_samples=400)
    quiet = VMModels(checkpoint, store, tmp_path / "off", TrainingSettings(),
                     adaptation=adaptation)  # the default: real labels only
    quiet.adapt("vm")
    assert quiet.finetune("vm", 20).skipped == "no labelled windows"

    models = VMModels(checkpoint, store, tmp_path / "on", TrainingSettings(self_supervised=True),
                      adaptation=adaptation)
    models.adapt("vm")
    outcome = models.finetune("vm", 20)
    assert outcome.action == "finetune" and outcome.batches > 0 and not outcome.skipped
    provenance = models.checkpoint("vm").provenance
    assert provenance["labelled_windows"] == 0 and provenance["injected_windows"] > 0
    assert models.info("vm").finetuned and not models.bundle("vm").metadata.warmup
    # The network's threshold (the network floor's) is recalibrated on the injected
    # validation set, not kept from the pretrained checkpoint (0.9).
    from vmad.trainer.self_supervised import validation_threshold

    finetuned = models.checkpoint("vm")
    data = models._self_supervised_data("vm", models.labelled_windows("vm"))
    assert data is not None
    expected = validation_threshold(finetuned.model, data,
                                    models.adaptation("vm").normalizer.apply_windows)
    assert expected is not None and expected != checkpoint.threshold
    assert finetuned.threshold == pytest.approx(expected)
    assert models.info("vm").threshold == pytest.approx(expected)

    # Real labels join the injected set and are drawn more often; training and
    # validation come from disjoint stretches of time.
    real = make_windows(vm.values[:100], WINDOW)
    data = self_supervised_data(vm.values[:400], WINDOW, real_windows=real,
                                real_labels=np.ones(len(real), np.int8))
    assert data.real_labelled == len(real)
    assert data.weights[-1] > data.weights[0]
    assert 0 < data.labels[:-len(real)].mean() < 0.5 and data.validation_labels.any()
    assert data.validation_windows.shape[0] < data.windows.shape[0]
    with pytest.raises(ValueError, match="samples of history"):
        self_supervised_data(vm.values[:100], WINDOW)


def test_a_fine_tune_on_one_class_keeps_the_threshold_and_says_so(checkpoint, tmp_path,
                                                                   caplog) -> None:
    from vmad.labels import LabelInterval
    from vmad.trainer.transfer import VMModels

    vm, _ = generate_vm(9, 300, fault_rate=0.0)
    store = TelemetryStore(tmp_path / "s.sqlite")
    store.ingest("vm", DEFAULT_METRICS, np.arange(1, 301), vm.timestamps, vm.values)
    # Every labelled window anomalous: no best-F1 threshold exists on them.
    store.add_labels("vm", [LabelInterval(float(vm.timestamps[0]), float(vm.timestamps[-1]),
                                          True, "operator")])
    models = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings())
    with caplog.at_level("WARNING", logger="vmad.trainer.transfer"):
        outcome = models.finetune("vm", 5)
    assert outcome.action == "finetune" and outcome.batches > 0
    assert models.checkpoint("vm").threshold == pytest.approx(checkpoint.threshold)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "vmad.trainer.transfer"]
    assert "keeps its threshold" in warning and "labelled windows hold one class" in warning


def test_warmup_bundle_never_alarms(checkpoint, tmp_path) -> None:
    from vmad.edge_agent.detector import BundleSlot, WindowScorer

    pooled = Checkpoint(checkpoint.model, "zoom-cnn", DEFAULT_METRICS, WINDOW,
                        checkpoint.normalizer, threshold=0.0)  # would flag everything
    bundle = export_bundle(pooled, "pooled")
    slot = BundleSlot(tmp_path / "b", DEFAULT_METRICS, WINDOW)
    slot.install(bundle.metadata.to_json(), bundle.onnx_bytes)
    scorer = WindowScorer(slot)
    verdicts = [scorer.push([90.0, 95.0, 50.0, 20.0]) for _ in range(WINDOW + 3)]
    last = verdicts[-1]
    assert last is not None and last.warmup and not last.anomalous
    assert len(last.contributions) == 4 and last.top_metrics(DEFAULT_METRICS).count("=") == 2


def test_hit_rate_counts_cause_metrics_among_the_top(tmp_path) -> None:
    path = tmp_path / "interpretation_label.txt"
    path.write_text("2-3:1,3\n5-5:2\n")
    labels = read_interpretation_labels(path)
    assert labels == [(1, 3, (0, 2)), (4, 5, (1,))]
    contributions = np.zeros((6, 3))
    contributions[1:3] = [5.0, 0.0, 4.0]  # both causes on top
    contributions[4] = [3.0, 2.0, 1.0]  # the cause is second
    assert hit_rate(contributions, labels, 1.0) == pytest.approx(2 / 3)
    assert hit_rate(contributions, labels, 1.5) == pytest.approx(1.0)
    assert np.isnan(hit_rate(contributions, labels, 1.0, slice(5, None)))
    path.write_text("oops\n")
    with pytest.raises(ValueError, match="start-end"):
        read_interpretation_labels(path)


def test_injected_validation_set_labels_faults_at_the_vms_own_levels() -> None:
    from vmad.trainer.injection import injected_validation_set

    vm, _ = generate_vm(11, 1500, fault_rate=0.0)
    injected = injected_validation_set(vm.values, WINDOW, seed=1)
    assert injected.windows.shape[1:] == (4, WINDOW) and len(injected.kinds) >= 4
    assert 0.05 < injected.labels.mean() < 0.4
    # Anomalous windows really differ from the VM's own windows; normal ones are its own.
    normal = make_windows(vm.values, WINDOW)
    assert np.allclose(injected.windows[: len(normal)][injected.labels[: len(normal)] == 0][:5],
                       normal[injected.labels[: len(normal)] == 0][:5])
    with pytest.raises(ValueError, match="at least"):
        injected_validation_set(vm.values[:40], WINDOW)


def test_generic_injection_shifts_random_metrics_in_their_own_scale() -> None:
    from vmad.trainer.injection import injected_generic_set

    rng = np.random.default_rng(3)
    scale = np.array([1.0, 10.0, 100.0, 0.5, 2.0, 3.0])
    history = rng.normal(size=(3000, 6)) * scale
    injected = injected_generic_set(history, WINDOW, scale, seed=2, copies=2)
    normal = np.concatenate([make_windows(history.astype(np.float32), WINDOW)] * 2)
    assert injected.windows.shape == normal.shape and len(injected.kinds) >= 10
    assert set(injected.kinds) == {"shift", "ramp", "spike"}
    assert 0.05 < injected.labels.mean() < 0.4
    # Where a window's newest sample is a fault, some metric moved by at least 2 of its
    # own scales (a ramp starts at 0); normal windows are the history's own.
    moved = np.abs(injected.windows[:, :, -1] - normal[:, :, -1]) / scale
    assert np.all(moved[injected.labels == 0] < 1e-3)
    assert np.mean(moved[injected.labels == 1].max(axis=1) >= 2) > 0.8
    with pytest.raises(ValueError, match="at least"):
        injected_generic_set(history[:40], WINDOW, scale)
    with pytest.raises(ValueError, match="scale"):
        injected_generic_set(history, WINDOW, scale[:3])


def test_the_network_weight_goes_to_the_part_that_ranks_faults() -> None:
    """choose_cnn_weight: a network that ranks injected faults at random is left out, one
    that ranks them and a deviation that does not gets the whole weight, one class keeps
    the configured weight."""
    from vmad.trainer.adaptation import Fusion, choose_cnn_weight

    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.2).astype(np.int8)
    signal, noise = labels * 1.5 + rng.normal(size=2000), rng.normal(size=2000)
    fusion = Fusion(cnn_weight=0.5)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    # deviation enters as log1p: keep it positive and monotone in the signal
    assert choose_cnn_weight(fusion, noise, np.exp(signal), labels, grid) == 0.0
    assert choose_cnn_weight(fusion, signal, np.exp(noise), labels, grid) == 1.0
    assert choose_cnn_weight(fusion, signal, np.exp(noise), np.zeros(2000), grid) == 0.5
    assert choose_cnn_weight(fusion, signal, np.exp(noise), labels, ()) == 0.5


def test_a_network_weight_is_taken_up_only_when_two_fits_in_a_row_prefer_it() -> None:
    """The weight a fit uses is the lower of its own preference and the previous fit's;
    the preference is saved with the adaptation (and refused out of [0, 1])."""
    from vmad.trainer.adaptation import VMAdaptation, confirmed_weight
    from vmad.trainer.checkpoint import load_default_checkpoint
    from vmad.trainer.injection import injected_validation_set

    assert confirmed_weight(0.75, None) == 0.75
    assert confirmed_weight(0.75, 0.25) == 0.25
    assert confirmed_weight(0.0, 1.0) == 0.0
    shipped = load_default_checkpoint()  # a network the injected faults give weight
    vm, _ = generate_vm(900, 720, fault_rate=0.0)
    history = vm.values
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)

    def fit(before: float | None):
        return fit_adaptation(shipped.model, history, shipped.window, cnn_weight=0.5,
                              injected=injected_validation_set(history, shipped.window),
                              cnn_weights=grid, preferred_before=before)

    alone = fit(None)
    preferred = alone.preferred_cnn_weight
    assert preferred is not None and preferred > 0.0 and alone.fusion.cnn_weight == preferred
    for before in grid:
        adaptation = fit(before)
        assert adaptation.preferred_cnn_weight == preferred  # its own view is unchanged
        assert adaptation.fusion.cnn_weight == min(preferred, before)
    # Without a choice there is no preference to pass on.
    assert fit_adaptation(shipped.model, history, shipped.window).preferred_cnn_weight is None
    saved = alone.to_json()
    assert VMAdaptation.from_json(saved).preferred_cnn_weight == preferred
    data = json.loads(saved)
    del data["preferred_cnn_weight"]  # saved before the preference was kept
    assert VMAdaptation.from_json(json.dumps(data)).preferred_cnn_weight is None
    data["preferred_cnn_weight"] = 1.5
    with pytest.raises(ValueError, match="preferred network weight must lie in"):
        VMAdaptation.from_json(json.dumps(data))


def test_detector_registry_creates_by_name() -> None:
    from vmad.detectors import Detector, create, names
    from vmad.trainer import pca_detector, residual, states  # noqa: F401 - they register

    assert {"pca", "residual", "subspace", "states"} <= set(names())
    train = np.random.default_rng(0).normal(size=(300, 5))
    for name in ("pca", "residual", "subspace", "states"):
        detector = create(name).fit(train)
        assert isinstance(detector, Detector)
        assert detector.score_samples(train[:7]).shape == (7,)
    for name, kind in (("residual", "ResidualDetector"), ("states", "StatesDetector")):
        with pytest.raises(RuntimeError, match=f"{kind} used before fit"):
            create(name).score_samples(train[:7])
    with pytest.raises(ValueError, match="unknown detector 'lstm'"):
        create("lstm")


def test_network_floor_keeps_the_network_part_at_its_calibrated_threshold(checkpoint) -> None:
    """With the network floor, a window whose deviation is usual and whose logit sits at
    the network's calibrated threshold scores at most 0.5 (no alarm), in NumPy and in
    the exported graph's fusion; below-threshold logits cannot alarm on their own."""
    from vmad.trainer.adaptation import offset_floor

    vm, _ = generate_vm(8, 900, fault_rate=0.0)
    plain = fit_adaptation(checkpoint.model, vm.values[:600], WINDOW, cnn_weight=0.5,
                           false_alarm_rate=0.01)
    floored = fit_adaptation(checkpoint.model, vm.values[:600], WINDOW, cnn_weight=0.5,
                             false_alarm_rate=0.01, network_threshold=0.99)
    f = floored.fusion
    # Each fit rescales z to its own threshold's height (in_threshold_units); offset x
    # dev_scale undoes that, and the two fits share the deviation's unscaled spread.
    assert f.offset * f.dev_scale >= plain.fusion.offset * plain.fusion.dev_scale
    assert f.offset >= offset_floor(f, network_threshold=0.99) - 1e-12
    usual = np.array([np.expm1(f.dev_center)])
    at_threshold = np.array([np.log(0.99 / 0.01)])
    assert f.score(at_threshold, usual)[0] <= 0.5 + 1e-6
    assert f.score(at_threshold - 1.0, usual)[0] < 0.5
    # No floor asked for: nothing below the tail fit.
    assert offset_floor(f) == -np.inf
    # The floor never applies to a part that has no weight.

    assert offset_floor(replace(f, cnn_weight=0.0), network_threshold=0.99) == -np.inf


def test_default_settings_use_the_network_floor() -> None:
    assert AdaptationSettings().network_floor is True


def _correlated_vm(n: int, seed: int) -> np.ndarray:
    """Two metrics that move together (a shared level plus a little noise), two that do
    not: a fault that pulls the pair apart leaves each metric inside its own range."""
    rng = np.random.default_rng(seed)
    level = 50 + 10 * np.sin(np.arange(n) / 40) + rng.normal(0, 3, n)
    return np.column_stack([level + rng.normal(0, 0.5, n), level + rng.normal(0, 0.5, n),
                            rng.normal(20, 2, n), rng.normal(5, 1, n)])


def _wide_vm(n: int, seed: int) -> np.ndarray:
    """16 metrics: two groups of six that move together (each a shared level plus a
    little noise) and four on their own. A fault that pulls two metrics of a group apart
    leaves each inside its own range."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    columns = []
    for period, base in ((40, 50.0), (90, 30.0)):
        level = base + 10 * np.sin(t / period) + rng.normal(0, 3, n)
        columns += [level + rng.normal(0, 0.5, n) for _ in range(6)]
    columns += [rng.normal(20, 2, n) for _ in range(4)]
    return np.column_stack(columns)


def test_residual_norm_l2_is_the_distance_from_the_subspace() -> None:
    values = _correlated_vm(2000, 0)
    model = ResidualModel.fit(values, components=1, spread_floor=1.0, norm="l2")
    contributions = model.contributions(values[:50])
    assert np.allclose(model.score_samples(values[:50]),
                       np.sqrt((contributions**2).sum(axis=1)))
    again = ResidualModel.from_dict(model.to_dict())
    assert again.norm == "l2"
    assert np.allclose(again.score_samples(values), model.score_samples(values))
    # An adaptation saved before the norm existed keeps the largest contribution.
    old = {k: v for k, v in model.to_dict().items() if k != "norm"}
    assert ResidualModel.from_dict(old).norm == "max"
    with pytest.raises(ValueError, match="norm"):
        ResidualModel.from_dict({**model.to_dict(), "norm": "l3"})


def test_best_ranking_prefers_the_earlier_score_on_ties() -> None:
    from vmad.trainer.adaptation import best_ranking

    labels = np.array([0, 0, 1, 1])
    good, bad = np.array([0.0, 0.1, 0.9, 1.0]), np.array([1.0, 0.9, 0.1, 0.0])
    assert best_ranking([bad, good], labels) == 1
    assert best_ranking([good, good * 2], labels) == 0
    assert best_ranking([good], np.ones(4)) == -1


def test_the_subspace_distance_catches_metrics_pulled_apart_without_labels(
        wide_checkpoint) -> None:
    """A fault that pulls two metrics that move together apart: each stays inside its
    own range, so the per-metric deviation ranks it poorly, and the distance from the
    subspace, which shares the unsupervised part by default, ranks it well. No label is
    used. On the agent's four default metrics no subspace is fitted."""
    from vmad.evaluation import roc_auc
    from vmad.trainer.adaptation import VMAdaptation
    from vmad.trainer.residual import SUBSPACE_VARIANCE

    assert AdaptationSettings().subspace_variance == SUBSPACE_VARIANCE
    history = _wide_vm(1500, 1)
    later = _wide_vm(800, 2)
    labels = np.zeros(len(later), dtype=np.int8)
    for start in range(100, 760, 60):
        later[start:start + 10, 0] += 10
        later[start:start + 10, 1] -= 10
        labels[start:start + 10] = 1
    common = dict(cnn_weight=0.0, false_alarm_rate=0.01)
    aucs = {}
    for variance in (0.0, SUBSPACE_VARIANCE):
        adaptation = fit_adaptation(wide_checkpoint.model, history, WINDOW,
                                    subspace_variance=variance, **common)
        normalized = adaptation.normalizer.apply(later)
        logits = predict_logits(wide_checkpoint.model, make_windows(normalized, WINDOW))
        aucs[variance] = roc_auc(labels[WINDOW - 1:],
                                 adaptation.score(logits, normalized[WINDOW - 1:]))
    assert aucs[SUBSPACE_VARIANCE] > 0.85 and aucs[0.0] < 0.75, aucs
    assert adaptation.subspace is not None and adaptation.fusion.sub_share == 0.5
    assert 1 <= len(adaptation.subspace.components) <= 8
    assert "subspace" in adaptation.describe()
    again = VMAdaptation.from_json(adaptation.to_json())
    assert again.subspace is not None and again.fusion == adaptation.fusion
    # A saved adaptation whose fusion and subspace disagree is refused, by name.
    import json

    broken = json.loads(adaptation.to_json())
    del broken["subspace"]
    with pytest.raises(ValueError, match="subspace"):
        VMAdaptation.from_json(json.dumps(broken))
    # One saved before the subspace existed loads as the per-metric deviation alone.
    del broken["fusion"]["sub_share"], broken["fusion"]["sub_center"], \
        broken["fusion"]["sub_scale"]
    old = VMAdaptation.from_json(json.dumps(broken))
    assert old.subspace is None and old.fusion.sub_share == 0.0
    # Fewer metrics than SUBSPACE_MIN_METRICS (the agent's 4, or 12): the deviation
    # stands alone.
    from vmad.trainer.residual import SUBSPACE_MIN_METRICS

    assert SUBSPACE_MIN_METRICS > 12
    for columns in ([0, 1, 8, 9], list(range(12))):
        assert ResidualModel.fit_normal_subspace(history[:, columns], SUBSPACE_VARIANCE) is None


def test_trainer_refits_carry_the_subspace_into_the_bundle(wide_checkpoint, tmp_path) -> None:
    """The trainer's adaptation (default settings) of a VM with 16 metrics fits the
    subspace on the VM's own history, and its bundle scores a pair pulled apart as the
    NumPy arithmetic does, above every normal window."""
    from vmad.trainer.transfer import VMModels

    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(wide_checkpoint, store, tmp_path / "models", TrainingSettings(),
                      adaptation=AdaptationSettings(warmup_samples=600, refresh_samples=600,
                                                    history_samples=1200))
    values = _wide_vm(900, 3)
    values[800:810, 0] += 30  # a clear break of the pair's usual relation
    values[800:810, 1] -= 30
    timestamps = 1_700_000_000.0 + 5.0 * np.arange(len(values))
    store.ingest("vm", wide_checkpoint.metrics, np.arange(1, 601), timestamps[:600],
                 values[:600])
    models.adapt("vm")
    adaptation = models.adaptation("vm")
    assert adaptation is not None and adaptation.subspace is not None
    windows = make_windows(values[600:], WINDOW)
    scores = models.bundle("vm").score(windows)
    normalized = adaptation.normalizer.apply(values[600:])
    logits = predict_logits(wide_checkpoint.model, make_windows(normalized, WINDOW))
    assert np.allclose(scores, adaptation.score(logits, normalized[WINDOW - 1:]), atol=1e-4)
    # The fault's windows score above every normal one.
    fault = np.zeros(len(scores), dtype=bool)
    fault[800 - 600 - WINDOW + 1:810 - 600 - WINDOW + 1] = True
    assert scores[fault].min() > scores[~fault].max()


def test_alarm_covered_marks_each_alarms_whole_window() -> None:
    """An alarm at t covers (t - span, t]; the search over sorted alarm times agrees with
    checking every alarm against every sample, at the edges too (unsorted alarms, alarms
    outside the samples, span 0)."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        timestamps = np.arange(rng.integers(0, 120), dtype=float) * 5.0
        alarms = rng.uniform(-50.0, 650.0, rng.integers(0, 12))
        if trial % 2 and len(timestamps):
            alarms = rng.choice(timestamps, size=min(len(timestamps), 8), replace=False)
        span = float(rng.choice([0.0, 5.0, 40.0, 320.0]))
        expected = np.zeros(len(timestamps), dtype=bool)
        for end in alarms:
            expected |= (timestamps > end - span) & (timestamps <= end)
        assert np.array_equal(alarm_covered(timestamps, alarms, span), expected), trial
    normal = np.array([False, True, False])
    assert alarm_covered(np.array([0.0, 5.0, 10.0]), np.array([10.0]), 20.0,
                         normal).tolist() == [True, False, True]


def _batch_vm(n: int, seed: int) -> np.ndarray:
    """16 metrics of a VM busy by turns: idle for 200 samples, then working flat out for
    50, and so on. Six follow the work (about 5 when idle, 95 busy: CPU, load, ...), six
    the job's memory (30 idle, 70 busy), four stay steady."""
    rng = np.random.default_rng(seed)
    busy = np.arange(n) % 250 >= 200
    work = [np.where(busy, 95.0, 5.0) + rng.normal(0, 1, n) for _ in range(6)]
    memory = [np.where(busy, 70.0, 30.0) + rng.normal(0, 0.5, n) for _ in range(6)]
    steady = [rng.normal(20.0, 0.5, n) for _ in range(4)]
    return np.column_stack(work + memory + steady)


def test_the_state_distance_catches_a_state_the_vm_is_never_in(wide_checkpoint) -> None:
    """A batch VM idles and works flat out by turns; between jobs a runaway process
    takes the work metrics flat out while the memory metrics stay at their idle level.
    The work reads like any busy period and memory like any idle one, so the per-metric
    deviation ranks the fault level with the busy windows; no usual state has both, so
    the distance from the nearest state ranks it above every normal window. No label is
    used. Its NumPy arithmetic equals the bundle's graph, it survives a save, and a save
    whose states and fusion disagree is refused by name. On the agent's 4 default
    metrics no states are fitted."""
    import json

    from vmad.evaluation import roc_auc
    from vmad.trainer.adaptation import VMAdaptation
    from vmad.trainer.states import NORMAL_STATES, STATES_MIN_METRICS, NormalStates

    assert AdaptationSettings().normal_states == NORMAL_STATES > 0
    history = _batch_vm(2000, 1)
    later = _batch_vm(1200, 2)
    labels = np.zeros(len(later), dtype=np.int8)
    for start in range(100, 1100, 250):
        later[start:start + 12, :6] = 95.0
        labels[start:start + 12] = 1
    aucs = {}
    for states in (0, NORMAL_STATES):
        adaptation = fit_adaptation(wide_checkpoint.model, history, WINDOW, cnn_weight=0.0,
                                    floors=2.0, false_alarm_rate=0.01,
                                    normal_states=states)
        normalized = adaptation.normalizer.apply(later)
        logits = predict_logits(wide_checkpoint.model, make_windows(normalized, WINDOW))
        aucs[states] = roc_auc(labels[WINDOW - 1:],
                               adaptation.score(logits, normalized[WINDOW - 1:]))
    assert aucs[NORMAL_STATES] > 0.99 and aucs[0] < 0.95, aucs
    # And over the threshold: most fault windows alarm, almost no normal one does.
    flagged = adaptation.score(logits, normalized[WINDOW - 1:]) >= adaptation.threshold
    truth = labels[WINDOW - 1:] == 1
    assert flagged[truth].mean() > 0.9 and flagged[~truth].mean() < 0.01, \
        (flagged[truth].mean(), flagged[~truth].mean())
    assert adaptation.states is not None and adaptation.fusion.state_share == 0.5
    assert 2 <= len(adaptation.states.centres) <= NORMAL_STATES
    assert "states" in adaptation.describe()
    bundle = export_bundle(wide_checkpoint, "adapted", adaptation=adaptation)
    scores = bundle.score(make_windows(later, WINDOW))
    assert np.allclose(scores, adaptation.score(logits, normalized[WINDOW - 1:]), atol=1e-4)
    again = VMAdaptation.from_json(adaptation.to_json())
    assert again.states is not None and again.fusion == adaptation.fusion
    assert np.array_equal(again.states.centres, adaptation.states.centres)
    broken = json.loads(adaptation.to_json())
    del broken["states"]
    with pytest.raises(ValueError, match="states"):
        VMAdaptation.from_json(json.dumps(broken))
    # One saved before the states existed loads without them.
    for key in ("state_share", "state_center", "state_scale"):
        del broken["fusion"][key]
    old = VMAdaptation.from_json(json.dumps(broken))
    assert old.states is None and old.fusion.state_share == 0.0
    broken = json.loads(adaptation.to_json())
    broken["states"]["centres"] = [[0.0, 1.0]]
    with pytest.raises(ValueError, match="centres"):
        VMAdaptation.from_json(json.dumps(broken))
    # Fewer metrics than STATES_MIN_METRICS (the agent's 4, or 12): no states.
    assert STATES_MIN_METRICS > 12
    for columns in ([0, 6, 12, 13], list(range(12))):
        narrow = history[:, columns]
        deviation = ResidualModel.fit(narrow, components=0, spread_floor=1.0)
        assert NormalStates.fit_usual(narrow, deviation, NORMAL_STATES) is None
    assert NormalStates.fit_usual(history, adaptation.residual, 0) is None


def test_normal_states_are_fitted_deterministically_and_only_used_centres_kept() -> None:
    from vmad.trainer.states import NormalStates

    values = np.repeat(np.array([[0.0, 0.0], [10.0, 10.0]]), 50, axis=0)
    deviation = ResidualModel.fit(values, components=0, spread_floor=1.0)
    states = NormalStates.fit(values, deviation, 16)
    # Two distinct points: k-means cannot hold more than two used centres.
    assert len(states.centres) <= 2
    assert np.allclose(states.score_samples(values), 0.0)
    again = NormalStates.fit(values, deviation, 16)
    assert np.array_equal(states.centres, again.centres)
    # Zero states is "off", which only `fit_usual` knows; a fit needs at least one.
    with pytest.raises(ValueError, match="normal states must be >= 1"):
        NormalStates.fit(values, deviation, 0)
    with pytest.raises(ValueError, match="normal states must be >= 0"):
        NormalStates.fit_usual(np.zeros((4, 16)), deviation, -1)
    # A sample 3 spreads off the nearest state in one metric scores 3.
    probe = np.array([[10.0 + 3 * deviation.spread[0], 10.0]])
    assert np.isclose(states.score_samples(probe)[0], 3.0)
    assert np.isclose(states.contributions(probe)[0, 0], 3.0)


def test_normal_states_keep_the_tightest_of_several_kmeans_starts() -> None:
    from scipy.cluster.vq import kmeans2

    from vmad.trainer.states import NormalStates

    # 24 blobs in 16 metrics summarized by 16 states: where k-means++ lands depends on
    # its draw, so single starts differ in how tightly their centres fit the samples.
    rng = np.random.default_rng(5)
    blobs = rng.normal(0.0, 6.0, size=(24, 16))
    values = np.repeat(blobs, 40, axis=0) + rng.normal(0.0, 0.5, size=(24 * 40, 16))
    deviation = ResidualModel.fit(values, components=0, spread_floor=1.0)
    units = (values - deviation.mean) / deviation.spread

    def inertia(centres: np.ndarray) -> float:
        distances = ((units[:, None, :] - centres[None]) ** 2).sum(axis=2)
        return float(distances.min(axis=1).sum())

    improved = 0
    for seed in range(6):
        fitted = inertia(NormalStates.fit(values, deviation, 16, seed=seed).centres)
        one_start, _ = kmeans2(units, 16, iter=10, minit="++", seed=np.random.default_rng(seed))
        assert fitted <= inertia(one_start) + 1e-9
        improved += fitted < inertia(one_start) - 1e-9
    assert improved > 0


def test_a_label_stored_during_a_refit_gets_a_refit_of_its_own(checkpoint, tmp_path) -> None:
    """A refit that is running read the VM's history before a label that arrives now: the
    label queues another refit; more samples during a refit do not (it sees them)."""
    import time

    from vmad.trainer.worker import ActionWorker

    store, models = _short_history_models(checkpoint, tmp_path)
    vm, _ = generate_vm(7, 300, fault_rate=0.0)
    store.ingest("vm", DEFAULT_METRICS, np.arange(1, 301), vm.timestamps, vm.values)
    worker = ActionWorker(models)
    worker.start()
    try:
        for after_running, generations in ((False, 1), (True, 2)):
            before = models.adaptation("vm").generation if models.adaptation("vm") else 0
            worker.submit_adaptation("vm")
            deadline = time.monotonic() + 30
            while worker.stats.running != "vm" and time.monotonic() < deadline:
                time.sleep(0.001)
            assert worker.stats.running == "vm"
            worker.submit_adaptation("vm", after_running=after_running)
            assert worker.wait_idle(60)
            assert models.adaptation("vm").generation - before == generations
    finally:
        worker.stop()


def test_a_label_refit_owed_when_the_trainer_stopped_runs_when_it_starts(checkpoint,
                                                                         tmp_path) -> None:
    """A label of normal stored but not yet fitted (the trainer stopped while its label
    refit waited) refits the VM when the next trainer starts on the same store and
    models; a label it has fitted, or one of a fault, does not."""
    from vmad.labels import LabelInterval
    from vmad.trainer.core import TrainerCore

    store, models = _short_history_models(checkpoint, tmp_path)
    vm, _ = generate_vm(7, 300, fault_rate=0.0)
    ts = vm.timestamps
    store.ingest("vm", DEFAULT_METRICS, np.arange(1, 301), ts, vm.values)
    store.add_labels("vm", [LabelInterval(float(ts[0]), float(ts[9]), False, "operator")])
    models.adapt("vm")  # has seen that label
    fault = LabelInterval(float(ts[50]), float(ts[59]), True, "operator")
    normal = LabelInterval(float(ts[100]), float(ts[149]), False, "operator")
    for stored, refits in (([], 0), ([fault], 0), ([normal], 1), ([], 0)):
        store.add_labels("vm", stored)  # as if the trainer died before refitting
        before = models.adaptation("vm").generation
        core = TrainerCore(store, models)
        core.start(None, 60.0)
        try:
            assert core.worker.wait_idle(60)
            assert models.adaptation("vm").generation - before == refits
            assert core.stats.label_refits == refits
        finally:
            core.stop()
    assert VMAdaptation.from_json(models.adaptation("vm").to_json()).labels_seen == 3


def test_a_refit_waiting_for_its_start_does_not_hold_back_the_vms_state_report(
        checkpoint, tmp_path) -> None:
    """A deferred label refit waits up to `label_refit_interval_s`; the VM's state is
    still reported meanwhile. A refit that is due, or a queued action, holds it back
    (the state is about to change)."""
    import time

    from vmad.actions import Action, Decision
    from vmad.trainer.core import TrainerCore

    store, models = _short_history_models(checkpoint, tmp_path)
    worker = TrainerCore(store, models).worker  # not started: nothing runs
    worker.submit_adaptation("waits", not_before=time.monotonic() + 60)
    worker.submit_adaptation("due")
    worker.submit("acts", Decision(Action.FINETUNE, 10))
    assert [worker.busy(vm) for vm in ("waits", "due", "acts", "idle")] == \
        [False, True, True, False]


def test_a_label_of_normal_refits_an_adapted_vm_at_once(checkpoint, tmp_path) -> None:
    """An operator's `vmad label --normal` (by the trainer's Label call, or shipped by
    the agent from its labels file) refits the VM now instead of at the next refresh;
    a label of a fault, or of a VM still in warm-up, waits for the schedule. Labels
    within `label_refit_interval_s` of the last label refit wait for one refit."""
    import time

    from vmad.labels import LabelInterval
    from vmad.trainer.core import TrainerCore

    store, models = _short_history_models(checkpoint, tmp_path)
    interval = 3.0
    models.adaptation_settings = models.adaptation_settings.model_copy(
        update={"label_refit_interval_s": interval})
    core = TrainerCore(store, models)
    core.worker.start()
    try:
        vm, _ = generate_vm(7, 400, fault_rate=0.0)
        seqs, ts = np.arange(1, 401), vm.timestamps

        def normal(first: int, last: int, anomalous: bool = False) -> list[LabelInterval]:
            return [LabelInterval(float(ts[first]), float(ts[last]), anomalous, "operator")]

        core.add_labels("vm", normal(0, 10))  # warm-up: nothing to refit yet
        core.ingest("vm", DEFAULT_METRICS, seqs[:300], ts[:300], vm.values[:300])
        assert core.worker.wait_idle(60) and models.adaptation("vm").generation == 1
        core.add_labels("vm", normal(100, 150))
        labelled_at = time.monotonic()
        assert core.worker.wait_idle(60) and models.adaptation("vm").generation == 2
        assert (core.stats.label_refits, core.stats.label_refits_deferred) == (1, 0)
        # Shipped by the agent with a batch: 10 samples, far from the next refresh, and
        # within the interval of the last label refit: it waits for the interval.
        core.ingest("vm", DEFAULT_METRICS, seqs[300:310], ts[300:310], vm.values[300:310],
                    labels=normal(200, 250))
        for first in range(5):  # a flood of labels joins that one waiting refit
            core.add_labels("vm", normal(first, first + 1))
        assert models.adaptation("vm").generation == 2
        assert core.worker.wait_idle(60) and models.adaptation("vm").generation == 3
        assert time.monotonic() - labelled_at >= interval
        assert (core.stats.label_refits, core.stats.label_refits_deferred) == (1, 6)
        core.add_labels("vm", normal(260, 270, anomalous=True))
        core.ingest("vm", DEFAULT_METRICS, seqs[310:320], ts[310:320], vm.values[310:320])
        assert core.worker.wait_idle(60) and models.adaptation("vm").generation == 3
    finally:
        core.worker.stop()


def test_a_vm_with_metrics_of_its_own_gets_a_detector_that_reads_them_all(
        checkpoint, tmp_path) -> None:
    """A VM that reports the network's 4 metrics and 16 of its own: its warm-up bundle
    takes all 20 (raising no alarm), its adaptation fits statistics, the subspace and the
    states on all 20, the network reads its own 4 columns, and a fault on two of its own
    metrics that the network cannot see scores above every normal window. A fine-tune
    trains the network on its own columns and keeps the VM's statistics."""
    from vmad.labels import LabelInterval
    from vmad.trainer.transfer import VMModels

    own = tuple(f"app.m{i}" for i in range(16))
    metrics = checkpoint.metrics + own
    store = TelemetryStore(tmp_path / "s.sqlite")
    models = VMModels(checkpoint, store, tmp_path / "models", TrainingSettings(),
                      adaptation=AdaptationSettings(warmup_samples=600, refresh_samples=600,
                                                    history_samples=1200))
    narrow = generate_vm(7, 900)[0].select(DEFAULT_METRICS).values
    values = np.column_stack([narrow, _wide_vm(900, 5)])
    values[800:810, 4] += 30  # two of the VM's own metrics pulled apart
    values[800:810, 5] -= 30
    timestamps = 1_700_000_000.0 + 5.0 * np.arange(len(values))
    store.ingest("vm", metrics, np.arange(1, 601), timestamps[:600], values[:600])
    assert models.vm_metrics("vm") == metrics
    warmup = models.bundle("vm")
    assert warmup.metadata.metrics == metrics and warmup.metadata.warmup
    assert warmup.metadata.version.endswith("-20metrics-warmup")
    assert models.bundle("other") is models.pretrained_bundle  # a VM not yet seen
    models.adapt("vm")
    adaptation = models.adaptation("vm")
    assert adaptation is not None
    assert adaptation.subspace is not None and adaptation.states is not None
    assert len(adaptation.normalizer.center) == 20
    bundle = models.bundle("vm")
    assert bundle.metadata.metrics == metrics and not bundle.metadata.warmup
    windows = make_windows(values[600:], WINDOW)
    scores = bundle.score(windows)
    normalized = adaptation.normalizer.apply(values[600:])
    # The network on its own columns, as the bundle's graph runs it.
    logits = predict_logits(checkpoint.model, make_windows(normalized[:, :4], WINDOW))
    assert np.allclose(scores, adaptation.score(logits, normalized[WINDOW - 1:]), atol=1e-4)
    fault = np.zeros(len(scores), dtype=bool)
    fault[800 - 600 - WINDOW + 1:810 - 600 - WINDOW + 1] = True
    assert scores[fault].min() > scores[~fault].max()
    state = models.state("vm")
    assert len(state.summary) == 2 * len(metrics)
    # A fine-tune on the VM's labelled windows trains the 4-metric network.
    labels = np.zeros(len(values), dtype=np.int8)
    labels[700:720] = 1
    store.ingest("vm", metrics, np.arange(601, 901), timestamps[600:], values[600:])
    store.add_labels("vm", [LabelInterval(timestamps[0], timestamps[699], False),
                            LabelInterval(timestamps[700], timestamps[719], True)])
    outcome = models.finetune("vm", 5)
    assert outcome.action == "finetune" and outcome.batches > 0
    tuned = models.checkpoint("vm")
    assert tuned.metrics == checkpoint.metrics and len(tuned.normalizer.center) == 4
    assert models.bundle("vm").metadata.metrics == metrics


def test_own_metric_floors_go_by_the_first_pattern_that_matches(checkpoint, tmp_path,
                                                                 caplog) -> None:
    import pydantic

    from vmad.schema import DEFAULT_SCALE_FLOORS
    from vmad.trainer.transfer import VMModels

    settings = AdaptationSettings(own_metric_floors={"app.m1": 7.0, "app.m1*": 5.0,
                                                     "app.*": 2.0})
    models = VMModels(checkpoint, TelemetryStore(tmp_path / "s.sqlite"), tmp_path / "m",
                      TrainingSettings(), adaptation=settings)
    metrics = (*checkpoint.metrics, "app.m0", "app.m1", "app.m10", "other")
    assert models._scale_floors(metrics) == [*DEFAULT_SCALE_FLOORS, 2.0, 7.0, 5.0, 0.0]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(pydantic.ValidationError, match="own_metric_floors"):
            AdaptationSettings(own_metric_floors={"app.*": bad})
    # An own metric with no floor that never moved is named in the log at its fit.
    values = np.column_stack([generate_vm(3, 300)[0].select(DEFAULT_METRICS).values,
                              np.full(300, 7.0), np.zeros(300)])
    timestamps = 1_700_000_000.0 + 5.0 * np.arange(300)
    models.store.ingest("vm", (*checkpoint.metrics, "app.m0", "other.idle"),
                        np.arange(1, 301), timestamps, values)
    with caplog.at_level("WARNING", logger="vmad.trainer.transfer"):
        models.adapt("vm")
    assert "1 of its own metrics barely moved" in caplog.text  # app.m0 has a floor
    assert "other.idle" in caplog.text and "own_metric_floors" in caplog.text


def test_bundles_exported_at_once_from_several_threads_all_verify(checkpoint) -> None:
    """The worker adapting one VM while bundle watches export others': torch's ONNX
    export keeps global state, so exports take turns."""
    from concurrent.futures import ThreadPoolExecutor

    from vmad.bundle import Bundle

    with ThreadPoolExecutor(4) as pool:
        bundles = list(pool.map(lambda i: export_bundle(checkpoint, f"v{i}"), range(8)))
    for bundle in bundles:
        Bundle.from_parts(bundle.metadata.to_json(), bundle.onnx_bytes)
