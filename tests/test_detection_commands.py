"""`vmad pretrain`, `vmad finetune` and `vmad bench detection --quick`, run as operators
run them (the installed entry point, real files), on generated VMs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vmad.bundle import load_bundle
from vmad.series import read_series, write_series
from vmad.synthetic import generate_vm
from vmad.windows import make_windows

ROOT = Path(__file__).resolve().parent.parent


def vmad(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "vmad"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("series")
    # Seeds whose test parts hold faults both in the fine-tuning head and in the scored
    # tail (with none in the tail there is nothing to score; see vmad.synthetic).
    for i, seed in enumerate((103, 104, 109)):
        folder = root / f"vm-{i}"
        folder.mkdir()
        # One VM's life: the first half unlabelled (train part), the second labelled.
        vm, _ = generate_vm(seed, 6000, fault_rate=0.08)
        write_series(folder / "train.csv.gz", replace(vm.slice(0, 3000), labels=None))
        write_series(folder / "test.csv.gz", vm.slice(3000))
    return root


def test_bench_detection_quick_writes_the_documented_json(series_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "detection.json"
    result = vmad("bench", "detection", "--quick", "--data", str(series_dir),
                  "--detectors", "zoom-cnn,mlp,pca", "--json", str(out),
                  "--markdown", str(tmp_path / "detection.md"))
    assert "| zoom-cnn |" in (tmp_path / "detection.md").read_text()
    assert "MEAN" in result.stdout and "point F1" in result.stdout
    data = json.loads(out.read_text())
    keys = {"point_f1", "event_f1", "precision", "recall", "false_alarm_rate", "auc"}
    assert set(data["mean"]) == {"zoom-cnn", "mlp", "pca"}
    assert set(data["series"]) == {"vm-0", "vm-1", "vm-2"}
    for detector, scores in data["mean"].items():
        assert keys <= set(scores), detector
        assert all(0.0 <= scores[k] <= 1.0 for k in keys - {"auc"})
    # Synthetic faults are large: even at --quick sizes the detectors rank them better
    # than chance on average (one VM's tail holds fault kinds its head never showed).
    assert data["mean"]["pca"]["auc"] > 0.6
    assert data["mean"]["zoom-cnn"]["auc"] > 0.6


def test_unknown_detector_is_a_usage_error(series_dir: Path) -> None:
    command = [str(Path(sys.executable).parent / "vmad"), "bench", "detection", "--quick",
               "--data", str(series_dir), "--detectors", "zoom-cnn,lstm"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "lstm" in result.stderr and "Traceback" not in result.stderr


def test_network_weight_out_of_range_is_a_usage_error(series_dir: Path) -> None:
    command = [str(Path(sys.executable).parent / "vmad"), "bench", "detection", "--quick",
               "--data", str(series_dir), "--detectors", "fused", "--weight-rule", "fixed",
               "--cnn-weight", "1.5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--cnn-weight" in result.stderr
    assert "Traceback" not in result.stderr


def test_pretrain_then_finetune_then_bundle(tmp_path: Path) -> None:
    vmad("pretrain", "--out", str(tmp_path / "pre"), "--bundle", str(tmp_path / "pre-bundle"),
         "--synthetic-vms", "2", "--synthetic-samples", "2000", "--window", "32",
         "--batches", "20", "--seed", "3")
    series, _ = generate_vm(9, 2000, fault_rate=0.1)
    write_series(tmp_path / "vm.csv", series)
    vmad("finetune", "--from", str(tmp_path / "pre"), "--data", str(tmp_path / "vm.csv"),
         "--out", str(tmp_path / "tuned"), "--bundle", str(tmp_path / "tuned-bundle"),
         "--batches", "10")
    pretrained = load_bundle(tmp_path / "pre-bundle")
    tuned = load_bundle(tmp_path / "tuned-bundle", expect_metrics=series.metrics,
                        expect_window=32)
    assert tuned.metadata.onnx_sha256 != pretrained.metadata.onnx_sha256
    windows = np.ascontiguousarray(make_windows(read_series(tmp_path / "vm.csv").values, 32)
                                   [:50].astype(np.float32))
    scores = tuned.score(windows)
    assert scores.shape == (50,) and np.all((scores >= 0) & (scores <= 1))


def test_finetune_on_one_class_keeps_the_pretrained_threshold(tmp_path: Path) -> None:
    """Labels of one class give no best-F1 threshold: all anomalous would pick one that
    flags every window. The fine-tune keeps the checkpoint's threshold and says so."""
    from vmad.trainer.checkpoint import load_checkpoint

    vmad("pretrain", "--out", str(tmp_path / "pre"), "--synthetic-vms", "1",
         "--synthetic-samples", "1000", "--window", "16", "--batches", "5")
    series, _ = generate_vm(9, 500)
    write_series(tmp_path / "vm.csv", replace(series, labels=np.ones(500, dtype=np.int8)))
    result = vmad("finetune", "--from", str(tmp_path / "pre"), "--data",
                  str(tmp_path / "vm.csv"), "--out", str(tmp_path / "tuned"),
                  "--batches", "3")
    pretrained = load_checkpoint(tmp_path / "pre").threshold
    assert load_checkpoint(tmp_path / "tuned").threshold == pytest.approx(pretrained)
    assert "threshold kept" in result.stderr and "one class" in result.stderr


def test_finetune_needs_labels(tmp_path: Path) -> None:
    vmad("pretrain", "--out", str(tmp_path / "pre"), "--synthetic-vms", "1",
         "--synthetic-samples", "1000", "--window", "16", "--batches", "5")
    series, _ = generate_vm(9, 500)
    write_series(tmp_path / "vm.csv", replace(series, labels=None))
    command = [str(Path(sys.executable).parent / "vmad"), "finetune", "--from",
               str(tmp_path / "pre"), "--data", str(tmp_path / "vm.csv"), "--out",
               str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "label" in result.stderr
    assert "Traceback" not in result.stderr


def test_label_free_rows_under_both_head_rules(series_dir: Path) -> None:
    """The labelled protocol's label-free rows: refit on the head's normal samples with
    the false-alarm target (default) or the head's best-F1 threshold; both give scores,
    and `fused` reports the network weight it picked."""
    from vmad.trainer.evaluate import QUICK, run_detection_benchmark

    rows = ("residual", "subspace", "fused")
    results = {rule: run_detection_benchmark(series_dir, rows, replace(QUICK, head_rule=rule))
               for rule in ("refit", "best_f1")}
    for rule, data in results.items():
        for detector in rows:
            scores = data["mean"][detector]
            assert 0.0 <= scores["point_f1"] <= 1.0, (rule, detector)
            assert scores["auc"] > 0.6, (rule, detector)
        assert 0.0 <= data["mean"]["fused"]["cnn_weight"] <= 1.0
    unlabelled = run_detection_benchmark(series_dir, ("fused",), replace(QUICK, labels="none"))
    assert 0.0 <= unlabelled["mean"]["fused"]["cnn_weight"] <= 1.0
    with pytest.raises(ValueError, match="head_rule"):
        run_detection_benchmark(series_dir, ("residual",), replace(QUICK, head_rule="x"))


def test_normal_head_keeps_a_window_clear_of_every_event() -> None:
    from vmad.trainer.evaluate import _normal_head

    labels = np.zeros(40, dtype=np.int8)
    labels[20:23] = 1
    keep = _normal_head(labels, 4)
    # Samples 17..25 lie within a window's length (4) of the event 20..22: not kept.
    assert keep[:17].all() and not keep[17:26].any() and keep[26:].all()


def _drifting_folder(root: Path) -> Path:
    """A VM whose normal drifts slowly through its test part (one metric climbs ten
    spreads, no label), with one labelled fault near the end."""
    from vmad.series import Series

    rng = np.random.default_rng(7)
    folder = root / "drifting"
    folder.mkdir()
    metrics = ("a", "b", "c")
    # Usage metrics are >= 0: noise around 50.
    train = rng.normal(50.0, 1.0, (2000, 3))
    test = rng.normal(50.0, 1.0, (3000, 3))
    test[:, 0] += np.linspace(0.0, 10.0, 3000)
    labels = np.zeros(3000, dtype=np.int8)
    test[2700:2760, 1] += 20.0
    labels[2700:2760] = 1
    stamps = np.arange(5000, dtype=np.int64) * 60
    write_series(folder / "train.csv.gz", Series("train", stamps[:2000],
                                                 train.astype(np.float32), metrics))
    write_series(folder / "test.csv.gz", Series("test", stamps[2000:],
                                                test.astype(np.float32), metrics, labels))
    return root


def test_refits_follow_a_drifting_normal_as_the_trainer_does(tmp_path: Path) -> None:
    """Refitted on the trainer's schedule (every `refresh` samples on the newest
    `history` outside earlier alarms), the deviation follows a slow drift of the VM's
    normal that one fit on the train part alarms on, and still catches the fault."""
    from vmad.trainer.evaluate import QUICK, run_detection_benchmark

    data = _drifting_folder(tmp_path)
    once = run_detection_benchmark(data, ("residual",), replace(QUICK, refresh=0))
    refitted = run_detection_benchmark(data, ("residual",),
                                       replace(QUICK, refresh=200, history=600))
    once_scores, refit_scores = once["mean"]["residual"], refitted["mean"]["residual"]
    assert once_scores["false_alarm_rate"] > 0.2 and "refits" not in once_scores
    assert refit_scores["false_alarm_rate"] < 0.02
    assert refit_scores["recall"] > 0.5
    # Refits whose segment reaches the scored tail: (3000 - 0) / 200, less the head's.
    assert refit_scores["refits"] == 11
    with pytest.raises(ValueError, match="refresh"):
        run_detection_benchmark(data, ("residual",), replace(QUICK, refresh=-1))
