"""`vmad demo`: the whole system on this machine in under three minutes.

Starts a controller and a trainer as real processes on loopback, then several simulated
agents (vmad/replay.py) that replay labelled series — synthetic, and SMD machines from
`../shared/datasets/smd` when present — through the same gRPC calls a real agent makes,
about 20 samples a second each (a day of 5-second samples in a few minutes). The trainer
reports each VM's state to the controller every few seconds; the controller's rule policy
answers (keep, fine-tune, reset); fine-tuned bundles are pushed back to the agents,
which score the rest of their series with them. A live table shows it; a summary ends it.

The real edge agent and the scripted `vmad inject memory-leak` join the demo when the
agent package (edge_agent/) provides them; without it the demo says so and runs the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["register", "run_demo"]

SMD_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "smd"


def register(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="controller + trainer + simulated agents on loopback, live, < 3 minutes")
    demo.add_argument("--seconds", type=float, default=120.0, help="replay time (default 120)")
    demo.add_argument("--synthetic", type=int, default=3, help="synthetic VMs (default 3)")
    demo.add_argument("--smd", type=int, default=2, help="SMD machines when present (default 2)")
    demo.add_argument("--rate", type=float, default=20.0, help="samples/s per simulated VM")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--keep", type=Path, help="keep configs, logs and data here")
    demo.set_defaults(run=run_demo)


def _sources(args: argparse.Namespace, n_samples: int) -> list[Any]:
    from vmad import replay

    try:
        series = replay.synthetic_series(args.seed, args.synthetic, n_samples)
    except ImportError:
        series = replay.simple_series(args.seed, args.synthetic, n_samples)
    if args.smd > 0 and SMD_DIR.is_dir():
        series += replay.load_smd(SMD_DIR, args.smd, n_samples)
    return series


def _pretrained(folder: Path, window: int, seed: int) -> Path:
    """The shipped pretrained checkpoint, or (when this checkout has none yet) a small
    Zoom-CNN pretrained here on generated series not used for replay."""
    from trainer.checkpoint import (
        DEFAULT_CHECKPOINT_DIR,
        Checkpoint,
        save_checkpoint,
    )

    if (DEFAULT_CHECKPOINT_DIR / "checkpoint.json").is_file():
        return DEFAULT_CHECKPOINT_DIR
    from trainer.models import build_model
    from trainer.training import TrainConfig, train
    from vmad.replay import simple_series
    from vmad.schema import DEFAULT_METRICS
    from vmad.windows import Normalizer, make_windows, window_labels

    series = simple_series(seed + 99, 4, 3000)
    normalizer = Normalizer.fit(np.concatenate([s.values for s in series]))
    windows = np.concatenate([make_windows(normalizer.apply(s.values), window)
                              for s in series])
    labels = np.concatenate([window_labels(s.labels, window) for s in series])
    model = build_model("zoom-cnn", len(DEFAULT_METRICS), window)
    train(model, windows, labels, TrainConfig(max_batches=150, batch_size=64, seed=seed))
    save_checkpoint(folder, Checkpoint(model, "zoom-cnn", DEFAULT_METRICS, window,
                                       normalizer, 0.5, {"command": "vmad demo (fallback)"}))
    return folder


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from controller.service import fetch_fleet
    from vmad.launch import free_port, start, wait_serving
    from vmad.replay import ReplayAgent, score_events

    console = Console()
    started = time.monotonic()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="vmad-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]vmad demo[/]: configs, logs and data in {workdir}")
    window = 32
    checkpoint = _pretrained(workdir / "pretrained", window, args.seed)
    from trainer.checkpoint import load_checkpoint
    from trainer.export import export_bundle

    initial = export_bundle(load_checkpoint(checkpoint), "initial")
    window = initial.window
    n_samples = int(args.seconds * args.rate)
    series = _sources(args, n_samples)

    c_port, t_port = free_port(), free_port()
    c_config = workdir / "controller.yaml"
    c_config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{c_port}", "database": str(workdir / "registry.sqlite"),
        "policy": {"rules": {"min_labelled": 64, "finetune_batches": 60, "cooldown_s": 15.0,
                             "min_f1": 0.6, "min_accuracy": 0.9}},
        "security": {"insecure": True},
    }))
    t_config = workdir / "trainer.yaml"
    t_config.write_text(yaml.safe_dump({
        "trainer_id": "demo-node", "listen": f"127.0.0.1:{t_port}",
        "data_dir": str(workdir / "trainer"),
        "controller": {"address": f"127.0.0.1:{c_port}", "report_interval_s": 3.0},
        "model": {"pretrained": str(checkpoint)},
        "training": {"assume_normal_unlabelled": True, "batch_size": 64,
                     "max_windows": 2000},
        "security": {"insecure": True},
    }))
    processes = []
    try:
        controller = start("controller", ["controller", "--config", str(c_config)],
                           workdir / "logs")
        processes.append(controller)
        wait_serving(f"127.0.0.1:{c_port}", 60, process=controller)
        trainer = start("trainer", ["trainer", "--config", str(t_config)], workdir / "logs")
        processes.append(trainer)
        wait_serving(f"127.0.0.1:{t_port}", 90, process=trainer)
        console.print(f"controller on 127.0.0.1:{c_port}, trainer on 127.0.0.1:{t_port} "
                      f"(logs in {workdir / 'logs'}); insecure loopback, demo only")
        try:
            import edge_agent.commands  # noqa: F401
        except ImportError:
            console.print("[yellow]the real edge agent is not in this checkout: running "
                          "simulated agents only, no `vmad inject` fault[/]")
        t0 = time.time()
        agents = [ReplayAgent(f"127.0.0.1:{t_port}", s.name, s, t0=t0, batch_size=10,
                              bundle=initial) for s in series]
        for agent in agents:
            agent.start_watch()
        stop = threading.Event()
        errors: list[str] = []

        def replay(agent: ReplayAgent) -> None:
            begin = time.monotonic()
            total = len(agent.series.values)
            while not stop.is_set() and agent.acked < total:
                due = min(total, int((time.monotonic() - begin) * args.rate) + 1)
                try:
                    agent.send_until(due)
                except Exception as error:  # the trainer restarting, a refused batch
                    errors.append(f"{agent.vm_id}: {error}")
                    agent.reconnect()
                stop.wait(0.5)

        threads = [threading.Thread(target=replay, args=(a,), daemon=True) for a in agents]
        for thread in threads:
            thread.start()
        fleet: dict[str, Any] = {"vms": [], "actions": {}, "counts": {}}
        deadline = time.monotonic() + args.seconds + 20
        with Live(_table(agents, fleet), console=console, refresh_per_second=2) as live:
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                time.sleep(1.0)
                with contextlib.suppress(Exception):
                    fleet = fetch_fleet(c_config, 10_000, timeout=2.0)
                live.update(_table(agents, fleet))
        stop.set()
        with contextlib.suppress(Exception):
            fleet = fetch_fleet(c_config, 10_000, timeout=2.0)
        for agent in agents:
            agent.close()
        # Summary: event-wise, each VM's verdicts against its labels.
        totals = np.zeros(4, dtype=int)
        for agent in agents:
            scored = ~np.isnan(agent.scores)
            s = score_events(agent.series.labels, agent.flagged, scored, grace=window // 4)
            totals += (s.events, s.detected, s.missed, s.false_alarms)
        pushed = sum(len(a.bundles_received) for a in agents)
        console.print(
            f"\n[bold]Summary[/] ({time.monotonic() - started:.0f} s, {len(agents)} simulated "
            f"VMs, {sum(a.acked for a in agents)} samples acknowledged): faults "
            f"{totals[1]} detected / {totals[2]} missed of {totals[0]}; false alarms "
            f"{totals[3]}; actions "
            f"{', '.join(f'{k} {v}' for k, v in sorted(fleet.get('actions', {}).items()))}; "
            f"bundles pushed {pushed} (incl. one per VM at connect); "
            f"stream errors {len(errors)}")
        console.print(f"fleet: vmad status --database {workdir / 'registry.sqlite'}")
    finally:
        for process in reversed(processes):
            process.stop()
    return 0


def _table(agents: list[Any], fleet: dict[str, Any]) -> Any:
    from rich.table import Table

    by_vm = {vm["vm_id"]: vm for vm in fleet.get("vms", [])}
    table = Table(title="vmad demo: simulated VMs via gRPC -> trainer -> controller")
    for column in ("VM", "source", "acked", "score", "verdict", "labelled", "F1", "action",
                   "model", "bundles"):
        table.add_column(column)
    for agent in agents:
        vm = by_vm.get(agent.vm_id, {})
        state = vm.get("state") or {}
        scored = np.flatnonzero(~np.isnan(agent.scores))
        last = int(scored[-1]) if len(scored) else -1
        score = f"{agent.scores[last]:.2f}" if last >= 0 else "-"
        verdict = ("[red]ANOMALY[/]" if last >= 0 and agent.flagged[last] else "normal") \
            if last >= 0 else "-"
        version = agent.bundle.metadata.version if agent.bundle is not None else "-"
        table.add_row(agent.vm_id, agent.series.source,
                      f"{agent.acked}/{len(agent.series.values)}", score, verdict,
                      str(state.get("labelled_windows", "-")),
                      f"{state['f1']:.2f}" if "f1" in state else "-",
                      vm.get("last_action", "-") or "-", version[-24:],
                      str(len(agent.bundles_received)))
    actions = ", ".join(f"{k} {v}" for k, v in sorted(fleet.get("actions", {}).items()))
    table.caption = f"controller decisions: {actions or 'none yet'}"
    return table
