"""The label-free validation set (synthetic faults injected into a VM's own samples,
real labels weighted up) and the control environment measuring its reward and state on
it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vmad.controller.env import EnvSettings, VMLifeEnv, make_stream
from vmad.controller.validation import injected_validation, validation_quality
from vmad.synthetic import generate_vm


def _quiet_vm() -> np.ndarray:
    series, _ = generate_vm(5, 2000, fault_rate=0.0, profile="web")
    return series.values


def test_faults_are_injected_into_the_vms_own_samples_and_real_labels_weigh_more() -> None:
    values = _quiet_vm()
    real = np.zeros(len(values), dtype=np.int8)
    real[100:160] = 1
    a = injected_validation(values, real, 5.0, seed=1, fault_share=0.15, real_weight=5)
    b = injected_validation(values, real, 5.0, seed=1, fault_share=0.15, real_weight=5)
    np.testing.assert_array_equal(a.values, b.values)  # the same seed, the same set
    injected = a.labels.astype(bool) & ~real.astype(bool)
    assert 0.1 <= injected.mean() <= 0.35
    # Outside injected spans the VM's samples are untouched; inside, they changed.
    np.testing.assert_array_equal(a.values[~injected], values[~injected])
    assert np.abs(a.values[injected] - values[injected]).max() > 5
    # Real labels stay, count 5 times, and no fault is injected into a real incident.
    assert a.labels[100:160].all() and (a.weights[100:160] == 5).all()
    assert (a.weights[~real.astype(bool)] == 1).all()
    assert (a.values[100:160] == values[100:160]).all()
    # No labels at all is fine: the set is all synthetic.
    none = injected_validation(values, None, 5.0, seed=2)
    assert none.labels.any() and (none.weights == 1).all()

    # A detector that flags exactly the anomalous samples is perfect on it; one that
    # misses the real incident loses five times what a synthetic one costs.
    labels = a.labels.astype(bool)
    perfect = validation_quality(labels.astype(float), a.labels, a.weights, 0.5)
    assert perfect[:2] == (1.0, 1.0)
    blind_real = labels.copy()
    blind_real[100:160] = False
    blind_synthetic = labels.copy()
    first = np.flatnonzero(injected)[:60]
    blind_synthetic[first] = False
    worse = validation_quality(blind_real.astype(float), a.labels, a.weights, 0.5)[1]
    milder = validation_quality(blind_synthetic.astype(float), a.labels, a.weights, 0.5)[1]
    assert worse < milder < 1.0


def test_env_measures_reward_and_state_on_the_injected_set_without_labels() -> None:
    tiny = EnvSettings(kind="mlp", window=16, steps=3, step_samples=60, warmup_samples=240,
                       mean_regime_steps=2.0, max_windows=300, pretrain_batches=30,
                       smd_share=0.0)
    labelled, free = VMLifeEnv(tiny), VMLifeEnv(replace(tiny, validation="injected",
                                                        label_share=0.0))
    try:
        seed = next(s for s in range(100)
                    if make_stream(s, "train", tiny).labels[:tiny.warmup_samples].any())
        for env in (labelled, free):
            env.reset(seed=seed)
        # The same stream, but nobody labelled anything: the trainer got no labels, and
        # the state's quality comes from the injected set.
        assert labelled.stream.labels.any()
        assert not free._operator_labels().any()
        assert free.models.state("vm", now=2e9).labelled_anomalous_share == 0.0
        quality = [(e.last_state.accuracy, e.last_state.f1, e.last_state.loss)
                   for e in (free, labelled)]
        assert quality[0] != quality[1]
        assert free.last_state.labelled_windows > 0
        for action in (0, 2, 0):
            _, r_free, _, _, i_free = free.step(action)
            _, _, _, _, i_lab = labelled.step(action)
            # The verdicts are judged against the true labels either way (the bench's
            # F1); only what the reward measures differs.
            assert i_free["tp"] + i_free["fn"] == i_lab["tp"] + i_lab["fn"]
            assert 0.0 <= r_free <= 1.0
        assert (i_free["r1"], i_free["r2"]) != (i_lab["r1"], i_lab["r2"])
    finally:
        labelled.close()
        free.close()
