"""The pretrained model shipped in the package: loads, verifies, agrees with its checkpoint,
is a warm-up bundle (never alarms), and, adapted without labels on a VM's first hour as
the trainer does, detects faults on a VM it never saw with few false alarms."""

from __future__ import annotations

import numpy as np

from vmad.bundle import load_default_bundle
from vmad.evaluation import score_detection
from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW
from vmad.synthetic import generate_vm
from vmad.trainer.checkpoint import load_default_checkpoint
from vmad.trainer.training import predict_proba
from vmad.windows import make_windows, window_labels


def test_bundle_and_checkpoint_agree() -> None:
    bundle = load_default_bundle()
    checkpoint = load_default_checkpoint()
    assert bundle.metadata.metrics == DEFAULT_METRICS == checkpoint.metrics
    assert bundle.metadata.window == DEFAULT_WINDOW == checkpoint.window
    assert bundle.metadata.threshold == checkpoint.threshold
    assert bundle.metadata.warmup  # pooled statistics: the agent raises no alarm on it
    calibration = checkpoint.provenance["calibration"]
    assert calibration["false_alarm_rate"] <= 2 * calibration["target_false_alarm_rate"]
    raw = np.random.default_rng(0).uniform(0, 100, (64, 4, DEFAULT_WINDOW)).astype(np.float32)
    normalized = checkpoint.normalizer.apply(raw.transpose(0, 2, 1)).transpose(0, 2, 1)
    expected = predict_proba(checkpoint.model, np.ascontiguousarray(normalized))
    np.testing.assert_allclose(bundle.score(raw), expected, atol=1e-5)


def test_adapted_without_labels_detects_faults_on_an_unseen_vm() -> None:
    from vmad.schema import DEFAULT_SCALE_FLOORS
    from vmad.trainer.adaptation import fit_adaptation
    from vmad.trainer.config import AdaptationSettings
    from vmad.trainer.export import export_bundle

    # Seed 903 is outside the pretraining and calibration fleets (SeedSequence-derived).
    vm, faults = generate_vm(903, 6000, fault_rate=0.05)
    checkpoint = load_default_checkpoint()
    settings = AdaptationSettings()
    warmup = settings.warmup_samples
    adaptation = fit_adaptation(
        checkpoint.model, vm.values[:warmup], DEFAULT_WINDOW, floors=DEFAULT_SCALE_FLOORS,
        cnn_weight=settings.cnn_weight, false_alarm_rate=settings.target_false_alarm_rate,
        min_deviation=settings.min_deviation,
        network_threshold=checkpoint.threshold if settings.network_floor else None)
    bundle = export_bundle(checkpoint, "adapted-903", adaptation=adaptation)
    assert not bundle.metadata.warmup
    windows = make_windows(vm.values[warmup - DEFAULT_WINDOW + 1:], DEFAULT_WINDOW)
    scores = bundle.score(np.ascontiguousarray(windows))
    labels = window_labels(vm.labels[warmup - DEFAULT_WINDOW + 1:], DEFAULT_WINDOW)
    result = score_detection(labels, scores, bundle.metadata.threshold)
    assert faults and result.event_recall >= 0.5
    assert result.false_alarm_rate <= 0.01


def test_normalization_bench_quick_runs() -> None:
    """bench/normalization.py --quick: every variant scored, the totals table printed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "bench/normalization.py", "--quick", "--vms", "2",
                             "--samples", "2000", "--labelled", "400"], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fused (shipped)" in result.stdout and "pooled warm-up bundle" in result.stdout
    assert "fused, 400 samples labelled" in result.stdout


def test_normalization_bench_scores_real_traces(shared_datasets, tmp_path) -> None:
    """bench/normalization.py --real: Bitbrains traces read in the agent's units, faults
    injected, every variant, the static limits and an operator's labels scored."""
    import gzip
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "real.json"
    result = subprocess.run(
        [sys.executable, "bench/normalization.py", "--vms", "2", "--samples", "1600",
         "--finetune-batches", "0", "--real", str(shared_datasets / "bitbrains-rnd"),
         "--label-false-alarms", "3", "--json", str(out)], cwd=root, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Real VMs (bitbrains-rnd, vm-001-vm-002" in result.stdout
    data = json.loads(out.read_text())
    assert sorted(data["vms"]) == ["vm-001", "vm-002"]
    reviewed = "fused, up to 3 false alarms labelled normal"
    assert set(data["pooled"]) == {"fused (shipped)", reviewed, "network alone",
                                   "deviation alone", "pooled warm-up bundle", "static limits"}
    assert all(0 <= vm[reviewed]["labels_given"] <= 3 for vm in data["vms"].values())
    assert "labels given per VM" in result.stdout
    assert 0.0 <= data["pooled"]["fused (shipped)"]["false_alarm_rate"] <= 1.0
    # A trace that cannot be scored is skipped by name, and the others are scored: one
    # bad VM of a fleet does not end the run. Rows with a missing value are left out.
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    with gzip.open(shared_datasets / "bitbrains-rnd" / "vm-001.csv.gz", "rt") as trace:
        lines = trace.readlines()
    with gzip.open(fleet / "vm-001.csv.gz", "wt") as out_file:
        out_file.writelines(lines[:500])  # too short to warm up on
    holes = lines[:1000]
    for row in (10, 20):
        fields = holes[row].split(",")
        fields[4] = ""  # cpu_usage_pct
        holes[row] = ",".join(fields)
    with gzip.open(fleet / "vm-002.csv.gz", "wt") as out_file:
        out_file.writelines(holes)
    with gzip.open(fleet / "vm-003.csv.gz", "wt") as out_file:
        out_file.writelines(line.rsplit(",", 1)[0] + "\n" for line in lines[:1000])
    out = tmp_path / "fleet.json"
    result = subprocess.run(
        [sys.executable, "bench/normalization.py", "--vms", "3", "--finetune-batches", "0",
         "--real", str(fleet), "--json", str(out)], cwd=root, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    assert "vm-002.csv.gz: 2 rows with a missing or non-numeric value left out" in text
    assert "2 of 3 VMs skipped" in text
    data = json.loads(out.read_text())
    assert list(data["vms"]) == ["vm-002"]
    assert data["skipped"]["vm-001"].startswith("499 samples of a running VM, too few")
    assert data["skipped"]["vm-003"] == "unreadable: no column net_tx_kbs in its header"
    # None to score: refused, naming why.
    (fleet / "vm-002.csv.gz").unlink()
    refused = subprocess.run(
        [sys.executable, "bench/normalization.py", "--vms", "2", "--finetune-batches", "0",
         "--real", str(fleet)], cwd=root, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no VM could be scored" in refused.stderr


def test_part_latency_bench_times_every_graph() -> None:
    """bench/part_latency.py, small: a narrow VM gets neither the states nor the
    subspace, a wide one both, and every graph is timed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "bench/part_latency.py", "--metrics", "4", "16",
                             "--windows", "50"], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    narrow, wide = result.stdout.split("16 metrics")
    assert "deviation  " in narrow and narrow.count(" p50 ") == 1
    assert "deviation + subspace (" in wide and "deviation + states (" in wide
    assert wide.count(" p50 ") == 4


def test_agent_latency_bench_times_every_row() -> None:
    """bench/agent_latency.py, small: the agent's step, the adapted bundles (whose
    graph now holds the usual states) and ONNX Runtime alone are all timed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "bench/agent_latency.py", "--rounds", "1",
                             "--windows", "20"], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("agent: WindowScorer.push", "agent: adapted, network weight 0.5",
                "agent: adapted, network weight 0", "ORT: bound buffers",
                "ORT: session.run, score only"):
        assert row in result.stdout, result.stdout


def test_a_recurring_job_labelled_normal_once_stops_alarming_a_fault_still_does() -> None:
    """A VM runs a 40-sample job (CPU 95 %, disk 30 MB/s) its warm-up never saw, four
    times. Without labels the trainer leaves each alarm out of its refits, so every
    recurrence alarms. An operator who labels ended false alarms normal (the agent's
    `anomaly end` command; bench/normalization.py --label-false-alarms) teaches the
    refits the job, while a labelled fault, never labelled normal, still alarms."""
    from bench.normalization import run_like_trainer
    from vmad.trainer.config import AdaptationSettings

    rng = np.random.default_rng(0)
    n, job = 4400, 40
    values = np.c_[10 + rng.normal(0, 1, n), 40 + rng.normal(0, 0.2, n),
                   1 + rng.normal(0, 0.2, n), 0.5 + rng.normal(0, 0.1, n)]
    starts = [1000, 1800, 2600, 3400]
    for start in starts:
        values[start:start + job, 0] = 95 + rng.normal(0, 1, job)
        values[start:start + job, 2] = 30 + rng.normal(0, 2, job)
    leak = slice(2200, 2300)
    values[leak, 1] += np.linspace(0, 40, 100)
    values = np.clip(values, 0, None)
    labels = np.zeros(n, dtype=np.int8)
    labels[leak] = 1
    checkpoint, settings = load_default_checkpoint(), AdaptationSettings()
    alarmed = {}
    for reviews in (0, 3):
        _, alarms, _, labelled = run_like_trainer(
            checkpoint.model, values, checkpoint.window, settings,
            refresh=settings.refresh_samples, cnn_weight=settings.cnn_weight,
            cnn_weights=tuple(settings.cnn_weights), network_threshold=checkpoint.threshold,
            labels=labels, false_alarm_labels=reviews)
        assert labelled <= reviews
        full = np.zeros(n, dtype=bool)
        full[settings.warmup_samples:] = alarms
        alarmed[reviews] = ([int(full[s:s + job + DEFAULT_WINDOW].sum()) for s in starts],
                            int(full[leak].sum()))
    unlabelled, reviewed = alarmed[0], alarmed[3]
    assert min(unlabelled[0]) >= job // 2, unlabelled  # every recurrence alarms
    assert reviewed[0][0] == unlabelled[0][0]  # the first is seen before any label
    assert max(reviewed[0][2:]) <= unlabelled[0][0] // 4, reviewed
    assert unlabelled[1] >= 50 and reviewed[1] >= 50, (unlabelled, reviewed)  # the leak
