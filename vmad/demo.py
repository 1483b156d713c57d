"""`vmad demo`: the whole system on this machine in under three minutes.

Starts a controller and a trainer as real processes on loopback, then several simulated
agents (vmad/replay.py) that replay labelled series — synthetic, and SMD machines from
`../shared/datasets/smd` when present — through the same gRPC calls a real agent makes,
about 20 samples a second each (a day of 5-second samples in a few minutes). The trainer
reports each VM's state to the controller every few seconds; the controller's DQN (the
policy shipped with vmad, controller/dqn.py) answers (keep, fine-tune, reset) and logs
its Q-values; fine-tuned bundles are pushed back to the agents,
which score the rest of their series with them. A live table shows it; a summary ends it.

The real edge agent and the scripted `vmad inject memory-leak` join the demo when the
agent package (edge_agent/) provides them; without it the demo says so and runs the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["register", "run_demo"]

SMD_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "smd"
SMD_OWN_METRIC_FLOOR = 0.05


def register(commands: Any, bench: Any) -> None:
    demo = commands.add_parser(
        "demo", help="controller + trainer + simulated agents on loopback, live, < 3 minutes")
    demo.add_argument("--seconds", type=float, default=100.0, help="replay time (default 100)")
    demo.add_argument("--synthetic", type=int, default=3, help="synthetic VMs (default 3)")
    demo.add_argument("--smd", type=int, default=2, help="SMD machines when present (default 2)")
    demo.add_argument("--rate", type=float, default=20.0, help="samples/s per simulated VM")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--keep", type=Path, help="keep configs, logs and data here")
    demo.set_defaults(run=run_demo)


def _sources(args: argparse.Namespace, n_samples: int) -> list[Any]:
    """The simulated VMs: each arrives with the production warm-up's worth of its past
    (1 h at 5 s), as a VM that has run that long, so that their first fits are the
    production ones and only the real agent's warm-up is compressed."""
    from vmad import replay
    from vmad.trainer.config import AdaptationSettings

    history = AdaptationSettings().warmup_samples
    series = replay.synthetic_series(args.seed, args.synthetic, n_samples, history)
    if args.smd > 0 and SMD_DIR.is_dir():
        # SMD's 38 metrics: the agent's 4 (which the network reads), then 34 of the
        # server's own (load, swap, TCP, ...), which its detector reads too.
        series += replay.load_smd(SMD_DIR, args.smd, n_samples, history=history)
    return series


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from vmad.controller.service import fetch_fleet
    from vmad.launch import free_port, start, wait_serving
    from vmad.replay import ReplayAgent, score_events
    from vmad.trainer.checkpoint import DEFAULT_CHECKPOINT_DIR

    # Wide enough for every column also when stdout is a pipe or a CI log.
    console = Console(width=max(140, Console().width))
    started = time.monotonic()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="vmad-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]vmad demo[/]: configs, logs and data in {workdir}")
    # The demo runs plaintext on purpose and says so once; not on every status poll.
    logging.getLogger("vmad.security").setLevel(logging.ERROR)
    checkpoint = DEFAULT_CHECKPOINT_DIR
    from vmad.trainer.checkpoint import load_checkpoint
    from vmad.trainer.export import export_bundle

    # The shipped model has the default window (vmad/schema.py), the one the agent takes.
    initial = export_bundle(load_checkpoint(checkpoint), "initial")
    window = initial.window
    n_samples = int(args.seconds * args.rate)
    series = _sources(args, n_samples)

    c_port, t_port = free_port(), free_port()
    page_port, c_metrics, t_metrics = free_port(), free_port(), free_port()
    c_config = workdir / "controller.yaml"
    c_config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{c_port}", "database": str(workdir / "registry.sqlite"),
        # The shipped DQN decides; the rules answer only states it cannot read.
        "policy": {"kind": "dqn",
                   "rules": {"min_labelled": 64, "finetune_batches": 60, "cooldown_s": 15.0,
                             "min_f1": 0.6, "min_accuracy": 0.9}},
        "metrics": {"listen": f"127.0.0.1:{c_metrics}"},
        "fleet": {"listen": f"127.0.0.1:{page_port}", "refresh_s": 3},
        "security": {"insecure": True},
    }))
    t_config = workdir / "trainer.yaml"
    t_config.write_text(yaml.safe_dump({
        "trainer_id": "demo-node", "listen": f"127.0.0.1:{t_port}",
        "data_dir": str(workdir / "trainer"),
        "controller": {"address": f"127.0.0.1:{c_port}", "report_interval_s": 3.0},
        "model": {"pretrained": str(checkpoint)},
        "training": {"assume_normal_unlabelled": False, "batch_size": 64,
                     "max_windows": 2000},
        # The one time compression of the demo: a VM's label-free warm-up is 80 samples
        # (40 s for the real agent at 0.5 s) instead of the production hour, so the real
        # leak below meets the agent's own per-VM bundle, not the silent warm-up one.
        "adaptation": {"warmup_samples": 80,
                       # The SMD VMs' own metrics are recorded scaled to [0, 1]: their
                       # least scale is 5 % of that range, as `vmad bench detection`'s.
                       "own_metric_floors": {"smd.*": SMD_OWN_METRIC_FLOOR}},
        "metrics": {"listen": f"127.0.0.1:{t_metrics}"},
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
        console.print(f"fleet page: http://127.0.0.1:{page_port}/  metrics: "
                      f"http://127.0.0.1:{c_metrics}/metrics (controller), "
                      f"http://127.0.0.1:{t_metrics}/metrics (trainer)")
        real = _start_real_agent(workdir, initial, t_port, console)
        if real is not None:
            processes.append(real[0])
        t0 = time.time()
        # A VM with metrics of its own scores once the trainer sends a bundle over them.
        agents = [ReplayAgent(f"127.0.0.1:{t_port}", s.name, s, t0=t0, batch_size=10,
                              metrics=s.metrics,
                              bundle=initial if s.metrics == initial.metadata.metrics
                              else None) for s in series]
        for agent in agents:
            agent.start_watch()
        stop = threading.Event()
        errors: list[str] = []

        def replay(agent: ReplayAgent) -> None:
            begin = time.monotonic()
            total = len(agent.series.values)
            while not stop.is_set() and agent.acked < total:
                due = min(total, agent.series.history
                          + int((time.monotonic() - begin) * args.rate) + 1)
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
        injection = None
        inject_at = time.monotonic() + min(55.0, args.seconds * 0.55)
        with Live(_table(agents, fleet), console=console, refresh_per_second=2) as live:
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                time.sleep(1.0)
                with contextlib.suppress(Exception):
                    fleet = fetch_fleet(c_config, 10_000, timeout=2.0)
                live.update(_table(agents, fleet))
                if real is not None and injection is None and time.monotonic() >= inject_at:
                    # A real fault on this host: the agent sees it through psutil and
                    # ships the labelled interval `vmad inject` records.
                    injection = start("inject", [
                        "inject", "memory-leak", "--duration",
                        f"{max(10.0, args.seconds * 0.3):.0f}", "--intensity", "1.0",
                        "--config", str(real[1])], workdir / "logs")
        stop.set()
        with contextlib.suppress(Exception):
            fleet = fetch_fleet(c_config, 10_000, timeout=2.0)
        for agent in agents:
            agent.close()
        # Summary: event-wise, each VM's verdicts against its labels.
        totals = np.zeros(4, dtype=int)
        by_vm: list[str] = []
        for agent in agents:
            scored = ~np.isnan(agent.scores)
            scored[:agent.series.history] = False  # the VM's past, before the replay
            s = score_events(agent.series.labels, agent.flagged, scored, grace=window // 4)
            totals += (s.events, s.detected, s.missed, s.false_alarms)
            # Per VM: a replayed series with sparse labels tells apart from a detector
            # that cries wolf everywhere.
            by_vm.append(f"{agent.vm_id} {s.detected}/{s.events} {s.false_alarms}")
        pushed = sum(len(a.bundles_received) for a in agents)
        if injection is not None:
            injection.popen.wait(60)
            console.print(_real_fault_summary(workdir, real_vm_id(), window))
        console.print(
            f"\n[bold]Summary[/] ({time.monotonic() - started:.0f} s, {len(agents)} simulated "
            f"VMs, {sum(a.acked - a.series.history for a in agents)} samples acknowledged "
            f"after {sum(a.series.history for a in agents)} of their past): faults "
            f"{totals[1]} detected / {totals[2]} missed of {totals[0]}; false alarms "
            f"{totals[3]}; actions "
            f"{', '.join(f'{k} {v}' for k, v in sorted(fleet.get('actions', {}).items()))}; "
            f"bundles pushed {pushed} (incl. one per VM at connect); "
            f"stream errors {len(errors)}", soft_wrap=True)
        console.print(f"by VM (faults detected/of, false alarms): {', '.join(by_vm)}",
                      soft_wrap=True)
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
    if fleet.get("decisions"):
        latest = fleet["decisions"][0]
        table.caption += (f"\nlatest: {latest['vm_id']} {latest['action']} "
                          f"{latest['batches']} ({latest['reason']})")
    return table


def real_vm_id() -> str:
    import socket

    return f"real-{socket.gethostname()}"[:60]


def _start_real_agent(workdir: Path, initial: Any, trainer_port: int,
                      console: Any) -> tuple[Any, Path] | None:
    """The real edge agent on this host (when edge_agent/ provides it): samples every
    0.5 s so a window fills within the demo, starts with the demo's pretrained bundle."""
    try:
        import vmad.edge_agent.agent_commands  # noqa: F401
    except ImportError:
        console.print("[yellow]the real edge agent is not in this checkout: simulated "
                      "agents only, no `vmad inject` fault[/]")
        return None
    from vmad.launch import start

    agent_dir = workdir / "agent"
    initial.save(agent_dir / "initial-bundle")
    config = workdir / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "vm_id": real_vm_id(), "interval_s": 0.5, "bundle": str(agent_dir / "initial-bundle"),
        "bundle_dir": str(agent_dir / "bundles"),
        "trainer": {"address": f"127.0.0.1:{trainer_port}", "flush_s": 1.0},
        "spool": {"path": str(agent_dir / "spool.db")},
        "metrics": {"listen": None},
        "inject": {"labels_file": str(agent_dir / "labels.jsonl"), "max_memory_share": 0.25},
        "security": {"insecure": True},
    }))
    process = start("agent", ["agent", "--config", str(config)], workdir / "logs")
    time.sleep(2.0)
    if not process.alive():
        console.print(f"[yellow]the real agent did not start; see {process.log_path}[/]")
        return None
    console.print(f"real agent {real_vm_id()} on this host (0.5 s interval); a scripted "
                  "`vmad inject memory-leak` follows")
    return process, config


def _real_fault_summary(workdir: Path, vm_id: str, window: int) -> str:
    """Was the real injected fault flagged? Read from the trainer's store: the labelled
    interval the agent shipped, and the verdicts it sent."""
    import json

    from vmad.trainer.store import TelemetryStore

    labels_file = workdir / "agent" / "labels.jsonl"
    try:
        lines = [json.loads(line) for line in labels_file.read_text().splitlines() if line]
    except FileNotFoundError:
        return "real fault: `vmad inject` recorded no interval"
    if not lines:
        return "real fault: `vmad inject` recorded no interval"
    start, end = float(lines[-1]["start"]), float(lines[-1]["end"])
    store = TelemetryStore(workdir / "trainer" / "store.sqlite")
    try:
        ts, scores, flagged = store.verdicts(vm_id, 100_000)
    finally:
        store.close()
    grace = window * 0.5  # window samples at 0.5 s
    during = (ts >= start) & (ts <= end + grace)
    hits = ts[during & flagged]
    if not during.any():
        return f"real memory leak [{end - start:.0f} s]: no verdicts reached the trainer"
    # Shares before and after too: an agent that flags everything "detects" every fault.
    before, after = ts < start, ts > end + grace

    def share(mask: np.ndarray) -> str:
        return f"{flagged[mask].mean():.0%} of {int(mask.sum())}" if mask.any() else "none"

    shares = (f"windows flagged before {share(before)}, during {share(during)}, "
              f"after {share(after)}")
    if len(hits):
        return (f"real memory leak [{end - start:.0f} s]: flagged {hits[0] - start:.1f} s "
                f"after it started (max score {scores[during].max():.2f}); {shares}")
    return (f"real memory leak [{end - start:.0f} s]: missed (max score "
            f"{scores[during].max():.2f}); {shares}")
