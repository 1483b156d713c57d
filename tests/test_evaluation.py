"""Detection scores against hand-computed cases; no point adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vmad.evaluation import best_f1_threshold, events, roc_auc, score_detection


def test_hand_computed_case() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 1, 0, 0])
    scores = np.array([.1, .9, .8, .2, .1, .1, .1, .1, .1, .7])
    result = score_detection(labels, scores, 0.5)
    # flagged: 1, 2, 9 -> tp 1 (index 2), fp 2, fn 3 (3, 4, 7), tn 4
    assert result.precision == pytest.approx(1 / 3)
    assert result.recall == pytest.approx(1 / 4)
    assert result.point_f1 == pytest.approx(2 / 7)
    assert result.false_alarm_rate == pytest.approx(2 / 6)
    assert result.accuracy == pytest.approx(5 / 10)
    # events [2,5) and [7,8); detections [1,3) (overlaps) and [9,10) (does not)
    assert result.events == 2
    assert result.event_recall == pytest.approx(1 / 2)
    assert result.event_precision == pytest.approx(1 / 2)
    assert result.event_f1 == pytest.approx(1 / 2)


def test_no_point_adjustment() -> None:
    """One hit inside a long event leaves point recall small."""
    labels = np.zeros(100, dtype=int)
    labels[10:60] = 1
    scores = np.zeros(100)
    scores[30] = 1
    result = score_detection(labels, scores, 0.5)
    assert result.recall == pytest.approx(1 / 50)
    assert result.event_recall == 1.0


def test_events() -> None:
    assert events(np.array([1, 1, 0, 1, 0, 0, 1])) == [(0, 2), (3, 4), (6, 7)]
    assert events(np.zeros(4)) == []


def test_auc() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([.1, .2, .3, .4])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([.4, .3, .2, .1])) == 0.0
    assert roc_auc(np.array([0, 1]), np.array([.5, .5])) == 0.5
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([.1, .2])))


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.1).astype(int)
    scores = np.round(rng.random(400) + labels * 0.5, 2)  # ties on purpose
    threshold = best_f1_threshold(labels, scores)
    brute = max(score_detection(labels, scores, t).point_f1 for t in np.unique(scores))
    assert score_detection(labels, scores, threshold).point_f1 == pytest.approx(brute)


def test_best_threshold_without_anomalies_flags_nothing() -> None:
    scores = np.array([.1, .5, .3])
    threshold = best_f1_threshold(np.zeros(3), scores)
    assert not (scores >= threshold).any()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        score_detection(np.array([0, 1]), np.array([np.nan, 1.0]), 0.5)
    with pytest.raises(ValueError, match="equal"):
        score_detection(np.array([0, 1]), np.array([1.0]), 0.5)


def test_run_lengths_and_alarm_after() -> None:
    from vmad.evaluation import run_lengths

    over = np.array([1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert run_lengths(over).tolist() == [1, 2, 0, 1, 2, 3, 0, 1]
    assert run_lengths(over, before=2).tolist() == [3, 4, 0, 1, 2, 3, 0, 1]
    assert run_lengths(np.zeros(0, bool)).tolist() == []
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    scores = over.astype(float)
    # Three in a row: only the window that ends the run of three is flagged.
    result = score_detection(labels, scores, 0.5, alarm_after=3)
    assert (result.precision, result.recall, result.false_alarm_rate) == (1.0, 1 / 3, 0.0)
    assert score_detection(labels, scores, 0.5).false_alarm_rate == 3 / 5
