"""Trainer internals without processes: the per-VM store, the state vector, per-VM
models and the action worker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vmad.actions import Action, Decision
from vmad.state import compute_state, drift_score
from vmad.trainer.store import LabelInterval, TelemetryStore
from vmad.windows import Normalizer

METRICS = ("cpu_percent", "memory_percent", "disk_mb_s", "net_mb_s")


def _batch(first: int, n: int, t0: float = 0.0, anomalous: bool = False):
    seqs = np.arange(first, first + n)
    ts = t0 + seqs * 5.0
    rng = np.random.default_rng(first)
    values = rng.normal(30, 3, size=(n, 4)).astype(np.float32)
    if anomalous:
        values[:, 1] += 40
    return seqs, ts, values


def test_store_deduplicates_and_acks(tmp_path) -> None:
    store = TelemetryStore(tmp_path / "s.sqlite", max_samples=50, prune_every=10)
    r = store.ingest("vm", METRICS, *_batch(1, 10))
    assert (r.stored, r.duplicates, r.lost, r.acked) == (10, 0, 0, 10)
    r = store.ingest("vm", METRICS, *_batch(6, 10))  # half replayed
    assert (r.stored, r.duplicates, r.acked) == (5, 5, 15)
    r = store.ingest("vm", METRICS, *_batch(20, 5))  # 16..19 dropped by the agent
    assert (r.stored, r.lost, r.acked) == (5, 4, 24)
    store.close()
    again = TelemetryStore(tmp_path / "s.sqlite", max_samples=50, prune_every=10)
    r = again.ingest("vm", METRICS, *_batch(1, 24))  # a restart: everything replayed
    assert (r.stored, r.duplicates) == (0, 24)
    counters = again.counters("vm")
    assert counters is not None
    assert (counters.received, counters.duplicates, counters.lost) == (20, 29, 4)
    with pytest.raises(ValueError, match="metrics"):
        again.ingest("vm", METRICS[:3], np.array([30]), np.array([1.0]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shape"):
        again.ingest("vm", METRICS, np.array([30]), np.array([1.0]), np.zeros((1, 3)))


def test_store_is_bounded_and_labels_override(tmp_path) -> None:
    store = TelemetryStore(tmp_path / "s.sqlite", max_samples=30, max_verdicts=5,
                           max_labels=2, prune_every=10)
    for first in range(1, 101, 10):
        seqs, ts, values = _batch(first, 10)
        store.ingest("vm", METRICS, seqs, ts, values,
                     verdicts=[(float(t), 0.1, False, "v1") for t in ts])
    recent = store.recent("vm")
    assert len(recent) <= 30 + 10 and recent.seqs[-1] == 100
    assert np.all(np.diff(recent.seqs) == 1)
    assert len(store.verdicts("vm")[0]) <= 5 + 10
    store.add_labels("vm", [LabelInterval(0, 1000, False, "op"),
                            LabelInterval(100, 200, True, "inject")])
    labels = store.labels_at("vm", np.array([50.0, 150.0, 5000.0]))
    assert labels.tolist() == [0, 1, -1]
    store.add_labels("vm", [LabelInterval(140, 160, False, "op")])
    assert len(store.label_intervals("vm")) == 2  # the oldest went
    assert store.labels_at("vm", np.array([150.0])).tolist() == [0]


def test_drift_and_state() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(10, 2, size=(500, 4))
    normalizer = Normalizer.fit(base)
    assert drift_score(base, normalizer) < 0.2
    assert drift_score(base + 20, normalizer) > 5
    state = compute_state(
        "vm", timestamp=100.0, recent_values=base, normalizer=normalizer,
        probabilities=np.array([0.9, 0.1, 0.8, 0.2]), labels=np.array([1, 0, 0, 0]),
        threshold=0.5, agent_verdicts=[True, False], recent_windows=10,
        last_trained_at=None, samples_since_training=5, batches_trained=0, finetuned=False,
        model_version="m")
    assert state.accuracy == pytest.approx(0.75)
    assert state.f1 == pytest.approx(2 / 3)
    assert state.flagged_share == 0.5 and state.labelled_windows == 4
    assert len(state.summary) == 8 and math.isinf(state.seconds_since_training)


@pytest.fixture
def tiny_models(tmp_path):
    from vmad.trainer.checkpoint import Checkpoint
    from vmad.trainer.config import TrainingSettings
    from vmad.trainer.models import build_model
    from vmad.trainer.transfer import VMModels

    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit(rng.normal(30, 3, size=(200, 4)))
    pretrained = Checkpoint(build_model("mlp", 4, 8), "mlp", METRICS, 8, normalizer, 0.5)
    store = TelemetryStore(tmp_path / "s.sqlite")
    settings = TrainingSettings(batch_size=16, max_windows=400, assume_normal_unlabelled=True)
    return VMModels(pretrained, store, tmp_path / "models", settings), store


def test_finetune_reset_and_worker(tiny_models, tmp_path) -> None:
    from vmad.trainer.transfer import VMModels
    from vmad.trainer.worker import ActionWorker

    models, store = tiny_models
    for first in range(1, 301, 50):
        seqs, ts, values = _batch(first, 50, anomalous=first >= 251)
        store.ingest("vm", METRICS, seqs, ts, values)
    store.add_labels("vm", [LabelInterval(251 * 5.0, 300 * 5.0, True, "inject")])
    data = models.labelled_windows("vm")
    assert data.raw.shape == (300 - 8 + 1, 4, 8) and data.labels.sum() == 50
    before = models.state("vm")
    assert before.labelled_windows == 293 and not before.finetuned

    done = []
    worker = ActionWorker(models, on_done=done.append)
    worker.start()
    worker.submit("vm", Decision(Action.KEEP))
    worker.submit("vm", Decision(Action.FINETUNE, 30))
    assert worker.wait_idle(60)
    (outcome,) = done
    assert outcome.batches == 30 and outcome.version.endswith("-ft1")
    assert models.bundle("vm").metadata.version == outcome.version
    after = models.state("vm")
    assert after.finetuned and after.batches_trained == 30 and after.seconds_since_training < 60
    assert after.f1 >= before.f1

    # A restarted trainer serves the same fine-tuned model.
    reopened = VMModels(models.pretrained, store, tmp_path / "models", models.settings)
    assert reopened.bundle("vm").metadata.onnx_sha256 == outcome.bundle.metadata.onnx_sha256

    worker.submit("vm", Decision(Action.RESET))
    assert worker.wait_idle(30)
    assert models.bundle("vm") is models.pretrained_bundle and not models.state("vm").finetuned
    worker.stop()
    assert worker.stats.failed == 0


def test_core_loop_trains_and_offers_the_new_bundle(tiny_models, tmp_path) -> None:
    """Trainer and controller logic wired together in one process (no gRPC)."""
    from vmad.controller.core import ControlCore
    from vmad.controller.policy import RulePolicy, RuleSettings
    from vmad.controller.registry import Registry
    from vmad.trainer.core import TrainerCore

    models, store = tiny_models
    core = TrainerCore(store, models)
    control = ControlCore(Registry(tmp_path / "r.sqlite"),
                          RulePolicy(RuleSettings(min_labelled=10, finetune_batches=20,
                                                  min_f1=1.01)))
    with pytest.raises(ValueError, match="metrics"):
        core.ingest("vm", METRICS[::-1], *_batch(1, 4))
    for first in range(1, 201, 50):
        seqs, ts, values = _batch(first, 50, anomalous=first >= 151)
        core.ingest("vm", METRICS, seqs, ts, values,
                    labels=[LabelInterval(151 * 5.0, 200 * 5.0, True, "inject")]
                    if first == 151 else ())
    core.start(None, 1.0)
    pretrained = models.pretrained_bundle.metadata.version
    assert pretrained.endswith("-warmup")
    assert core.next_bundle("vm", "something-else", 0.1).metadata.version == pretrained
    assert core.next_bundle("vm", pretrained, 0.05) is None
    answered = core.report_round(lambda state: control.report("t1", state)[1])
    assert [(vm, d.action) for vm, d in answered] == [("vm", Action.FINETUNE)]
    bundle = core.next_bundle("vm", pretrained, 60)
    assert bundle is not None and bundle.metadata.version.endswith("-ft1")
    core.stop()
    assert control.registry.counts()["decisions"] == 1


def test_report_round_survives_an_unreachable_controller(tiny_models) -> None:
    from vmad.trainer.core import TrainerCore

    models, store = tiny_models
    core = TrainerCore(store, models)
    core.ingest("vm", METRICS, *_batch(1, 20))

    def down(state):
        raise ConnectionError("controller unreachable\ndetails")

    assert core.report_round(down) == []
    assert core.stats.failures == 1 and core.stats.last_error == "controller unreachable"
    # Serving goes on: the next batch is stored and acknowledged.
    assert core.ingest("vm", METRICS, *_batch(21, 5)).acked == 25
