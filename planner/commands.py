"""`vmad detect`, `vmad plan` and `vmad bench nab|planning`.

Heavy libraries (torch, matplotlib) are imported inside the run functions only, so
registering these commands costs nothing to the other sub-commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    detect = commands.add_parser("detect", help="score a timestamp,value CSV (NAB result format)")
    detect.add_argument("--detector", choices=("wha", "dla", "la"), default="wha")
    detect.add_argument("--input", type=Path, required=True)
    detect.add_argument("--output", type=Path, required=True)
    detect.add_argument("--config", type=Path, help="planner YAML (default: built-in defaults)")
    detect.add_argument("--allow-unsorted", action="store_true", help="keep file order (NAB)")
    detect.set_defaults(run=run_detect)

    plan = commands.add_parser("plan", help="forecast usage and plan reservations per period")
    plan.add_argument("--history", type=Path, required=True)
    plan.add_argument("--metric", default="memory", help="memory (Bitbrains kB -> GB) or a column")
    plan.add_argument("--sizes", default="1,2,4,8,16")
    plan.add_argument("--period", default="7d")
    plan.add_argument("--horizon", default="28d")
    plan.add_argument("--margin", type=float, default=None)
    plan.add_argument("--filter", choices=("wha", "dla", "la", "none"), default="wha")
    plan.add_argument("--forecaster", choices=("lstm", "seasonal"), default="lstm")
    plan.add_argument("--config", type=Path)
    plan.add_argument("--out", type=Path, required=True)
    plan.add_argument("--report", type=Path)
    plan.set_defaults(run=run_plan)

    nab = bench.add_parser("nab", help="LA, DLA, WHA on NAB realAWSCloudwatch, standard profile")
    nab.add_argument("--data", type=Path, default=Path("../shared/datasets/nab"))
    nab.add_argument("--config", type=Path)
    nab.set_defaults(run=run_bench_nab)

    planning = bench.add_parser("planning", help="rolling-origin reservation planning benchmark")
    planning.add_argument("--data", type=Path, required=True, help="Bitbrains dir or 'synthetic'")
    planning.add_argument("--quick", action="store_true", help="few VMs, tiny LSTM")
    planning.add_argument("--max-vms", type=int, default=None)
    planning.add_argument("--margins", default="0,0.05,0.1,0.2,0.3,0.5")
    planning.add_argument("--plot", type=Path, help="write the frontier plot (PNG) here")
    planning.add_argument("--markdown", type=Path, help="also write the tables here")
    planning.add_argument("--config", type=Path)
    planning.add_argument("--workers", type=int, default=2, help="processes (one VM each)")
    planning.add_argument("--no-lstm", action="store_true", help="rules and baselines only")
    planning.set_defaults(run=run_bench_planning)


def _usage(error: Exception) -> Exception:
    from vmad.errors import UsageError

    return UsageError(str(error))


def run_detect(args: argparse.Namespace) -> int:
    import csv

    from vmad.planner.config import ConfigError, load_config
    from vmad.planner.detectors import BadSampleError
    from vmad.planner.evaluate_nab import make_detector
    from vmad.planner.history import HistoryError, read_history

    try:
        config = load_config(args.config)
        hist = read_history(args.input, strict_order=not args.allow_unsorted)
        scores, verdicts = make_detector(args.detector, config).score_series(hist.values)
    except (ConfigError, HistoryError, BadSampleError) as error:
        raise _usage(error) from error
    labels = hist.labels if hist.labels is not None else [0] * len(scores)
    from datetime import UTC, datetime

    with args.output.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for t, v, s, lab in zip(hist.timestamps, hist.values, scores, labels, strict=True):
            stamp = datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%d %H:%M:%S")
            writer.writerow([stamp, f"{v:.6g}", f"{s:.6f}", int(lab)])
    print(
        f"{args.input}: {int(verdicts.sum())} of {len(scores)} samples anomalous -> {args.output}"
    )
    return 0


def run_bench_nab(args: argparse.Namespace) -> int:
    from vmad.planner.config import load_config
    from vmad.planner.evaluate_nab import evaluate_nab, nab_table

    results = evaluate_nab(args.data, ["wha", "dla", "la"], load_config(args.config))
    print(nab_table(results))
    print("\nThreshold: one per detector for the whole corpus, the one maximising the summed")
    print("raw standard-profile score (as NAB's optimiser); 'score at 0.5' uses the verdict")
    print("threshold of the detector itself.")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from vmad.planner.run_plan import plan_command

    return plan_command(args)


def run_bench_planning(args: argparse.Namespace) -> int:
    from vmad.planner.bench_planning import bench_command

    return bench_command(args)
