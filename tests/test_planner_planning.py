"""Planner: size choice, scores against hand-computed cases, NAB scoring, bad input, and
the commands end to end on tiny inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vmad.cli import main
from vmad.planner import sizing
from vmad.planner.bench_planning import SWEEP
from vmad.planner.config import PlannerConfig
from vmad.planner.filtering import filter_history, hourly_peaks
from vmad.planner.history import HistoryError, read_history
from vmad.planner.nab import STANDARD, FileScoring, best_threshold, corpus_score, scaled_sigmoid
from vmad.planner.scores import (
    cost,
    cross_correlation,
    overestimate,
    underestimate,
    underestimate_frequency,
)

SIZES = (1.0, 2.0, 4.0, 8.0, 16.0)


@pytest.mark.parametrize(
    ("need", "size"), [(0.2, 1.0), (1.0, 1.0), (1.01, 2.0), (7.9, 8.0), (16.0, 16.0), (40.0, 16.0)]
)
def test_smallest_covering_size(need: float, size: float) -> None:
    assert sizing.smallest_covering(need, SIZES) == size


def test_smallest_covering_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        sizing.smallest_covering(float("nan"), SIZES)


def test_simple_rules() -> None:
    assert sizing.last_period_max(np.array([0.5, 1.5, 0.9]), SIZES) == 2.0
    assert sizing.percentile_rule(np.full(100, 1.0), SIZES) == 2.0  # 1.0 x 1.1 > 1
    assert sizing.oracle(np.array([3.0, 4.0]), SIZES) == 4.0
    assert sizing.always_max(SIZES) == 16.0


def test_scores_hand_computed() -> None:
    actual = np.array([1.0, 3.0, 2.0, 0.0])
    reserved = np.array([2.0, 2.0, 2.0, 2.0])
    # Above the reservation only at sample 1, by 1: 1 of 6 units of demand, 1 of 4 samples.
    assert underestimate(actual, reserved) == pytest.approx(1 / 6)
    assert underestimate_frequency(actual, reserved) == pytest.approx(0.25)
    # Idle: 1 + 0 + 0 + 2 = 3 of 8 reserved.
    assert overestimate(actual, reserved) == pytest.approx(3 / 8)
    assert cross_correlation(actual, actual * 2 + 1) == pytest.approx(1.0)
    assert cost(np.array([1, 4, 16]), SIZES, None) == 21.0
    assert cost(np.array([1, 2]), SIZES, (0.5, 0.9, 1.7, 3.2, 6.0)) == pytest.approx(1.4)


def test_nab_scoring_hand_computed() -> None:
    t = np.arange(1000)  # probation = 150 samples
    f = FileScoring.build(t, [(500, 599)])
    perfect = np.zeros(1000, dtype=bool)
    perfect[500] = True
    assert f.raw_score(perfect) == pytest.approx(1.0)
    assert f.raw_score(np.zeros(1000, dtype=bool)) == -1.0
    late = np.zeros(1000, dtype=bool)
    late[599] = True  # last sample of the window: sigmoid(-1/100) / sigmoid(-1)
    assert f.raw_score(late) == pytest.approx(scaled_sigmoid(-0.01) / scaled_sigmoid(-1.0))
    fp = perfect.copy()
    fp[300] = True  # before any window: a full false positive
    assert f.raw_score(fp) == pytest.approx(1.0 - STANDARD.fp)
    in_probation = perfect.copy()
    in_probation[10] = True
    assert f.raw_score(in_probation) == pytest.approx(1.0)
    scores = [perfect.astype(float)]
    assert corpus_score([f], scores, 0.5) == pytest.approx(100.0)
    assert corpus_score([f], scores, 2.0) == pytest.approx(0.0)
    threshold, best = best_threshold([f], scores)
    assert best == pytest.approx(100.0) and threshold <= 1.0
    assert math.isclose(scaled_sigmoid(0.0), 0.0, abs_tol=1e-12)


def test_nab_held_out_half_uses_the_selection_halfs_threshold() -> None:
    from vmad.planner.evaluate_nab import _result, nab_json

    t = np.arange(1000)
    files = [FileScoring.build(t, [(500, 599)]) for _ in range(4)]
    scores = []
    for k in range(4):
        s = np.zeros(1000)
        # Selection half (1st, 3rd): a hit at 0.9 and a false alarm at 0.7; held-out half
        # (2nd, 4th): the hit scores only 0.8, below what the selection half chooses.
        s[500] = 0.9 if k % 2 == 0 else 0.8
        s[300] = 0.7 if k % 2 == 0 else 0.0
        scores.append(s)
    r = _result("x", files, scores, own=0.5)
    assert r.score == pytest.approx(100.0) and 0.7 < r.threshold <= 0.8
    assert r.selection == pytest.approx(100.0) and r.heldout_threshold > 0.8
    assert r.heldout == pytest.approx(0.0)  # both held-out windows missed
    row = nab_json([r], [])["detectors"]["x"]  # type: ignore[index]
    assert row["heldout_score"] == r.heldout and row["score_at_own_threshold"] < 100.0


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("timestamp,value\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no samples"),
        (["0,1", "300,nan"], "row 2 is nan"),
        (["300,1", "0,2"], "not increasing"),
        (["0,abc"], "line 2"),
    ],
)
def test_bad_history_is_a_clear_error(tmp_path: Path, rows: list[str], message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        read_history(_write(tmp_path / "h.csv", rows))


def test_filter_keeps_weekly_job_and_removes_lone_spike() -> None:
    rng = np.random.default_rng(3)
    hours = 168 * 5
    x = 2.0 + 0.05 * rng.normal(size=hours)
    job = [40 + 168 * k for k in range(5)]
    x[job] += 3.0
    x[300] += 5.0
    result = filter_history(x, "wha", PlannerConfig())
    assert result.point[300] and result.cleaned[300] < 3.0
    assert result.recurrent[job[2]] and result.recurrent[job[4]]
    assert result.cleaned[job[3]] == x[job[3]]  # recurrent load is kept


def test_hourly_peaks_fill_gaps() -> None:
    t = np.array([0, 300, 7200 + 60], dtype=np.int64)
    first, peaks = hourly_peaks(t, np.array([1.0, 2.0, 0.5]))
    assert first == 0 and peaks.tolist() == [2.0, 2.0, 0.5]


@pytest.mark.slow
def test_lstm_learns_a_weekly_shape_quickly() -> None:
    from vmad.planner.forecast import LSTMForecaster, seasonal_naive

    t = np.arange(168 * 3)
    x = 3 + np.sin(2 * np.pi * t / 24) + (t % 168 < 24)
    model = LSTMForecaster(hidden=16, epochs=25, seed=1).fit(x[:336])
    fc = model.forecast(x[:336], 168)
    assert fc.shape == (168,)
    naive = seasonal_naive(x[:336], 168)
    np.testing.assert_allclose(naive, x[168:336])
    assert float(np.abs(fc - x[336:]).mean()) < 0.5


def test_detect_command_writes_nab_format(tmp_path: Path) -> None:
    rows = [
        f"2020-01-01 {h:02d}:{m:02d}:00,{v}"
        for h in range(8)
        for m in range(0, 60, 5)
        for v in [1.0]
    ]
    rows[60] = rows[60].rsplit(",", 1)[0] + ",50"
    src = _write(tmp_path / "in.csv", rows)
    out = tmp_path / "out.csv"
    assert main(["detect", "--detector", "wha", "--input", str(src), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "timestamp,value,anomaly_score,label" and len(lines) == 97
    assert float(lines[61].split(",")[2]) >= 0.5
    assert (
        main(["detect", "--input", str(_write(tmp_path / "e.csv", [])), "--output", str(out)]) == 2
    )


def test_detect_keeps_repeated_and_backward_timestamps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clock change repeats an hour: rows are scored in file order, never refused."""
    rows = [f"2020-01-01 00:{m:02d}:00,1.0" for m in range(0, 60, 5)]
    rows += [f"2020-01-01 00:{m:02d}:00,1.0" for m in range(30, 60, 5)]  # repeated stamps
    rows += ["2020-01-01 00:55:00,1.0", "2020-01-01 00:10:00,40"]  # repeat, then backward
    src, out = _write(tmp_path / "dst.csv", rows), tmp_path / "out.csv"
    assert main(["detect", "--input", str(src), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(rows) + 1
    assert [line.split(",")[0] for line in lines[1:]] == [r.split(",")[0] for r in rows]
    assert "repeated" in capsys.readouterr().out


def test_bench_planning_quick_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot, out = tmp_path / "f.png", tmp_path / "b.json"
    argv = ["bench", "planning", "--data", "synthetic", "--quick", "--workers", "1"]
    assert main([*argv, "--plot", str(plot), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("weekly-oracle", "last-week-max", "p99-4-weeks-x1.1", "vpa", "planner"):
        assert f"| {name}:" in text
    assert "Verdict:" in text and "0.05 %" in text and "steady state" in text
    assert plot.stat().st_size > 1000
    sweep = __import__("json").loads(out.read_text())["sweep"]
    assert [row["target"] for row in sweep.values()] == list(SWEEP)


def test_bitbrains_rules_reproduce_reference(shared_datasets: Path) -> None:
    """The reference points for the simple rules, on a few real VMs (opt-in data)."""
    from vmad.planner.backtest import load_fleet
    from vmad.planner.bench_planning import run_backtests, score_methods

    vms = load_fleet(shared_datasets / "bitbrains-rnd", max_gb=16, limit=6)
    methods, _ = score_methods(
        run_backtests(vms, PlannerConfig().planning), PlannerConfig().planning
    )
    assert methods["weekly-oracle"]["under_provisioned_time"] == 0.0
    assert methods["last-week-max"]["saving"] > 0.5
    assert methods["always-max"]["saving"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["wha", "wha-alarm"])
def test_detect_runs_on_every_nab_aws_file(
    shared_datasets: Path, tmp_path: Path, detector: str
) -> None:
    files = sorted((shared_datasets / "nab" / "realAWSCloudwatch").glob("*.csv"))
    assert len(files) == 17
    for src in files:
        out = tmp_path / src.name
        argv = ["detect", "--detector", detector, "--input", str(src), "--output", str(out)]
        assert main(argv) == 0
        assert len(out.read_text().splitlines()) == len(src.read_text().splitlines())
