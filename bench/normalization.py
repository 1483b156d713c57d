"""Pooled versus per-VM normalization for the pretrained detector, on unseen synthetic VMs.

The shipped model normalizes every VM with statistics pooled over its pretraining fleet.
The alternative: normalize each VM by its own first hour (`--warmup` samples), in
pretraining, calibration and use alike. This script pretrains that variant with the same
settings as `vmad pretrain`, calibrates its threshold the same way (0.2 % of normal
windows on 4 unseen VMs), and scores both on further unseen VMs from the end of their
first hour on. Prints one row per VM and the totals.

    python bench/normalization.py            # 1500 batches at most, ~5 min on 2 cores
    python bench/normalization.py --quick    # 60 batches: a smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from vmad.evaluation import false_alarm_threshold, score_detection
from vmad.synthetic import generate_fleet, generate_vm
from vmad.trainer.checkpoint import load_default_checkpoint
from vmad.trainer.datasets import WindowPool, WindowSource
from vmad.trainer.models import build_model
from vmad.trainer.training import TrainConfig, predict_proba, train
from vmad.windows import Normalizer

COLUMNS = ("false_alarm_rate", "precision", "recall", "point_f1", "event_recall", "auc")


def own_sources(fleet: list, warmup: int, window: int) -> list[WindowSource]:
    return [WindowSource.from_series(vm, Normalizer.fit(vm.values[:warmup]), window,
                                     start=warmup) for vm in fleet]


def scores_of(model, sources: list[WindowSource]) -> tuple[np.ndarray, np.ndarray]:
    scores = [predict_proba(model, s.gather(np.arange(len(s)))) for s in sources]
    return np.concatenate(scores), np.concatenate([s.labels for s in sources])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=int, default=720, help="samples (720 = 1 h at 5 s)")
    parser.add_argument("--vms", type=int, default=10, help="unseen VMs to score")
    parser.add_argument("--samples", type=int, default=6000, help="samples per scored VM")
    args = parser.parse_args()
    shipped = load_default_checkpoint()
    window = shipped.window
    n_vms, n_samples, batches = (4, 4000, 60) if args.quick else (16, 20_000, 1500)

    started = time.perf_counter()
    fleet = generate_fleet(0, n_vms, n_samples)  # the shipped model's pretraining fleet
    cut = [int(len(vm) * 0.85) for vm in fleet]
    norms = [Normalizer.fit(vm.values[:args.warmup]) for vm in fleet]
    fit = WindowPool([WindowSource.from_series(vm, n, window, start=args.warmup, stop=c)
                      for vm, n, c in zip(fleet, norms, cut, strict=True)])
    held = WindowPool([WindowSource.from_series(vm, n, window, start=c)
                       for vm, n, c in zip(fleet, norms, cut, strict=True)])
    model = build_model(shipped.kind, len(shipped.metrics), window)
    result = train(model, fit, fit.labels,
                   TrainConfig(max_batches=batches, batch_size=128, eval_every=50, patience=5,
                               seed=0),
                   validation=(held[np.arange(len(held))], held.labels), progress="pretrain")
    calibration = own_sources(generate_fleet(10_000, 4, n_samples), args.warmup, window)
    scores, labels = scores_of(model, calibration)
    threshold = false_alarm_threshold(scores[~labels.astype(bool)], 0.002)
    seconds = time.perf_counter() - started

    variants = {"pooled (shipped)": (shipped.model, shipped.threshold, False),
                "per-VM first hour": (model, threshold, True)}
    table = Table(title=f"Unseen synthetic VMs (seeds 900-{899 + args.vms}, {args.samples} "
                        f"samples each, scored after the first {args.warmup})")
    table.add_column("VM")
    for name in variants:
        table.add_column(f"{name}: false alarms / recall", justify="right")
    totals: dict[str, tuple[list, list]] = {name: ([], []) for name in variants}
    for seed in range(900, 900 + args.vms):
        vm, _ = generate_vm(seed, args.samples)
        cells = []
        for name, (net, cut_off, own) in variants.items():
            normalizer = Normalizer.fit(vm.values[:args.warmup]) if own else shipped.normalizer
            source = WindowSource.from_series(vm, normalizer, window, start=args.warmup)
            s, y = scores_of(net, [source])
            r = score_detection(y, s, cut_off)
            totals[name][0].append(s)
            totals[name][1].append(y)
            cells.append(f"{r.false_alarm_rate:.4f} / {r.recall:.2f}")
        table.add_row(vm.name, *cells)
    console = Console(width=140)
    console.print(table)
    summary = Table(title="All scored windows together")
    summary.add_column("normalization")
    summary.add_column("threshold", justify="right")
    for column in COLUMNS:
        summary.add_column(column, justify="right")
    for name, (_, cut_off, _) in variants.items():
        r = score_detection(np.concatenate(totals[name][1]), np.concatenate(totals[name][0]),
                            cut_off)
        summary.add_row(name, f"{cut_off:.3f}", *(f"{getattr(r, c):.4f}" for c in COLUMNS))
    console.print(summary)
    console.print(f"per-VM variant: {result.batches} batches, trained and calibrated in "
                  f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
