"""Out of the box on unseen synthetic VMs: the shipped detector, adapted without labels.

For each unseen VM (seeds 900-909 by default, `--first-seed` for another draw) the
trainer's label-free adaptation (trainer/adaptation.py) runs as the running trainer
does it (trainer.yaml's `adaptation` defaults): fitted on the VM's first `--warmup`
samples, refitted every `--refresh` samples on the newest `history_samples` outside the
windows it raised alarms on, and an alarm raised once `--alarm-after` windows in a row
reach the threshold. Every window after the warm-up is scored by the adaptation in
force at that moment. Rows: the fused score the agent runs, the network alone and the
per-metric deviation alone (each with its own threshold at the same target, refitted
the same way), the fused score after the trainer's label-free fine-tune
(`--finetune-batches` on the warm-up history with synthetic faults injected,
trainer/self_supervised.py), and the pooled warm-up bundle at its shipped threshold,
window by window (what the agent would flag if it did not hold alarms back during
warm-up), and the static limits an operator would set instead (CPU or memory at or
above 90 %, the same `--alarm-after` windows in a row). No label is used anywhere,
except by the rows `--labelled` (the trainer holds the labels of a stretch after the
warm-up) and `--label-false-alarms` (an operator labels the false alarms normal with
the command the agent prints, a few per VM) add.

`--real DIR` scores real VMs instead: the traces of Bitbrains' Rnd VMs
(../shared/datasets/bitbrains-rnd, one file per VM), their CPU, memory, disk and network
in the agent's units, with the same generated faults injected into them
(vmad/synthetic.py `inject_faults`, seeded from `--first-seed`). The traces hold a
sample every 5 minutes; here each is taken as one agent sample (5 s), so the faults
last as many samples as at the agent's interval and the background moves as much
between two samples as a real VM does in 5 minutes: a harder test of false alarms
than the generator's. A real trace is unlabelled, so its "false alarms" also count
whatever unusual it really holds: an upper bound. A trace that cannot be scored (too
few samples of a running VM, a column missing) is skipped by name, on the console and in
the JSON's `skipped`, and the others are scored; rows with a missing or non-numeric
value are left out and counted.

    python bench/normalization.py            # 10 VMs x 6000 samples, about a minute
    python bench/normalization.py --quick    # 3 VMs x 2000 samples: a smoke run
    python bench/normalization.py --refresh 0 --alarm-after 1   # one fit, every window
    python bench/normalization.py --json bench/results/normalization.json
    python bench/normalization.py --labelled 1440   # + a row whose trainer has labels
    python bench/normalization.py --real ../shared/datasets/bitbrains-rnd --vms 100
    python bench/normalization.py --label-false-alarms 3   # + an operator's few labels
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import nn

from vmad.edge_agent.config import AgentConfig
from vmad.evaluation import DetectionScores, events, run_lengths, score_detection
from vmad.schema import DEFAULT_SCALE_FLOORS
from vmad.synthetic import generate_vm, inject_faults
from vmad.trainer.adaptation import alarm_covered, fit_adaptation, outside_alarms
from vmad.trainer.checkpoint import Checkpoint, load_default_checkpoint
from vmad.trainer.config import AdaptationSettings, TrainingSettings
from vmad.trainer.injection import injected_validation_set
from vmad.trainer.self_supervised import (
    finetune_self_supervised,
    self_supervised_data,
    validation_threshold,
)
from vmad.trainer.training import TrainConfig, predict_logits, predict_proba
from vmad.windows import Normalizer, make_windows

COLUMNS = ("false_alarm_rate", "precision", "recall", "point_f1", "event_recall", "auc")
# The usual static alert on a VM: CPU or memory at or above this share of capacity.
STATIC_LIMIT_PERCENT = 90.0
KIB_PER_MB = 1024.0
# The columns of a Bitbrains trace the agent's four metrics are made of.
TRACE_COLUMNS = ("cpu_usage_pct", "mem_capacity_kb", "mem_usage_kb", "disk_read_kbs",
                 "disk_write_kbs", "net_rx_kbs", "net_tx_kbs")
# When the agent reminds of a lasting alarm, in samples at its default interval: the
# first reminder 60 samples after the alarm started, then every 720.
REMINDERS = tuple(round(AgentConfig.model_fields[key].default
                        / AgentConfig.model_fields["interval_s"].default)
                  for key in ("alarm_first_reminder_s", "alarm_reminder_s"))
# The trainer's least time between two label refits of a VM, in samples (12).
LABEL_REFIT_SAMPLES = round(AdaptationSettings.model_fields["label_refit_interval_s"].default
                            / AgentConfig.model_fields["interval_s"].default)


def real_vm_values(path: Path) -> tuple[np.ndarray, int]:
    """A Bitbrains trace (`vm-NNN.csv.gz`) as `[samples, 4]` in DEFAULT_METRICS' units:
    CPU %, memory used over provisioned %, disk read + write and network received + sent
    in MB/s; and how many rows were left out for a missing or non-numeric value. Rows
    where no memory was provisioned (the VM was not running) are left out too. Raises
    ValueError for a file without those columns."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        header = handle.readline().strip().split(",")
    missing = [column for column in TRACE_COLUMNS if column not in header]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in its header")
    table = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64,
                                        usecols=TRACE_COLUMNS))
    complete = np.all([np.isfinite(table[name]) for name in table.dtype.names], axis=0)
    table = table[complete & (table["mem_capacity_kb"] > 0)]
    values = np.column_stack([
        np.clip(table["cpu_usage_pct"], 0, 100),
        np.clip(100 * table["mem_usage_kb"] / table["mem_capacity_kb"], 0, 100),
        np.clip(table["disk_read_kbs"] + table["disk_write_kbs"], 0, None) / KIB_PER_MB,
        np.clip(table["net_rx_kbs"] + table["net_tx_kbs"], 0, None) / KIB_PER_MB])
    return values.reshape(-1, 4), int(np.count_nonzero(~complete))


def static_limits(values: np.ndarray, alarm_after: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (the larger of CPU and memory, as a share) and alarms of the static alert:
    `alarm_after` samples in a row at or above STATIC_LIMIT_PERCENT."""
    level = np.maximum(values[:, 0], values[:, 1])
    return (level / 100).astype(np.float32), \
        run_lengths(level >= STATIC_LIMIT_PERCENT, 0) >= alarm_after


def _finetuned_without_labels(shipped: Checkpoint, history: np.ndarray, batches: int,
                              seed: int) -> tuple[nn.Module, Normalizer, float]:
    """What the trainer's fine-tune does for an adapted VM without labels: its own
    statistics, its warm-up history with faults injected (trainer/self_supervised.py),
    and the network's threshold recalibrated on the injected validation set."""
    training = TrainingSettings()
    normalizer = Normalizer.fit(history, floor=list(DEFAULT_SCALE_FLOORS))
    model = copy.deepcopy(shipped.model)
    data = self_supervised_data(history, shipped.window, seed=seed)
    finetune_self_supervised(
        model, data, normalizer.apply_windows,
        TrainConfig(max_batches=batches, batch_size=training.batch_size, lr=training.lr,
                    seed=training.seed))
    threshold = validation_threshold(model, data, normalizer.apply_windows)
    return model, normalizer, shipped.threshold if threshold is None else threshold


def run_like_trainer(
    model: nn.Module, values: np.ndarray, window: int, settings: AdaptationSettings, *,
    refresh: int, cnn_weight: float, cnn_weights: tuple[float, ...],
    network_threshold: float | None, first_normalizer: Normalizer | None = None,
    labels: np.ndarray | None = None, labelled_until: int = 0, false_alarm_labels: int = 0,
    reminders: tuple[int, int] = REMINDERS,
) -> tuple[np.ndarray, np.ndarray, list[float], int]:
    """Scores and alarms of every sample's window after the warm-up, with the adaptation
    in force when it arrived (the first fit on the warm-up, a refit every `refresh`
    samples, 0 = never, on the VM's unflagged recent history), and each fit's network
    weight: chosen from `cnn_weights` on faults injected into the fitted history, as the
    trainer does, or `cnn_weight` when `cnn_weights` is empty. With `labels`, the
    trainer holds the labels of the samples before `labelled_until` (an operator's
    `vmad label`, `vmad inject`): refits leave labelled faults out and keep samples
    labelled normal even where an alarm covered them, as the trainer.
    `false_alarm_labels` > 0: an operator reviews the alarms instead (`labels` being the
    truth) and labels the false ones normal as the agent prints the command
    (`operator_labels`), up to that many labels on the VM; each label refits the VM
    when it arrives, as the trainer does (no sooner than LABEL_REFIT_SAMPLES after the
    last such refit), and the schedule goes on from that refit.
    Also returns how many labels were given."""
    warmup, n = settings.warmup_samples, len(values)
    scores = np.zeros(n, dtype=np.float32)
    alarms = np.zeros(n, dtype=bool)
    step = refresh or n
    run = 0  # windows in a row at the threshold, carried across refits as in the agent
    chosen: list[float] = []
    preferred: float | None = None  # the previous fit's preferred network weight
    known = labels is not None and labelled_until > 0
    reviewed = np.zeros(n, dtype=bool)  # alarmed windows an operator labelled normal
    given = 0
    label_refit = -LABEL_REFIT_SAMPLES  # when the last label refit ran
    start = warmup
    while start < n:
        stop = min(n, start + step)  # the trainer refits `refresh` samples after a fit
        if labels is not None and given < false_alarm_labels:
            for covered in operator_labels(alarms, labels, start, window, reminders,
                                           reviewed):
                reviewed |= covered
                given += 1
                if given == false_alarm_labels:
                    break
        # The trainer's refit data (VMModels._normal_history), sample numbers as times.
        first = max(0, start - settings.history_samples)
        # Only the labels the trainer holds by then: those before labelled_until.
        held = np.arange(first, start) < labelled_until
        keep = ~((labels[first:start] == 1) & held) if known else None
        normal = (labels[first:start] == 0) & held if known else None
        if given:
            normal = reviewed[first:start] | (False if normal is None else normal)
        # The rows a refit fits (sample numbers), and which of them are labelled normal:
        # the refit obeys them.
        rows = np.arange(warmup) if start == warmup else outside_alarms(
            np.arange(first, start), np.arange(first, start),
            first + np.flatnonzero(alarms[first:start]), window, window, keep=keep,
            normal=normal)
        raw = values[rows]
        labelled_normal = normal[rows - first] if start > warmup and normal is not None \
            else None
        adaptation = fit_adaptation(
            model, raw, window, floors=list(DEFAULT_SCALE_FLOORS),
            components=settings.components, cnn_weight=cnn_weight,
            false_alarm_rate=settings.target_false_alarm_rate,
            min_deviation=settings.min_deviation, network_threshold=network_threshold,
            normalizer=first_normalizer if start == warmup else None,
            injected=injected_validation_set(raw, window) if cnn_weights else None,
            cnn_weights=cnn_weights,
            subspace_variance=settings.subspace_variance,
            normal_states=settings.normal_states, preferred_before=preferred,
            labelled_normal=labelled_normal)
        preferred = adaptation.preferred_cnn_weight
        chosen.append(adaptation.fusion.cnn_weight)
        normalized = adaptation.normalizer.apply(values[start - window + 1:stop])
        logits = predict_logits(model, make_windows(normalized, window))
        scores[start:stop] = adaptation.score(logits, normalized[window - 1:])
        lengths = run_lengths(scores[start:stop] >= adaptation.threshold, run)
        alarms[start:stop] = lengths >= settings.alarm_after
        if labels is not None and given < false_alarm_labels:
            # A label of normal refits the VM when it arrives (or once the trainer's
            # rate limit allows): the rest of this stretch is scored by that refit.
            moment = next((t for t in _label_moments(alarms, start, stop, reminders)
                           if next(operator_labels(alarms, labels, t, window, reminders,
                                                   reviewed), None) is not None), stop)
            moment = max(moment, label_refit + LABEL_REFIT_SAMPLES)
            if moment < stop:
                label_refit = moment
                alarms[moment:stop] = False
                lengths, stop = lengths[:moment - start], moment
        run = int(lengths[-1])
        start = stop
    return scores[warmup:], alarms[warmup:], chosen, given


def operator_labels(alarms: np.ndarray, labels: np.ndarray, now: int, window: int,
                    reminders: tuple[int, int], reviewed: np.ndarray) -> Iterator[np.ndarray]:
    """What an operator who knows the truth (`labels`) labels normal at sample `now`,
    oldest alarm first, as masks of samples: each false alarm run (most of its alarmed
    samples normal) not labelled yet (`reviewed`), its windows but the faults inside,
    up to its end once it has ended, or up to the agent's newest reminder while it goes
    on (`reminders`: the first after so many samples, then every so many)."""
    for first_alarm, end in events(alarms[:now]):
        if end == now:  # still going
            printed = _reminders_printed(first_alarm, end, reminders)
            if not printed:
                continue
            end = printed[-1] + 1
        # What the trainer's refits leave out for these alarms, but the faults inside.
        covered = alarm_covered(np.arange(len(alarms)), np.arange(first_alarm, end),
                                window) & (labels == 0)
        if labels[first_alarm:end].mean() < 0.5 and (covered & ~reviewed).any():
            yield covered


def _reminders_printed(first_alarm: int, end: int, reminders: tuple[int, int]) -> range:
    """The samples of an alarm run [first_alarm, end) at which the agent reminded of it."""
    first, every = reminders
    return range(first_alarm + first, end, every)


def _label_moments(alarms: np.ndarray, start: int, stop: int,
                   reminders: tuple[int, int]) -> list[int]:
    """Samples in (start, stop) at which the agent has just printed a label command for
    an alarm run: the sample after its end line, or after one of its reminders."""
    moments = []
    for first_alarm, end in events(alarms[:stop]):
        if end > start:
            moments += [t + 1 for t in _reminders_printed(first_alarm, min(end, stop) - 1,
                                                          reminders)]
            moments.append(end + 1)
    return sorted(t for t in moments if start < t < stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    defaults = AdaptationSettings()
    parser.add_argument("--warmup", type=int, default=defaults.warmup_samples,
                        help="samples of warm-up (default: trainer.yaml's, 720 = 1 h at 5 s)")
    parser.add_argument("--refresh", type=int, default=defaults.refresh_samples,
                        help="refit after this many more samples, 0 = never (default: "
                             "trainer.yaml's, 720 = 1 h at 5 s)")
    parser.add_argument("--alarm-after", type=int, default=defaults.alarm_after,
                        help="windows in a row at the threshold before an alarm "
                             "(default: trainer.yaml's)")
    parser.add_argument("--vms", type=int, default=10, help="unseen VMs to score")
    parser.add_argument("--first-seed", type=int, default=900,
                        help="seed of the first VM (another draw: e.g. 1000)")
    parser.add_argument("--samples", type=int, default=6000, help="samples per scored VM")
    parser.add_argument("--cnn-weight", type=float, default=defaults.cnn_weight,
                        help="the network's weight in the fused score (trainer.yaml's default)")
    parser.add_argument("--cnn-weights", type=float, nargs="*", default=defaults.cnn_weights,
                        help="network weights the fused rows choose from per fit on injected "
                             "faults (trainer.yaml's; none = always --cnn-weight)")
    parser.add_argument("--finetune-batches", type=int, default=100,
                        help="label-free fine-tune batches of the fine-tuned row (0: no row)")
    parser.add_argument("--labelled", type=int, default=0,
                        help="adds a row whose trainer holds the labels of this many samples "
                             "after the warm-up (as `vmad label` / `vmad inject` give it); "
                             "every row is then scored after them only (0: no row)")
    parser.add_argument("--label-false-alarms", type=int, default=0, metavar="RUNS",
                        help="adds a row whose operator labels normal each false alarm run "
                             "when it ends or at the agent's reminders while it lasts (after "
                             "5 min, then hourly), "
                             "up to RUNS labels per VM (0: no row)")
    parser.add_argument("--real", type=Path,
                        help="score these real VMs' traces (a Bitbrains folder) with faults "
                             "injected, instead of generated VMs")
    parser.add_argument("--json", type=Path, help="write per-VM and pooled results here")
    args = parser.parse_args()
    if args.quick:
        args.vms, args.samples = 3, 2000
    settings = AdaptationSettings(warmup_samples=args.warmup, cnn_weight=args.cnn_weight,
                                  refresh_samples=max(1, args.refresh),
                                  alarm_after=args.alarm_after)
    shipped = load_default_checkpoint()
    window = shipped.window
    network_threshold = shipped.threshold if settings.network_floor else None
    started = time.perf_counter()
    variants = ["fused (shipped)", "network alone", "deviation alone",
                "fused, fine-tuned without labels", "pooled warm-up bundle", "static limits"]
    if args.finetune_batches == 0:
        variants.remove("fused, fine-tuned without labels")
    labelled_row = f"fused, {args.labelled} samples labelled"
    if args.labelled:
        variants.insert(1, labelled_row)
    reviewed_row = f"fused, up to {args.label_false_alarms} false alarms labelled normal"
    if args.label_false_alarms:
        variants.insert(1, reviewed_row)
    labels_given: list[int] = []
    totals: dict[str, tuple[list, list]] = {name: ([], []) for name in variants}
    seeds = range(args.first_seed, args.first_seed + args.vms)
    refits = f"refitted every {args.refresh}" if args.refresh else "never refitted"
    scored_after = args.warmup + args.labelled
    traces = sorted(args.real.glob("vm-*.csv*"))[:args.vms] if args.real else []
    if args.real and len(traces) < args.vms:
        parser.error(f"{args.real} holds {len(traces)} VM traces (vm-*.csv[.gz]), "
                     f"{args.vms} asked for")
    names = [trace.name.split(".")[0] for trace in traces]
    source = f"Real VMs ({args.real.name}, {names[0]}-{names[-1]}, faults " \
        f"seeded {seeds[0]}-{seeds[-1]}" if traces else \
        f"Unseen synthetic VMs (seeds {seeds[0]}-{seeds[-1]}"
    table = Table(title=f"{source}, {args.samples} samples each, adapted on the first "
                        f"{args.warmup}, {refits}, alarm after {args.alarm_after} windows in "
                        f"a row, scored after sample {scored_after})")
    per_vm: dict[str, dict[str, dict[str, float]]] = {}
    console = Console(width=160)
    weights_chosen: dict[str, list[float]] = {}
    table.add_column("VM")
    for name in variants:
        table.add_column(f"{name}: false alarms / recall", justify="right")
    # Real traces that cannot be scored, by name: one bad VM does not end a fleet's run.
    skipped: dict[str, str] = {}
    for index, seed in enumerate(seeds):
        if traces:
            try:
                values, incomplete = real_vm_values(traces[index])
            except ValueError as error:
                skipped[names[index]] = f"unreadable: {error}"
                console.print(f"skipped {traces[index]}: {skipped[names[index]]}",
                              style="yellow")
                continue
            if incomplete:
                console.print(f"{traces[index]}: {incomplete} rows with a missing or "
                              f"non-numeric value left out", style="yellow")
            values = values[:args.samples]
            if len(values) <= scored_after + window:
                skipped[names[index]] = (
                    f"{len(values)} samples of a running VM, too few to warm up and score "
                    f"(need more than {scored_after + window})")
                console.print(f"skipped {traces[index]}: {skipped[names[index]]}",
                              style="yellow")
                continue
            all_labels, _ = inject_faults(values, np.random.default_rng(seed))
            vm_name = names[index]
        else:
            vm, _ = generate_vm(seed, args.samples)
            assert vm.labels is not None
            values, all_labels, vm_name = vm.values.astype(np.float64), vm.labels, vm.name
        labels = all_labels[scored_after:].astype(bool)
        cells = []
        for name in variants:
            if name == "static limits":
                scores, alarms = static_limits(values, args.alarm_after)
                scores, alarms = scores[scored_after:], alarms[scored_after:]
            elif name == "pooled warm-up bundle":
                pooled = shipped.normalizer.apply(values.astype(np.float32))
                scores = predict_proba(shipped.model, make_windows(pooled, window))
                scores = scores[scored_after - window + 1:]
                alarms = scores >= shipped.threshold
            else:
                weight = {"network alone": 1.0, "deviation alone": 0.0}.get(
                    name, settings.cnn_weight)
                model, normalizer, floor = shipped.model, None, network_threshold
                if name == "fused, fine-tuned without labels":
                    model, normalizer, own = _finetuned_without_labels(
                        shipped, values[:args.warmup], args.finetune_batches, seed)
                    floor = own if settings.network_floor else None
                fixed = name in ("network alone", "deviation alone")
                known = name == labelled_row
                reviewing = args.label_false_alarms if name == reviewed_row else 0
                scores, alarms, chosen, given = run_like_trainer(
                    model, values, window, settings, refresh=args.refresh, cnn_weight=weight,
                    cnn_weights=() if fixed else tuple(args.cnn_weights),
                    network_threshold=floor, first_normalizer=normalizer,
                    labels=all_labels if known or reviewing else None,
                    labelled_until=scored_after if known else 0,
                    false_alarm_labels=reviewing)
                if reviewing:
                    labels_given.append(given)
                scores, alarms = scores[args.labelled:], alarms[args.labelled:]
                weights_chosen.setdefault(name, []).extend(chosen)
            result = _scored(labels, scores, alarms)
            totals[name][0].append((scores, alarms))
            totals[name][1].append(labels)
            cells.append(f"{result.false_alarm_rate:.4f} / {result.recall:.2f}")
            per_vm.setdefault(vm_name, {})[name] = result.to_dict()
            if name == reviewed_row:
                per_vm[vm_name][name]["labels_given"] = labels_given[-1]
        table.add_row(vm_name, *cells)
    if not per_vm:
        parser.error(f"no VM could be scored: {skipped}")
    console.print(table)
    if skipped:
        console.print(f"{len(skipped)} of {len(traces)} VMs skipped (named above); "
                      f"{len(per_vm)} scored")
    summary = Table(title="All scored windows together (each VM's own alarms)")
    summary.add_column("detector")
    summary.add_column("worst VM's false alarms", justify="right")
    for column in COLUMNS:
        summary.add_column(column, justify="right")
    pooled_rows = {}
    for name in variants:
        runs, label_list = totals[name]
        alarms = np.concatenate([a for _, a in runs])
        row = score_detection(np.concatenate(label_list), alarms.astype(np.float64), 0.5)
        row = replace(row, auc=float(np.nanmean([v[name]["auc"] for v in per_vm.values()])))
        worst = max(v[name]["false_alarm_rate"] for v in per_vm.values())
        summary.add_row(name, f"{worst:.4f}", *(f"{getattr(row, c):.4f}" for c in COLUMNS))
        pooled_rows[name] = {**row.to_dict(), "worst_vm_false_alarm_rate": worst}
    console.print(summary)
    if labels_given:
        console.print(f"{reviewed_row}: labels given per VM: mean {np.mean(labels_given):.2f}, "
                      f"max {max(labels_given)}, on {np.count_nonzero(labels_given)} of "
                      f"{len(labels_given)} VMs")
    for name, chosen in weights_chosen.items():
        if args.cnn_weights and name not in ("network alone", "deviation alone"):
            values_, counts = np.unique(chosen, return_counts=True)
            console.print(f"{name}: network weight chosen per fit "
                          + ", ".join(f"{v:g} x{c}" for v, c in zip(values_, counts, strict=True)))
    if args.json:
        args.json.write_text(json.dumps(
            {"settings": {**settings.model_dump(), "vms": args.vms, "samples": args.samples,
                          "first_seed": args.first_seed,
                          "real": None if args.real is None else str(args.real)},
             "pooled": pooled_rows, "vms": per_vm, "skipped": skipped}, indent=2,
            sort_keys=True) + "\n")
    console.print(f"{time.perf_counter() - started:.0f} s; AUC is the mean of the VMs' AUCs")


def _scored(labels: np.ndarray, scores: np.ndarray, alarms: np.ndarray) -> DetectionScores:
    """Counts from the alarms as raised, AUC from the scores."""
    result = score_detection(labels, alarms.astype(np.float64), 0.5)
    return replace(result, auc=score_detection(labels, scores, 0.5).auc)


if __name__ == "__main__":
    main()
