"""Out of the box on unseen synthetic VMs: the shipped detector, adapted without labels.

For each unseen VM (seeds 900-909 by default, `--first-seed` for another draw) the
trainer's label-free adaptation (trainer/adaptation.py) is fitted on the VM's first
`--warmup` samples, exactly as the running trainer does (same defaults as trainer.yaml's
`adaptation` section: scale floors, per-metric deviation, network weight, 0.5 %
false-alarm target), and every window after the warm-up is scored. Rows: the fused
score the agent runs, the network alone and the per-metric deviation alone (each with
its own threshold at the same target), the fused score after the trainer's label-free
fine-tune (`--finetune-batches` on the warm-up history with synthetic faults injected,
trainer/self_supervised.py), and the pooled warm-up bundle at its shipped threshold
(what the agent would flag if it did not hold alarms back during warm-up).
No label is used anywhere.

    python bench/normalization.py            # 10 VMs x 6000 samples, about a minute
    python bench/normalization.py --quick    # 3 VMs x 2000 samples: a smoke run
    python bench/normalization.py --json bench/results/normalization.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import nn

from vmad.evaluation import score_detection
from vmad.schema import DEFAULT_SCALE_FLOORS
from vmad.synthetic import generate_vm
from vmad.trainer.adaptation import fit_adaptation
from vmad.trainer.checkpoint import Checkpoint, load_default_checkpoint
from vmad.trainer.config import AdaptationSettings, TrainingSettings
from vmad.trainer.self_supervised import finetune_self_supervised, self_supervised_data
from vmad.trainer.training import TrainConfig, predict_logits, predict_proba
from vmad.windows import Normalizer, make_windows

COLUMNS = ("false_alarm_rate", "precision", "recall", "point_f1", "event_recall", "auc")


def _finetuned_without_labels(shipped: Checkpoint, history: np.ndarray, batches: int,
                              seed: int) -> tuple[nn.Module, Normalizer]:
    """What the trainer's fine-tune does for an adapted VM without labels: its own
    statistics, its warm-up history with faults injected (trainer/self_supervised.py)."""
    training = TrainingSettings()
    normalizer = Normalizer.fit(history, floor=list(DEFAULT_SCALE_FLOORS))
    model = copy.deepcopy(shipped.model)
    data = self_supervised_data(history, shipped.window, seed=seed)
    finetune_self_supervised(
        model, data, lambda raw: np.ascontiguousarray(
            normalizer.apply(raw.transpose(0, 2, 1)).transpose(0, 2, 1)),
        TrainConfig(max_batches=batches, batch_size=training.batch_size, lr=training.lr,
                    seed=training.seed))
    return model, normalizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=int, default=AdaptationSettings().warmup_samples,
                        help="samples of warm-up (default: trainer.yaml's, 720 = 1 h at 5 s)")
    parser.add_argument("--vms", type=int, default=10, help="unseen VMs to score")
    parser.add_argument("--first-seed", type=int, default=900,
                        help="seed of the first VM (another draw: e.g. 1000)")
    parser.add_argument("--samples", type=int, default=6000, help="samples per scored VM")
    parser.add_argument("--cnn-weight", type=float, default=AdaptationSettings().cnn_weight,
                        help="the network's weight in the fused score (trainer.yaml's default)")
    parser.add_argument("--finetune-batches", type=int, default=100,
                        help="label-free fine-tune batches of the fine-tuned row (default 100)")
    parser.add_argument("--json", type=Path, help="write per-VM and pooled results here")
    args = parser.parse_args()
    if args.quick:
        args.vms, args.samples = 3, 2000
    settings = AdaptationSettings(warmup_samples=args.warmup, cnn_weight=args.cnn_weight)
    shipped = load_default_checkpoint()
    window = shipped.window
    started = time.perf_counter()
    variants = ("fused (shipped)", "network alone", "deviation alone",
                "fused, fine-tuned without labels", "pooled warm-up bundle")
    totals: dict[str, tuple[list, list]] = {name: ([], []) for name in variants}
    seeds = range(args.first_seed, args.first_seed + args.vms)
    table = Table(title=f"Unseen synthetic VMs (seeds {seeds[0]}-{seeds[-1]}, {args.samples} "
                        f"samples each, adapted on the first {args.warmup}, scored after)")
    per_vm: dict[str, dict[str, dict[str, float]]] = {}
    table.add_column("VM")
    for name in variants:
        table.add_column(f"{name}: false alarms / recall", justify="right")
    for seed in seeds:
        vm, _ = generate_vm(seed, args.samples)
        assert vm.labels is not None
        labels = vm.labels[args.warmup:].astype(bool)
        cells = []
        for name in variants:
            if name == "pooled warm-up bundle":
                pooled = shipped.normalizer.apply(vm.values)
                scores = predict_proba(shipped.model, make_windows(pooled, window))
                scores, threshold = scores[args.warmup - window + 1:], shipped.threshold
            else:
                weight = {"network alone": 1.0, "deviation alone": 0.0}.get(
                    name, settings.cnn_weight)
                model, normalizer = shipped.model, None
                if name == "fused, fine-tuned without labels":
                    model, normalizer = _finetuned_without_labels(
                        shipped, vm.values[:args.warmup], args.finetune_batches, seed)
                adaptation = fit_adaptation(
                    model, vm.values[:args.warmup], window,
                    floors=list(DEFAULT_SCALE_FLOORS), components=settings.components,
                    cnn_weight=weight, false_alarm_rate=settings.target_false_alarm_rate,
                    min_deviation=settings.min_deviation,
                    network_threshold=shipped.threshold if settings.network_floor else None,
                    normalizer=normalizer)
                normalized = adaptation.normalizer.apply(vm.values)
                logits = predict_logits(model, make_windows(normalized, window))
                deviation = adaptation.residual.score_samples(normalized[window - 1:])
                scores = adaptation.fusion.score(logits, deviation)[args.warmup - window + 1:]
                threshold = adaptation.threshold
            result = score_detection(labels, scores, threshold)
            totals[name][0].append(scores)
            totals[name][1].append((labels, threshold))
            cells.append(f"{result.false_alarm_rate:.4f} / {result.recall:.2f}")
            per_vm.setdefault(vm.name, {})[name] = result.to_dict()
        table.add_row(vm.name, *cells)
    console = Console(width=160)
    console.print(table)
    summary = Table(title="All scored windows together (each VM at its own threshold)")
    summary.add_column("detector")
    summary.add_column("worst VM's false alarms", justify="right")
    for column in COLUMNS:
        summary.add_column(column, justify="right")
    for name in variants:
        scores_list, pairs = totals[name]
        # Pool the per-VM decisions: each VM flags at its own threshold.
        flags = np.concatenate([s >= t for s, (_, t) in zip(scores_list, pairs, strict=True)])
        labels = np.concatenate([y for y, _ in pairs])
        pooled = score_detection(labels, flags.astype(np.float64), 0.5)
        auc = float(np.nanmean([score_detection(y, s, t).auc
                             for s, (y, t) in zip(scores_list, pairs, strict=True)]))
        worst = max(score_detection(y, s, t).false_alarm_rate
                    for s, (y, t) in zip(scores_list, pairs, strict=True))
        pooled = replace(pooled, auc=auc)
        summary.add_row(name, f"{worst:.4f}", *(f"{getattr(pooled, c):.4f}" for c in COLUMNS))
    console.print(summary)
    if args.json:
        pooled_rows = {}
        for name in variants:
            scores_list, pairs = totals[name]
            flags = np.concatenate([s >= t for s, (_, t) in zip(scores_list, pairs, strict=True)])
            labels = np.concatenate([y for y, _ in pairs])
            row = score_detection(labels, flags.astype(np.float64), 0.5).to_dict()
            row["auc"] = float(np.nanmean([v[name]["auc"] for v in per_vm.values()]))
            row["worst_vm_false_alarm_rate"] = max(
                v[name]["false_alarm_rate"] for v in per_vm.values())
            pooled_rows[name] = row
        args.json.write_text(json.dumps(
            {"settings": {**settings.model_dump(), "vms": args.vms, "samples": args.samples,
                          "first_seed": args.first_seed},
             "pooled": pooled_rows, "vms": per_vm}, indent=2, sort_keys=True) + "\n")
    console.print(f"{time.perf_counter() - started:.0f} s; AUC is the mean of the VMs' AUCs")


if __name__ == "__main__":
    main()
