"""One contract for every planner detector, plus hand-made series for each one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vmad.planner.config import ConfigError, load_config
from vmad.planner.detectors import DLA, LA, BadSampleError, Detector
from vmad.planner.likelihood import AnomalyLikelihood, RawScoreLikelihood, WHAAlarm
from vmad.planner.recurrence import RecurrenceDetector, find_periods
from vmad.planner.wha import WHA

REPO = Path(__file__).resolve().parent.parent

FACTORIES: dict[str, Callable[[], Detector]] = {
    "la": lambda: LA(learn=48),
    "dla": lambda: DLA(window=48),
    "wha": lambda: WHA(window=48, half_life=24),
    "recurrence": lambda: RecurrenceDetector(WHA(window=48, half_life=24), (24, 168)),
    "likelihood": lambda: AnomalyLikelihood(WHA(window=48, half_life=24), learn=50, history=200),
    "alarm": lambda: _small_alarm(),
}


def _small_alarm() -> WHAAlarm:
    """The NAB detector with short windows, so the contract tests stay fast."""
    likelihood = RawScoreLikelihood(learn=100, estimation=50, history=1000)
    return WHAAlarm(WHA(window=48, half_life=24), likelihood)


def _noisy(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 10.0 + rng.normal(0.0, 0.5, n)


@pytest.fixture(params=sorted(FACTORIES))
def detector(request: pytest.FixtureRequest) -> Detector:
    return FACTORIES[request.param]()


def test_scores_in_unit_interval(detector: Detector) -> None:
    x = _noisy(400)
    x[200] += 50
    x[300] -= 50
    scores, verdicts = detector.score_series(x)
    assert scores.shape == x.shape and verdicts.dtype == bool
    assert np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_state_leak_between_series(name: str) -> None:
    a, b = _noisy(300, 1), _noisy(300, 2) * 3
    a[100] += 40
    fresh = FACTORIES[name]().score_series(b)[0]
    used = FACTORIES[name]()
    used.score_series(a)
    np.testing.assert_array_equal(fresh, used.score_series(b)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_bad_sample_is_a_clear_error(detector: Detector, bad: object) -> None:
    detector.update(1.0)
    with pytest.raises(BadSampleError, match="sample 1"):
        detector.update(bad)  # type: ignore[arg-type]


def test_constant_series_raises_no_alarm(detector: Detector) -> None:
    _, verdicts = detector.score_series(np.full(300, 4.0))
    assert not verdicts.any()


@pytest.mark.parametrize("make", [lambda: DLA(window=48), lambda: WHA(window=48, half_life=24)])
def test_lone_spike_is_flagged(make: Callable[[], Detector]) -> None:
    x = _noisy(200)
    x[150] += 20
    _, verdicts = make().score_series(x)
    assert verdicts[150]
    assert verdicts.sum() <= 3


def test_la_static_limits() -> None:
    d = LA(lower=0.0, upper=10.0)
    assert d.update(5.0) == (0.0, False)
    score, bad = d.update(11.0)
    assert bad and 0.5 <= score <= 1.0


def test_weekly_spike_becomes_recurrent_after_second_repeat_and_decays() -> None:
    week = 168
    x = _noisy(week * 6)
    spikes = [30 + week * k for k in range(4)]
    x[spikes] += 15
    x[500 % week + 2 * week + 7] += 20  # a lone spike elsewhere
    det = RecurrenceDetector(WHA(window=48, half_life=24), (24, week))
    kinds: dict[int, tuple[bool, bool]] = {}
    for i, v in enumerate(x):
        _, recurrent = det.update(v)
        if det.last_point:
            kinds[i] = (True, recurrent)
    assert kinds[spikes[0]] == (True, False)
    assert kinds[spikes[1]] == (True, False)  # one repeat: not yet
    assert kinds[spikes[2]] == (True, True)  # second repeat: recurrent
    assert kinds[spikes[3]] == (True, True)
    assert not kinds[500 % week + 2 * week + 7][1]
    # The job stopped after week 4: two missed repeats decay its confidence.
    assert det.confidence[week] < 0.5


def test_find_periods_sees_a_daily_cycle() -> None:
    t = np.arange(24 * 30)
    x = np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(0).normal(size=t.size)
    assert 24 in find_periods(x, 12, 200, top=3)


def test_example_config_loads_and_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = load_config(REPO / "deploy" / "planner.yaml")
    assert cfg.planning.sizes == (1, 2, 4, 8, 16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("wha:\n  tolerence: 3\n")
    with pytest.raises(ConfigError, match=r"wha\.tolerence"):
        load_config(bad)
    bad.write_text("wha:\n  weights: [2, 1, 1]\n")
    with pytest.raises(ConfigError, match="weights"):
        load_config(bad)


def test_anomaly_likelihood_quiets_a_noisy_series_and_flags_a_jump_in_a_quiet_one() -> None:
    from vmad.planner.likelihood import AnomalyLikelihood

    rng = np.random.default_rng(0)
    quiet = 10.0 + 0.01 * rng.normal(size=1500)
    quiet[1200:] += 5.0  # a level shift after a long quiet stretch
    det = AnomalyLikelihood(WHA(window=48, half_life=24), learn=100, history=600)
    scores, _ = det.score_series(quiet)
    assert scores[1200:1215].max() > 0.5
    assert scores[300:1190].max() < scores[1200:1215].max()
    # Deterministic and stateless across series (same contract as every detector).
    np.testing.assert_array_equal(scores, det.score_series(quiet)[0])


def test_streaming_detectors_honour_the_shared_interface_and_registry() -> None:
    import vmad.planner.likelihood  # noqa: F401  (registers wha, wha-likelihood, wha-alarm)
    from vmad import detectors

    assert {"la", "dla", "wha", "wha-likelihood", "wha-alarm"} <= set(detectors.names())
    detector = detectors.create("dla", window=20)
    assert isinstance(detector, detectors.Detector)
    detector.fit(np.sin(np.arange(200) / 5.0))
    scores = detector.score_samples(np.r_[np.sin(np.arange(200, 220) / 5.0), 50.0])
    assert scores.shape == (21,)
    assert scores[-1] > scores[:-1].max()  # the spike, after a warm fit
    with pytest.raises(ValueError, match="unknown detector"):
        detectors.create("no-such-detector")


def _shifted(n: int = 3000, at: int = 2000, step: float = 5.0, seed: int = 0) -> np.ndarray:
    """A bounded noisy series with one level shift (bounded, so no new extreme before)."""
    rng = np.random.default_rng(seed)
    x = 10.0 + rng.uniform(-0.5, 0.5, n)
    x[at:] += step
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("novelty", [0.05, 0.0])
def test_wha_alarm_fires_once_on_a_level_shift(novelty: float, seed: int) -> None:
    # Default settings (as shipped); with novelty off the likelihood alone sees the shift.
    scores, verdicts = WHAAlarm(novelty=novelty).score_series(_shifted(seed=seed))
    alarms = np.flatnonzero(verdicts)
    assert alarms.size == 1 and 2000 <= alarms[0] <= 2010, alarms
    # The rest: the samples right after the alarm report 0, whatever they look like.
    assert not scores[alarms[0] + 1 : alarms[0] + 151].any()
    assert scores[alarms[0] + 151 :].max() < 0.5


def test_wha_alarm_without_rest_alarms_again_and_again() -> None:
    _, verdicts = WHAAlarm(rest=0).score_series(_shifted())
    assert verdicts[2000:2150].sum() > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wha_alarm_stays_quiet_on_a_stationary_series(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(4000)
    x = 10.0 + 2.0 * np.sin(2 * np.pi * t / 288) + rng.uniform(-0.3, 0.3, t.size)
    scores, verdicts = WHAAlarm().score_series(x)
    assert not verdicts.any(), np.flatnonzero(verdicts)
    assert scores[:388].max() == 0.0  # nothing before learning + estimation


def test_wha_alarm_flags_a_new_extreme_at_once() -> None:
    x = _shifted(step=0.0)
    x[2500] = 11.0  # 0.5 above the highest value seen: beyond range + 5 %
    scores, verdicts = WHAAlarm().score_series(x)
    assert scores[2500] == 1.0 and np.flatnonzero(verdicts).tolist() == [2500]


def test_raw_score_likelihood_quiet_until_a_jump() -> None:
    lk = RawScoreLikelihood(learn=10, estimation=20, history=500, reestimate=10)
    quiet = [lk.update(0.05 + 0.01 * (i % 3)) for i in range(300)]
    assert max(quiet) < 0.5 and quiet[:30] == [0.0] * 30
    assert max(lk.update(0.9) for _ in range(10)) >= 0.5
    # A raw score that is always noisy sets a wide reference: its swings are not red.
    noisy = RawScoreLikelihood(learn=10, estimation=20, history=500)
    rng = np.random.default_rng(0)
    assert max(noisy.update(float(r)) for r in rng.uniform(0.0, 1.0, 2000)) < 0.5


def test_wha_alarm_from_the_shipped_config() -> None:
    from vmad.planner.evaluate_nab import DETECTORS, make_detector

    config = load_config(REPO / "deploy" / "planner.yaml")
    assert config.alarm.rest == 150 and config.alarm.history == 8640
    det = make_detector("wha-alarm", config)
    assert isinstance(det, WHAAlarm) and det.likelihood.warm == 388
    assert DETECTORS[0] == "wha-alarm"
    # A benchmark's short probation (NAB: 15 % of a short file) cuts the warm-up to fit.
    short = make_detector("wha-alarm", config, probation=186)
    assert isinstance(short, WHAAlarm) and short.likelihood.warm == 186 and short.rest == 37
    standard = make_detector("wha-alarm", config, probation=604)  # a 4032-sample NAB file
    assert isinstance(standard, WHAAlarm) and standard.likelihood.warm == 388
    assert standard.rest == 120
    with pytest.raises(ValueError, match="wha-alarm"):
        make_detector("no-such", config)
