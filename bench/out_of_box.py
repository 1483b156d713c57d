"""Out of the box on this host: a fresh real agent with the shipped bundle and a real
trainer with production defaults (no labels, `assume_normal_unlabelled: false`, no demo
shortcut), except a warm-up shortened to `--warmup` samples. Then ordinary load for
`--quiet` seconds, then a real `vmad inject memory-leak`.

Reports: how long warm-up took (until the agent's `vmad_agent_warmup` gauge drops to 0,
that is until the trainer pushed this VM's own bundle), windows scored and flagged by
the warm-up bundle, windows scored and flagged in the quiet phase (false alarms),
and the delay from the start of the injection to the first flagged window whose most
blamed metric is memory, both from the verdicts (with their per-metric contributions)
in the trainer's store. `leak_really_lasted_s` is the labelled interval `vmad inject`
wrote: on a loaded host touching gigabytes of memory takes longer than asked.

    python bench/out_of_box.py                      # 5 s sampling, 720-sample warm-up
                                                    # shortened to 120 (10 min), 10 min quiet
    python bench/out_of_box.py --quick              # 0.1 s sampling: about a minute
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from vmad.launch import free_port, start, wait_serving
from vmad.schema import DEFAULT_METRICS as METRICS


def _metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", re.MULTILINE)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0  # a labelled series appears on first use


def _scored(port: int) -> float:
    return sum(_metric(port, "vmad_agent_verdicts_total", f'{{verdict="{v}"}}')
               for v in ("anomalous", "normal"))


def _wait(condition, timeout: float, what: str, step: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return time.monotonic()
        except OSError:
            pass  # the metrics endpoint is not up yet
        time.sleep(step)
    raise TimeoutError(f"{what} not within {timeout:.0f} s")


def run_out_of_box(work: Path, *, interval_s: float, warmup: int, quiet_s: float,
                   leak_s: float, intensity: float = 1.0, memory_share: float = 0.25,
                   detect_within_s: float = 60.0) -> dict[str, object]:
    """Run the scenario in `work`; returns the measurements (see the module docstring)."""
    trainer_port, metrics_port = free_port(), free_port()
    trainer_yaml, agent_yaml = work / "trainer.yaml", work / "agent.yaml"
    trainer_yaml.write_text(yaml.safe_dump({
        "trainer_id": "out-of-box", "listen": f"127.0.0.1:{trainer_port}",
        "data_dir": str(work / "trainer-data"), "security": {"insecure": True},
        "adaptation": {"warmup_samples": warmup}}))
    agent_yaml.write_text(yaml.safe_dump({
        "vm_id": "this-host", "interval_s": interval_s, "bundle_dir": str(work / "bundles"),
        "trainer": {"address": f"127.0.0.1:{trainer_port}", "flush_s": min(1.0, interval_s * 4)},
        "spool": {"path": str(work / "spool.db")},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "inject": {"labels_file": str(work / "labels.jsonl"), "max_memory_share": memory_share},
        "security": {"insecure": True, "client_id": "this-host", "token": "t"}}))
    trainer = start("trainer", ["trainer", "--config", str(trainer_yaml)], work)
    agent = None
    try:
        wait_serving(f"127.0.0.1:{trainer_port}", 120, process=trainer)
        agent = start("agent", ["agent", "--config", str(agent_yaml)], work)
        began = time.monotonic()
        _wait(lambda: _scored(metrics_port) > 0 and _metric(metrics_port, "vmad_agent_warmup")
              == 1.0, 120,
              "the agent's first (warm-up) verdict")
        warm = _wait(lambda: _metric(metrics_port, "vmad_agent_warmup") == 0.0,
                     warmup * interval_s * 3 + 120, "the end of warm-up", step=0.2)
        quiet_from = time.time()
        time.sleep(quiet_s)
        injected_at = time.time()
        inject = subprocess.run(
            [sys.executable, "-m", "vmad.cli", "inject", "memory-leak", "--duration",
             str(leak_s), "--intensity", str(intensity), "--config", str(agent_yaml)],
            capture_output=True, text=True, timeout=leak_s + 300)
        if inject.returncode != 0:
            raise RuntimeError(f"vmad inject failed: {inject.stderr[-2000:]}")
        time.sleep(min(detect_within_s, 15.0))  # the tail of the leak's windows, shipped
    finally:
        if agent is not None:
            agent.stop()
        trainer.stop()
    log = agent.log_text() if agent is not None else ""
    times, flags, tops, warming = _verdicts(work / "trainer-data" / "store.sqlite")
    quiet = (times >= quiet_from) & (times < injected_at)
    after = flags & (times >= injected_at) & (tops == METRICS.index("memory_percent"))
    first = float(times[after][0]) if after.any() else None
    labels = [json.loads(line) for line in (work / "labels.jsonl").read_text().splitlines()]
    return {
        "interval_s": interval_s, "warmup_samples": warmup,
        "warmup_s": round(warm - began, 1),
        "warmup_windows": int(warming.sum()),
        "flagged_during_warmup": int((flags & warming).sum()),
        "quiet_s": quiet_s, "quiet_windows": int(quiet.sum()),
        "quiet_flagged": int((flags & quiet).sum()),
        "quiet_false_alarm_rate": float(flags[quiet].mean()) if quiet.any() else float("nan"),
        "leak_s": leak_s,
        "leak_really_lasted_s": round(labels[-1]["end"] - labels[-1]["start"], 1),
        "memory_share": memory_share,
        "detection_delay_s": None if first is None else round(first - injected_at, 2),
        "blamed_first": "memory_percent" if first is not None else "",
        "warmup_logged": "warm-up vm=this-host" in log,
    }


def _verdicts(store: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The trainer's stored verdicts: timestamps, flags, index of the metric most to blame,
    and whether the warm-up bundle gave it."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT ts, anomalous, contributions, model_version FROM verdicts "
                          "ORDER BY ts").fetchall()
    finally:
        db.close()
    times = np.array([r[0] for r in rows], dtype=np.float64)
    flags = np.array([bool(r[1]) for r in rows], dtype=bool)
    tops = np.array([int(np.argmax(np.frombuffer(r[2], np.float32))) if r[2] else -1
                     for r in rows], dtype=np.int64)
    warming = np.array([r[3].endswith("-warmup") for r in rows], dtype=bool)
    return times, flags, tops, warming


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interval", type=float, default=5.0, help="agent sampling interval")
    parser.add_argument("--warmup", type=int, default=120,
                        help="warm-up samples (production default 720; 120 = 10 min at 5 s)")
    parser.add_argument("--quiet", type=float, default=600.0, help="seconds of ordinary load")
    parser.add_argument("--leak", type=float, default=60.0, help="seconds the leak grows")
    parser.add_argument("--memory-share", type=float, default=0.25,
                        help="the leak's cap, of total RAM (the agent's default 0.25)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", help="work in this folder and keep the logs")
    args = parser.parse_args()
    if args.quick:
        args.interval, args.warmup, args.quiet, args.leak = 0.1, 200, 20.0, 6.0
    with tempfile.TemporaryDirectory(prefix="vmad-oob-") as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result = run_out_of_box(work, interval_s=args.interval, warmup=args.warmup,
                                quiet_s=args.quiet, leak_s=args.leak,
                                memory_share=args.memory_share,
                                detect_within_s=max(60.0, args.leak * 3))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
