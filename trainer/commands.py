"""`vmad pretrain`, `vmad finetune`, `vmad bench detection`. Torch is imported only inside
the functions that run them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vmad.schema import DEFAULT_WINDOW

TABLE_COLUMNS = ("point_f1", "event_f1", "precision", "recall", "false_alarm_rate", "auc",
                 "hitrate_100", "hitrate_150")
TABLE_HEADERS = {"point_f1": "point F1", "event_f1": "event F1", "precision": "precision",
                 "recall": "recall", "false_alarm_rate": "false alarms", "auc": "AUC",
                 "hitrate_100": "HitRate@100", "hitrate_150": "HitRate@150"}


def register(commands: Any, bench: Any) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="train a detector on the synthetic source (and labelled series)")
    pretrain.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    pretrain.add_argument("--bundle", type=Path, help="also export an agent bundle here")
    pretrain.add_argument("--kind", default="zoom-cnn", help="model kind (default zoom-cnn)")
    pretrain.add_argument("--data", type=Path,
                          help="folder of series folders whose labelled test parts join the source")
    pretrain.add_argument("--synthetic-vms", type=int, default=16)
    pretrain.add_argument("--synthetic-samples", type=int, default=20_000)
    pretrain.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    pretrain.add_argument("--batches", type=int, default=1500, help="mini-batches at most")
    pretrain.add_argument("--false-alarm-rate", type=float, default=0.002,
                          help="threshold so that this share of normal windows on unseen "
                               "synthetic VMs is flagged (default 0.002)")
    pretrain.add_argument("--calibration-vms", type=int, default=4,
                          help="unseen synthetic VMs the threshold is set on")
    pretrain.add_argument("--warmup", type=int, default=720,
                          help="each VM is normalized by its own first this many samples, "
                               "as the trainer does at run time (default 720 = 1 h at 5 s)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(run=run_pretrain)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a pretrained checkpoint on one VM's labelled series")
    finetune.add_argument("--from", dest="source", required=True, type=Path,
                          help="pretrained checkpoint folder")
    finetune.add_argument("--data", required=True, type=Path,
                          help="labelled CSV (timestamp,<metrics>,label)")
    finetune.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    finetune.add_argument("--bundle", type=Path, help="also export an agent bundle here")
    finetune.add_argument("--batches", type=int, default=200, help="mini-batches at most")
    finetune.add_argument("--freeze-early", action="store_true",
                          help="train only the classifier, keep the feature layers fixed")
    finetune.add_argument("--keep-normalization", action="store_true",
                          help="keep the checkpoint's statistics instead of refitting on --data")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(run=run_finetune)

    detection = bench.add_parser(
        "detection", help="pretrain / fine-tune / evaluate protocol on a folder of series")
    detection.add_argument("--data", required=True, type=Path,
                           help="folder of series folders with train and labelled test parts")
    detection.add_argument("--detectors",
                           default="zoom-cnn,cnn,mlp,zoom-2,zoom-4,residual,subspace,fused,pca")
    detection.add_argument("--labels", choices=("head", "none"), default="head",
                           help="head: labels of the first 30 %% of each test part pick "
                                "thresholds and fine-tune; none: no label of the target "
                                "is used (thresholds from --false-alarm-rate on the train part)")
    detection.add_argument("--false-alarm-rate", type=float, default=0.005,
                           help="label-free thresholds flag this share of the train part")
    detection.add_argument("--threshold-rule", choices=("tail", "quantile"), default="tail",
                           help="label-free threshold: peaks-over-threshold fit (as the "
                                "trainer) or the train part's empirical quantile")
    detection.add_argument("--head-rule", choices=("refit", "best_f1"), default="refit",
                           help="with labels, the label-free rows (residual, fused, pca): "
                                "refit on the train part plus the head's normal samples and "
                                "threshold from --false-alarm-rate (as the trainer), or the "
                                "best-F1 threshold on the head")
    detection.add_argument("--weight-rule", choices=("injected", "head", "fixed"),
                           default="injected",
                           help="fused's network weight: the one that best ranks faults "
                                "injected into the fitted data (as the trainer), the head's "
                                "labels where they hold an anomaly, or the fixed --cnn-weight")
    detection.add_argument("--cnn-weight", type=float,
                           help="fused's network weight under --weight-rule fixed, 0-1 "
                                "(default 0.5; 0 = the deviation alone on fused's threshold)")
    detection.add_argument("--subspace-variance", type=float,
                           help="fused's unsupervised part averages in the distance from "
                                "the subspace explaining this share of variance (default: "
                                "the trainer's adaptation.subspace_variance); 0 = no such "
                                "part")
    detection.add_argument("--normal-states", type=int,
                           help="and the distance from the nearest of this many usual "
                                "states (default: the trainer's adaptation.normal_states); "
                                "0 = no such part")
    detection.add_argument("--refresh", type=int,
                           help="refit residual, subspace, states and fused every this many test "
                                "samples on the newest --history samples outside earlier "
                                "alarms, as the trainer refits a VM (default: the trainer's "
                                "adaptation.refresh_samples); 0 = one fit on the train part")
    detection.add_argument("--history", type=int,
                           help="samples each refit learns from (default: the trainer's "
                                "adaptation.history_samples)")
    detection.add_argument("--json", type=Path, help="write the results here")
    detection.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    detection.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    detection.add_argument("--folds", type=int, default=0,
                           help="0 = leave-one-out pretraining per target (the protocol); "
                                "K = leave one fold of K out, K times fewer pretrainings")
    detection.add_argument("--pretrain-batches", type=int)
    detection.add_argument("--finetune-batches", type=int,
                           help="at most this many fine-tuning batches (0 = pretrained only)")
    detection.add_argument("--max-series", type=int)
    detection.add_argument("--seed", type=int, default=0)
    detection.set_defaults(run=run_bench_detection)



def run_pretrain(args: argparse.Namespace) -> int:
    import numpy as np

    from vmad.evaluation import best_f1_threshold
    from vmad.series import list_series_folders, read_series_folder
    from vmad.synthetic import generate_fleet
    from vmad.trainer.checkpoint import Checkpoint, save_checkpoint
    from vmad.trainer.datasets import WindowPool, WindowSource
    from vmad.trainer.export import export_bundle
    from vmad.trainer.models import build_model
    from vmad.trainer.training import TrainConfig, predict_proba, train
    from vmad.windows import Normalizer

    series = generate_fleet(args.seed, args.synthetic_vms, args.synthetic_samples)
    if args.data is not None:
        series += [read_series_folder(folder)[1] for folder in list_series_folders(args.data)]
    metrics = series[0].metrics
    series = [s.select(metrics) for s in series]
    floors = _scale_floors(metrics)
    # Each VM normalized by its own first hour, as the trainer adapts every VM at run time;
    # the pooled statistics only serve the warm-up bundle (scored, never alarming).
    normalizer = Normalizer.fit(np.concatenate([s.values for s in series]), floor=floors)
    own = [Normalizer.fit(s.values[:args.warmup], floor=floors) for s in series]
    cut = [int(len(s) * 0.85) for s in series]
    fit = WindowPool([WindowSource.from_series(s, n, args.window, start=args.warmup, stop=c)
                      for s, n, c in zip(series, own, cut, strict=True)])
    held = WindowPool([WindowSource.from_series(s, n, args.window, start=c)
                       for s, n, c in zip(series, own, cut, strict=True)])
    validation = (held[np.arange(len(held))], held.labels)
    model = build_model(args.kind, len(metrics), args.window)
    config = TrainConfig(max_batches=args.batches, batch_size=128, eval_every=50, patience=5,
                         seed=args.seed)
    result = train(model, fit, fit.labels, config, validation=validation, progress="pretrain")
    provenance = {
        "command": "vmad pretrain", "seed": args.seed, "synthetic_vms": args.synthetic_vms,
        "synthetic_samples": args.synthetic_samples, "data": str(args.data or ""),
        "batches": result.batches, "validation_loss": result.best_validation_loss,
        "normalization": f"per VM, its first {args.warmup} samples",
    }
    if args.data is None and args.calibration_vms > 0:
        threshold, calibration = _calibrate(model, args)
        provenance["calibration"] = calibration
        print(f"calibrated on {args.calibration_vms} unseen VMs: " + ", ".join(
            f"{k} {v:.3f}" for k, v in calibration.items() if isinstance(v, float)))
    else:
        threshold = best_f1_threshold(validation[1], predict_proba(model, validation[0]))
    checkpoint = Checkpoint(model, args.kind, metrics, args.window, normalizer, threshold,
                            provenance)
    save_checkpoint(args.out, checkpoint)
    print(f"pretrained {args.kind}: {result.batches} batches in {result.seconds:.1f} s, "
          f"validation loss {result.best_validation_loss}, threshold {threshold:.3f} "
          f"-> {args.out}")
    if args.bundle is not None:
        bundle = export_bundle(checkpoint, f"{args.kind}-pretrained-s{args.seed}", args.bundle)
        print(f"bundle {bundle.metadata.version} sha256 {bundle.metadata.onnx_sha256[:12]} "
              f"-> {args.bundle}")
    return 0


def _scale_floors(metrics: tuple[str, ...]) -> Any:
    from vmad.schema import DEFAULT_METRICS, DEFAULT_SCALE_FLOORS

    return list(DEFAULT_SCALE_FLOORS) if tuple(metrics) == DEFAULT_METRICS else 0.0


def _calibrate(model: Any, args: argparse.Namespace) -> tuple[float, dict]:
    """The threshold flagging `args.false_alarm_rate` of normal windows on synthetic VMs
    the model never saw (their own seeds, each normalized by its own first `--warmup`
    samples, scored after them), and what it catches there. Not on held-out tails of the
    training VMs: a fresh VM's levels are new, and scores there run higher."""
    import numpy as np

    from vmad.evaluation import false_alarm_threshold, score_detection
    from vmad.synthetic import generate_fleet
    from vmad.trainer.datasets import WindowSource
    from vmad.trainer.training import predict_proba
    from vmad.windows import Normalizer

    fleet = generate_fleet(args.seed + 10_000, args.calibration_vms, args.synthetic_samples)
    floors = _scale_floors(fleet[0].metrics)
    sources = [WindowSource.from_series(vm, Normalizer.fit(vm.values[:args.warmup], floor=floors),
                                        args.window, start=args.warmup) for vm in fleet]
    scores = np.concatenate([predict_proba(model, s.gather(np.arange(len(s)))) for s in sources])
    labels = np.concatenate([s.labels for s in sources]).astype(bool)
    threshold = false_alarm_threshold(scores[~labels], args.false_alarm_rate)
    result = score_detection(labels, scores, threshold)
    return threshold, {
        "vms": args.calibration_vms, "seed": args.seed + 10_000,
        "target_false_alarm_rate": args.false_alarm_rate,
        **{k: float(getattr(result, k)) for k in (
            "false_alarm_rate", "precision", "recall", "point_f1", "event_recall",
            "event_precision", "auc")},
    }


def run_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    from vmad.series import read_series
    from vmad.trainer.checkpoint import load_checkpoint, save_checkpoint
    from vmad.trainer.datasets import WindowSource
    from vmad.trainer.export import export_bundle
    from vmad.trainer.training import TrainConfig, calibrated_threshold, train
    from vmad.windows import Normalizer

    checkpoint = load_checkpoint(args.source)
    series = read_series(args.data, required_metrics=checkpoint.metrics).select(checkpoint.metrics)
    if series.labels is None:
        from vmad.errors import UsageError

        raise UsageError(f"{args.data} has no label column: fine-tuning needs labels")
    if not args.keep_normalization:
        checkpoint.normalizer = Normalizer.fit(series.values)
    source = WindowSource.from_series(series, checkpoint.normalizer, checkpoint.window)
    windows = source.gather(np.arange(len(source)))
    config = TrainConfig(max_batches=args.batches, lr=3e-4, freeze_early=args.freeze_early,
                         seed=args.seed)
    result = train(checkpoint.model, windows, source.labels, config, progress="fine-tune")
    threshold = calibrated_threshold(checkpoint.model, windows, source.labels)
    if threshold is None:
        # One class gives no best-F1 threshold: all anomalous would set one that flags
        # every window, all normal one above every window seen.
        print(f"threshold kept at {checkpoint.threshold:.3f}: the labelled windows of "
              f"{args.data} hold one class", file=sys.stderr)
    else:
        checkpoint.threshold = threshold
    checkpoint.provenance = {**checkpoint.provenance, "finetuned_on": str(args.data),
                             "finetune_batches": result.batches, "seed": args.seed}
    save_checkpoint(args.out, checkpoint)
    print(f"fine-tuned {checkpoint.kind}: {result.batches} batches in {result.seconds:.1f} s "
          f"-> {args.out}")
    if args.bundle is not None:
        export_bundle(checkpoint, f"{checkpoint.kind}-{series.name}", args.bundle)
        print(f"bundle -> {args.bundle}")
    return 0


def run_bench_detection(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vmad.trainer.evaluate import (
        DETECTORS,
        QUICK,
        ProtocolConfig,
        run_detection_benchmark,
        write_json,
    )

    config = QUICK if args.quick else ProtocolConfig()
    config = replace(config, folds=args.folds, seed=args.seed, labels=args.labels,
                     false_alarm_rate=args.false_alarm_rate,
                     threshold_rule=args.threshold_rule, head_rule=args.head_rule,
                     weight_rule=args.weight_rule)
    if args.subspace_variance is not None:
        config = replace(config, subspace_variance=args.subspace_variance)
    if args.normal_states is not None:
        if args.normal_states < 0:
            from vmad.errors import UsageError
            raise UsageError(f"--normal-states must be >= 0, got {args.normal_states}")
        config = replace(config, normal_states=args.normal_states)
    if args.cnn_weight is not None:
        if not 0.0 <= args.cnn_weight <= 1.0:
            from vmad.errors import UsageError

            raise UsageError(f"--cnn-weight must lie in [0, 1], got {args.cnn_weight}")
        config = replace(config, cnn_weight=args.cnn_weight)
    if args.refresh is not None:
        config = replace(config, refresh=args.refresh)
    if args.history is not None:
        config = replace(config, history=args.history)
    if args.max_series is not None:
        config = replace(config, max_series=args.max_series)
    if args.pretrain_batches is not None:
        config = replace(config, pretrain=replace(config.pretrain,
                                                  max_batches=args.pretrain_batches))
    if args.finetune_batches is not None:
        config = replace(config, finetune=replace(config.finetune,
                                                  max_batches=args.finetune_batches))
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        from vmad.errors import UsageError

        raise UsageError(f"unknown detectors {unknown}; choose from {', '.join(DETECTORS)}")
    result = run_detection_benchmark(
        args.data, detectors, config, progress=True,
        on_result=lambda s, d, r: print(
            f"{s:>16} {d:>9}  point F1 {r.point_f1:.3f}  event F1 {r.event_f1:.3f}  "
            f"precision {r.precision:.3f}  recall {r.recall:.3f}  "
            f"false alarms {r.false_alarm_rate:.4f}  AUC {r.auc:.3f}", flush=True),
    )
    print_table(result)
    if args.json is not None:
        write_json(result, args.json)
        print(f"results -> {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown_tables(result))
        print(f"tables -> {args.markdown}")
    return 0


def _cell(scores: dict, column: str) -> str:
    value = scores.get(column, float("nan"))
    return "-" if value != value else f"{value:.3f}"  # NaN: not defined for this detector


def markdown_tables(result: dict) -> str:
    """The mean table (one row per detector) and the per-series point-wise F1 table."""
    detectors = result["protocol"]["detectors"]
    header = "| detector | " + " | ".join(TABLE_HEADERS[c] for c in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for detector in detectors:
        scores = result["mean"][detector]
        lines.append(f"| {detector} | " + " | ".join(_cell(scores, c) for c in TABLE_COLUMNS)
                     + " |")
    lines += ["", "Point-wise F1 per series:", "",
              "| series | " + " | ".join(detectors) + " |", "|---" * (len(detectors) + 1) + "|"]
    for name, scores in result["series"].items():
        best = max(scores[d]["point_f1"] for d in detectors)
        cells = [f"**{scores[d]['point_f1']:.3f}**" if scores[d]["point_f1"] == best
                 else f"{scores[d]['point_f1']:.3f}" for d in detectors]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    detectors = result["protocol"]["detectors"]
    table = Table(title="Detection: point-wise and event-wise, no point adjustment")
    table.add_column("series", no_wrap=True)
    table.add_column("detector", no_wrap=True)
    for column in TABLE_COLUMNS:
        table.add_column(TABLE_HEADERS[column], justify="right")
    rows = [*result["series"].items(), ("MEAN", result["mean"])]
    for name, scores in rows:
        for detector in detectors:
            table.add_row(name, detector, *(_cell(scores[detector], c) for c in TABLE_COLUMNS))
        table.add_section()
    # Wide enough for every column: a log file must not get a truncated table.
    Console(width=max(120, Console().width)).print(table)
