"""Which metric is to blame, on unseen synthetic VMs: a check that the attribution chosen
on SMD carries over to another kind of data.

Each unseen VM (seeds 900-909, as bench/normalization.py) is adapted on its own first
`--warmup` samples exactly as the trainer does (trainer/adaptation.py, the trainer's
scale floors); every fault after the warm-up names its cause metrics (a leak memory, a
hog CPU, a storm disk, a flood network, a mix both of its own), and each of its samples
is scored with OmniAnomaly's HitRate@100 % / @150 % (vmad.evaluation.hit_rate) for:
- "changed within the window": the bundle's contributions (trainer/attribution.py);
- "far from normal": the score's per-metric deviation of the newest sample from the
  VM's normal (trainer/residual.py), the previous contributions.
No label is used to fit anything.

    python bench/attribution.py [--json bench/results/attribution-synthetic.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vmad.evaluation import hit_rate
from vmad.schema import DEFAULT_METRICS, DEFAULT_SCALE_FLOORS
from vmad.synthetic import generate_vm
from vmad.trainer.adaptation import fit_adaptation
from vmad.trainer.checkpoint import load_default_checkpoint
from vmad.trainer.config import AdaptationSettings

RANKINGS = ("changed within the window", "far from normal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=AdaptationSettings().warmup_samples)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shipped = load_default_checkpoint()
    window = shipped.window
    table = Table(title=f"HitRate@100 % / @150 % on unseen synthetic VMs (seeds "
                        f"900-{899 + args.vms}, adapted on the first {args.warmup} samples)")
    table.add_column("VM")
    for name in RANKINGS:
        table.add_column(name, justify="right")
    result: dict[str, dict[str, list[float]]] = {}
    for seed in range(900, 900 + args.vms):
        vm, faults = generate_vm(seed, args.samples)
        adaptation = fit_adaptation(shipped.model, vm.values[:args.warmup], window,
                                    floors=list(DEFAULT_SCALE_FLOORS))
        assert adaptation.attribution is not None
        normalized = adaptation.normalizer.apply(vm.values)
        contributions = {
            RANKINGS[0]: adaptation.attribution.contributions_of_series(normalized, window),
            RANKINGS[1]: adaptation.residual.contributions(normalized)}
        causes = [(f.start, f.stop, [DEFAULT_METRICS.index(m) for m in f.metrics])
                  for f in faults]
        row = result[vm.name] = {}
        for name, values in contributions.items():
            row[name] = [hit_rate(values, causes, share, slice(args.warmup, None))
                         for share in (1.0, 1.5)]
        table.add_row(vm.name, *(f"{row[n][0]:.3f} / {row[n][1]:.3f}" for n in RANKINGS))
    mean = {name: np.nanmean([row[name] for row in result.values()], axis=0).tolist()
            for name in RANKINGS}
    table.add_row("mean", *(f"{mean[n][0]:.3f} / {mean[n][1]:.3f}" for n in RANKINGS))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"protocol": vars(args) | {"json": str(args.json)},
                                         "mean": mean, "vms": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
