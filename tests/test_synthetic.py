"""The synthetic source: reproducible, in range, faults labelled where they change the data."""

from __future__ import annotations

import numpy as np
import pytest

from vmad.schema import DEFAULT_METRICS
from vmad.synthetic import FAULT_KINDS, generate_fleet, generate_vm, inject_faults


def test_same_seed_same_series_other_seed_differs() -> None:
    a, faults_a = generate_vm(7, 3000)
    b, faults_b = generate_vm(7, 3000)
    c, _ = generate_vm(8, 3000)
    np.testing.assert_array_equal(a.values, b.values)
    assert faults_a == faults_b
    assert not np.array_equal(a.values, c.values)


def test_ranges_and_metrics() -> None:
    for series in generate_fleet(0, 8, 4000):
        assert series.metrics == DEFAULT_METRICS
        assert np.isfinite(series.values).all()
        assert (series.values >= 0).all() and (series.values[:, :2] <= 100).all()
        assert (np.diff(series.timestamps) == 5).all()


def test_fault_rate_is_roughly_honoured() -> None:
    shares = [generate_vm(s, 30_000, fault_rate=0.05)[0].labels.mean() for s in range(10)]
    assert 0.02 < np.mean(shares) < 0.09
    clean, faults = generate_vm(1, 5000, fault_rate=0.0)
    assert faults == [] and not clean.labels.any()


@pytest.mark.parametrize("kind", sorted(FAULT_KINDS))
def test_each_fault_moves_its_metrics(kind: str) -> None:
    """Inject one kind with a fixed seed, and compare with the same VM without faults:
    the labelled span is exactly where the named metrics were changed."""
    faulty, faults = generate_vm(11, 8000, fault_rate=0.1, fault_kinds=(kind,), profile="web")
    clean, _ = generate_vm(11, 8000, fault_rate=0.0, profile="web")
    assert faults and all(f.kind == kind for f in faults)
    labelled = faulty.labels.astype(bool)
    for fault in faults:
        assert labelled[fault.start:fault.stop].all()
        for metric in fault.metrics:
            j = DEFAULT_METRICS.index(metric)
            assert faulty.values[fault.start:fault.stop, j].mean() > \
                clean.values[fault.start:fault.stop, j].mean()


def test_faults_injected_into_a_given_trace_change_it_only_where_labelled() -> None:
    """As bench/normalization.py --real does with a real VM's trace: the labels mark
    exactly the samples the faults changed, and the same seed injects the same faults."""
    trace = generate_vm(3, 20_000, fault_rate=0.0, profile="database")[0].values
    trace = trace.astype(np.float64)
    faulty = trace.copy()
    labels, faults = inject_faults(faulty, np.random.default_rng(5))
    again = trace.copy()
    assert inject_faults(again, np.random.default_rng(5))[1] == faults
    np.testing.assert_array_equal(again, faulty)
    changed = (faulty != trace).any(axis=1)
    assert faults and 0.02 < labels.mean() < 0.09
    assert not changed[labels == 0].any()
    assert changed[labels == 1].mean() > 0.9
    with pytest.raises(ValueError, match="values"):
        inject_faults(np.zeros((100, 3)), np.random.default_rng(0))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fault_rate"):
        generate_vm(0, 100, fault_rate=1.5)
    with pytest.raises(ValueError, match="unknown fault kinds"):
        generate_vm(0, 100, fault_kinds=("meteor",))
