"""Run the planner's detectors over the NAB corpus and score them (``vmad bench nab``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vmad.detectors import create
from vmad.planner.config import PlannerConfig
from vmad.planner.detectors import Detector
from vmad.planner.history import read_history
from vmad.planner.nab import FileScoring, best_threshold, corpus_score

__all__ = ["DETECTORS", "PUBLISHED", "NabResult", "evaluate_nab", "make_detector"]

# The planner's streaming detectors, best on NAB first (`vmad detect --detector`).
DETECTORS = ("wha-alarm", "wha-likelihood", "wha", "dla", "la")

# Standard-profile scores on realAWSCloudwatch from ../shared/datasets/README.md.
PUBLISHED = {
    "numenta HTM": 73.4,
    "contextOSE": 71.5,
    "ARTime": 69.5,
    "knncad": 60.7,
    "randomCutForest": 57.6,
    "skyline": 49.3,
    "windowedGaussian": 31.2,
    "null": 0.0,
}


def make_detector(name: str, config: PlannerConfig, probation: int | None = None) -> Detector:
    """A fresh detector from the shared registry (vmad/detectors.py), with its settings
    from the YAML config. `probation`: the samples a benchmark leaves unscored at the
    start (NAB tells every detector its probation): LA learns its limits over them; the
    alarm's warm-up is cut to fit in them (half learning, half estimation, as NAB's HTM
    detector), so it is judging once scoring starts, and its rest is at most a fifth of
    them (as knncad and contextOSE rest on NAB); None = the YAML as is."""
    import vmad.planner.likelihood  # noqa: F401  (registers wha, wha-likelihood, wha-alarm)

    if name == "wha-alarm":
        alarm = config.alarm.model_dump()
        wha = config.wha.model_dump() | {
            key: alarm.pop(key) for key in ("window", "half_life", "tolerance")
        }
        if probation is not None:
            if alarm["learn"] + alarm["estimation"] > probation:
                alarm["learn"] = min(alarm["learn"], probation // 2)
                alarm["estimation"] = max(1, min(alarm["estimation"], probation - alarm["learn"]))
            # knncad's and contextOSE's rest on NAB: a fifth of the probation (150 = the
            # YAML default at NAB's longest probation, 750).
            alarm["rest"] = min(alarm["rest"], probation // 5)
        options = {"wha": wha, **alarm}
    elif name == "wha-likelihood":
        lk = config.likelihood
        options = config.wha.model_dump() | {
            "window": lk.window,
            "half_life": lk.half_life,
            "tolerance": lk.tolerance,
            "learn": lk.learn,
            "history": lk.history,
            "short": lk.short,
            "min_std": lk.min_std,
        }
    elif name in ("la", "dla", "wha"):
        options = getattr(config, name).model_dump()
        if name == "la" and probation is not None:
            options["learn"] = probation
    else:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return create(name, **options)  # type: ignore[return-value]


def _stamp(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


# A fixed split of the corpus for a held-out check: files in sorted-name order, the 1st,
# 3rd, 5th, ... choose the threshold, the 2nd, 4th, ... are scored with it. The
# wha-alarm's mechanisms were compared on the first (selection) half only.
SELECTION, HELD_OUT = slice(0, None, 2), slice(1, None, 2)


@dataclass
class NabResult:
    detector: str
    threshold: float
    score: float
    at_default: float  # at the detector's own verdict threshold (no corpus tuning)
    heldout: float = math.nan  # the 2nd, 4th, ... files at the threshold best on the others
    heldout_threshold: float = math.nan
    selection: float = math.nan  # the selection half's own score at that threshold


def _result(
    name: str, scoring: list[FileScoring], scores: list[np.ndarray], own: float
) -> NabResult:
    """Corpus-optimised score, score at `own` threshold, and the held-out half's score."""
    threshold, score = best_threshold(scoring, scores)
    chosen = selection = heldout = math.nan
    if len(scoring) >= 2:  # a split needs a file on each side
        chosen, selection = best_threshold(scoring[SELECTION], scores[SELECTION])
        heldout = corpus_score(scoring[HELD_OUT], scores[HELD_OUT], chosen)
    at_own = corpus_score(scoring, scores, own) if math.isfinite(own) else math.nan
    return NabResult(name, threshold, score, at_own, heldout, chosen, selection)


def evaluate_nab(root: Path, detectors: list[str], config: PlannerConfig) -> list[NabResult]:
    windows = json.loads((root / "windows.json").read_text())
    files = sorted(windows)
    scoring, histories = [], []
    for rel in files:
        hist = read_history(root / rel, strict_order=False)
        histories.append(hist)
        spans = [(_stamp(a), _stamp(b)) for a, b in windows[rel]]
        scoring.append(FileScoring.build(hist.timestamps, spans))
    results = []
    for name in detectors:
        scores = []
        for hist in histories:
            # Detectors learn over NAB's probation period, the part NAB does not score.
            probation = int(min(math.floor(0.15 * len(hist.values)), 750))
            det = make_detector(name, config, probation=probation)
            scores.append(det.score_series(hist.values)[0])
        results.append(_result(name, scoring, scores, make_detector(name, config).threshold))
    return results


def rescore_published(root: Path) -> list[NabResult]:
    """NAB's published per-sample results (``results/<detector>/``) re-scored with this
    project's scorer: a check of the scorer against NAB's own numbers. ``at_default`` is
    the score at NAB's published standard-profile threshold (``results/thresholds.json``)."""
    windows = json.loads((root / "windows.json").read_text())
    thresholds = json.loads((root / "results" / "thresholds.json").read_text())
    out = []
    for folder in sorted(p for p in (root / "results").iterdir() if p.is_dir()):
        scoring, scores = [], []
        for rel in sorted(windows):
            path = folder / f"{folder.name}_{Path(rel).name}"
            if not path.exists():
                break
            hist = read_history(path, column="anomaly_score", strict_order=False)
            spans = [(_stamp(a), _stamp(b)) for a, b in windows[rel]]
            scoring.append(FileScoring.build(hist.timestamps, spans))
            scores.append(hist.values)
        else:
            published = thresholds.get(folder.name, {}).get("standard", {}).get("threshold")
            own = float(published) if published is not None else math.nan
            out.append(_result(folder.name, scoring, scores, own))
    return out


def nab_table(results: list[NabResult], rescored: list[NabResult] = ()) -> str:  # type: ignore[assignment]
    """This project's detectors, NAB's published detectors re-scored here from their
    published per-sample results, and the published scores, best first."""
    rows = [
        (
            f"{r.detector.upper()} (this project)",
            r.score,
            f"{r.threshold:.3f}",
            f"{r.at_default:.1f}",
            f"{r.heldout:.1f}",
        )
        for r in results
    ]
    rows += [
        (
            f"{r.detector} (published results, re-scored here)",
            r.score,
            f"{r.threshold:.3f}",
            f"{r.at_default:.1f}",
            f"{r.heldout:.1f}",
        )
        for r in rescored
    ]
    rows += [
        (name + " (published score)", score, "-", "-", "-") for name, score in PUBLISHED.items()
    ]
    rows.sort(key=lambda row: -row[1])
    lines = [
        "| detector | standard score (corpus-optimised threshold) | threshold "
        "| score at own threshold | held-out half (threshold from the other half) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {s:.1f} | {t} | {d} | {h} |" for n, s, t, d, h in rows]
    return "\n".join(lines)


def nab_json(results: list[NabResult], rescored: list[NabResult]) -> dict[str, object]:
    """What `vmad bench nab --json` writes: every scored detector, by name."""

    def num(x: float) -> float | None:  # NaN (not measured) is null: JSON has no NaN
        return None if math.isnan(x) else x

    def row(r: NabResult, source: str) -> dict[str, object]:
        return {
            "source": source,
            "score": r.score,
            "threshold": r.threshold,
            "score_at_own_threshold": num(r.at_default),
            "heldout_score": num(r.heldout),
            "heldout_threshold": num(r.heldout_threshold),
            "selection_score": num(r.selection),
        }

    return {
        "profile": "standard",
        "split": "files in sorted-name order: the 1st, 3rd, ... (selection half) choose the "
        "threshold, the 2nd, 4th, ... (held-out half) are scored with it",
        "detectors": {r.detector: row(r, "this project") for r in results}
        | {r.detector + " (re-scored)": row(r, "published results") for r in rescored},
        "published_scores": PUBLISHED,
    }
