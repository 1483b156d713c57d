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
    detect.add_argument(
        "--detector",
        choices=("wha", "wha-alarm", "wha-likelihood", "dla", "la"),
        default="wha",
        help="wha-alarm: the NAB detector (WHA + anomaly likelihood + rest after an alarm)",
    )
    detect.add_argument("--input", type=Path, required=True)
    detect.add_argument("--output", type=Path, required=True)
    detect.add_argument("--config", type=Path, help="planner YAML (default: built-in defaults)")
    detect.set_defaults(run=run_detect)

    plan = commands.add_parser(
        "plan", help="weekly reservations for a VM or a folder of VMs at a target risk"
    )
    plan.add_argument("--history", type=Path, required=True, help="a VM CSV or a folder of them")
    plan.add_argument("--metric", default="memory", help="memory (Bitbrains kB -> GB) or a column")
    plan.add_argument("--sizes", default=None, help="e.g. 1,2,4,8,16 (default: planner.yaml)")
    plan.add_argument(
        "--target-risk",
        type=float,
        default=None,
        help="share of time under-provisioned accepted (default: planner.yaml)",
    )
    plan.add_argument("--horizon-weeks", type=int, default=None)
    plan.add_argument(
        "--exclude-labels",
        type=Path,
        help="JSON lines from `vmad label --labels-file`: intervals not planned for",
    )
    plan.add_argument("--no-anomalies", action="store_true", help="skip the WHA marks (faster)")
    plan.add_argument("--config", type=Path)
    plan.add_argument("--out", type=Path, required=True, help="plan CSV")
    plan.add_argument("--report", type=Path, help="HTML report (+ a folder of VM plots beside)")
    plan.set_defaults(run=run_plan)

    nab = bench.add_parser(
        "nab",
        help="WHA alarm and likelihood, WHA, DLA, LA on NAB realAWSCloudwatch, standard profile",
    )
    nab.add_argument("--data", type=Path, default=Path("../shared/datasets/nab"))
    nab.add_argument("--config", type=Path)
    nab.add_argument("--json", type=Path, help="write every detector's scores as JSON here")
    nab.set_defaults(run=run_bench_nab)

    planning = bench.add_parser("planning", help="rolling-origin weekly reservation benchmark")
    planning.add_argument("--data", type=Path, required=True, help="VM CSV dir or 'synthetic'")
    planning.add_argument("--quick", action="store_true", help="6 VMs (4 synthetic, 8 weeks)")
    planning.add_argument("--max-vms", type=int, default=None)
    planning.add_argument("--plot", type=Path, help="write the saving/risk plot (PNG) here")
    planning.add_argument("--markdown", type=Path, help="also write the tables here")
    planning.add_argument("--json", type=Path, help="write the methods and sweep as JSON here")
    planning.add_argument("--config", type=Path)
    planning.add_argument(
        "--split",
        action="store_true",
        help="also calibrate each half of the VMs on the other half (carry-over check)",
    )
    planning.add_argument("--workers", type=int, default=2, help="processes (one VM each)")
    planning.set_defaults(run=run_bench_planning)


def _usage(error: Exception) -> Exception:
    from vmad.errors import UsageError

    return UsageError(str(error))


def run_detect(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from vmad.planner.config import ConfigError, load_config
    from vmad.planner.detectors import BadSampleError
    from vmad.planner.evaluate_nab import make_detector
    from vmad.planner.history import HistoryError, read_history

    try:
        config = load_config(args.config)
        # Rows are scored in file order; repeated or backward timestamps are kept (a clock
        # change repeats an hour) and counted, never refused.
        hist = read_history(args.input, strict_order=False)
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
    steps = np.diff(hist.timestamps)
    note = ""
    if (steps <= 0).any():
        note = (
            f" ({int((steps == 0).sum())} repeated and {int((steps < 0).sum())} backward "
            "timestamps kept in file order)"
        )
    print(
        f"{args.input}: {int(verdicts.sum())} of {len(scores)} samples anomalous -> "
        f"{args.output}{note}"
    )
    return 0


def run_bench_nab(args: argparse.Namespace) -> int:
    from vmad.planner.config import load_config
    from vmad.planner.evaluate_nab import (
        DETECTORS,
        evaluate_nab,
        nab_json,
        nab_table,
        rescore_published,
    )

    results = evaluate_nab(args.data, list(DETECTORS), load_config(args.config))
    published = rescore_published(args.data) if (args.data / "results").is_dir() else []
    print(nab_table(results, published))
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(nab_json(results, published), indent=2) + "\n")
    print("\nThreshold: one per detector for the whole corpus, the one maximising the summed")
    print("raw standard-profile score (as NAB's optimiser). 'score at own threshold' uses the")
    print("detector's verdict threshold (0.5) or, for a re-scored published detector, NAB's")
    print("published standard-profile threshold (results/thresholds.json). Held-out half:")
    print("files in sorted-name order, the threshold best on the 1st, 3rd, ... files applied")
    print("to the 2nd, 4th, ... (the wha-alarm's mechanisms were compared on the first half).")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from vmad.planner.run_plan import plan_command

    return plan_command(args)


def run_bench_planning(args: argparse.Namespace) -> int:
    from vmad.planner.bench_planning import bench_command

    return bench_command(args)
