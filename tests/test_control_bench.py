"""`vmad bench control`'s statistics (seed means, paired differences with 95 %
intervals, the verdict) and a quick end-to-end run with DQN seeds and a bandit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from vmad.controller.bench import PolicyResult, is_fixed, paired, seed_mean, verdict


def _result(name: str, f1: list[float], batches: list[float], far: list[float] | None = None
            ) -> PolicyResult:
    far = far or [0.01] * len(f1)
    return PolicyResult(name, len(f1), float(np.mean(f1)), float(np.std(f1)),
                        float(np.mean(far)), 0.5, float(np.mean(batches)), 0.0, {},
                        tuple(f1), tuple(far), tuple(batches))


def test_seed_mean_paired_interval_and_verdict() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.6, 30)
    seeds = [_result(f"dqn (s{i})", list(base + rng.normal(0.02, 0.01, 30)), [100.0] * 30)
             for i in range(5)]
    mean = seed_mean(seeds, "DQN, mean of 5 seeds")
    np.testing.assert_allclose(mean.episode_f1, np.mean([s.episode_f1 for s in seeds], 0))
    assert mean.batches == 100.0 and mean.episodes == 30

    rules = _result("rule policy", list(base), [300.0] * 30)
    never = _result("never retrain", list(base - 0.1), [0.0] * 30)
    p = paired(mean, rules)
    diff = np.subtract(mean.episode_f1, rules.episode_f1)
    half = stats.t.ppf(0.975, 29) * diff.std(ddof=1) / np.sqrt(30)
    assert p.difference == pytest.approx(diff.mean())
    assert (p.low, p.high) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert p.wins + p.ties + p.losses == 30 and p.compute_ratio == pytest.approx(1 / 3)
    assert [is_fixed(r) for r in (mean, seeds[0], rules, never)] == [False, False, True, True]

    # Better F1 at a third of the best fixed policy's compute: met.
    assert verdict(mean, [*seeds, rules, never]).startswith("Target MET")
    # The same F1 at twice the compute: not met, and the line says why.
    costly = _result("DQN, mean", list(mean.episode_f1), [600.0] * 30)
    line = verdict(costly, [rules, never])
    assert line.startswith("Target NOT MET") and "over 50 %" in line
    # Far worse F1: not met on F1.
    worse = _result("DQN, mean", list(base - 0.05), [10.0] * 30)
    assert "not above -0.01" in verdict(worse, [rules, never])


@pytest.mark.slow
def test_bench_control_quick_with_seeds_bandit_plot_and_json(tmp_path, capsys) -> None:
    from vmad.cli import main
    from vmad.controller.dqn import DQNSettings, build_sb3_dqn, policy_file_of, save_policy_file
    from vmad.state import FEATURES

    paths = []
    for name, seed in (("dqn-s0", 0), ("dqn-s1", 1), ("bandit-s0", 2)):
        model = build_sb3_dqn(None, DQNSettings(seed=seed), observation_size=len(FEATURES) + 8,
                              net_arch=(16,))
        paths.append(save_policy_file(tmp_path / name / "policy.npz",
                                      policy_file_of(model, {"trained": "test"})))
    plot, out = tmp_path / "frontier.png", tmp_path / "control.json"
    # In two parts, as a long run would: the fixed policies first, then the learned ones
    # on the same episodes, with the first part's rows added.
    fixed = tmp_path / "fixed.json"
    assert main(["bench", "control", "--quick", "--episodes", "2", "--no-dqn",
                 "--json", str(fixed)]) == 0
    capsys.readouterr()
    assert main(["bench", "control", "--quick", "--episodes", "2", "--policy", str(paths[0]),
                 "--policy", str(paths[1]), "--bandit", str(paths[2]), "--no-fixed",
                 "--results", str(fixed), "--plot", str(plot), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # Rows of other episodes are refused, naming the file.
    assert main(["bench", "control", "--quick", "--episodes", "3", "--no-fixed",
                 "--results", str(fixed)]) == 2
    assert "fixed.json: ran other episodes" in capsys.readouterr().err
    assert "DQN, mean of 2 seeds" in text and "bandit (bandit-s0)" in text
    assert "minus each policy, paired by episode" in text and "Target " in text
    assert plot.stat().st_size > 10_000
    data = json.loads(out.read_text())
    rows = {r["policy"]: r for r in data["results"]}
    assert {"dqn (dqn-s0)", "dqn (dqn-s1)", "bandit (bandit-s0)", "rules"} <= set(rows)
    (mean,) = data["summaries"]
    assert mean["policy"] == "DQN, mean of 2 seeds" and len(mean["episode_f1"]) == 2
