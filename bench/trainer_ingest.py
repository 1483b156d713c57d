"""Trainer ingest benchmark: telemetry batches per second on one core.

A real trainer process (mTLS, a token per agent, no controller: nothing but ingest runs)
pinned to one CPU core; simulated agents (bench/fleet_load.py) in one load process on the
other core. Each agent holds its own channel, one open WatchBundles and one open Stream,
and sends its batches on that one stream back to back (the next as soon as the previous
is acked), in the agent's message shape: `--samples` samples and as many verdicts per
batch (1 is the agent's steady state at the default 5 s interval and flush; 12 is a
minute of catching up). Prints agents, batches/s, samples/s, ack p50/p99, the trainer's
CPU share, and batches per trainer CPU-second (the per-core figure).

    .venv/bin/python bench/trainer_ingest.py --quick   # 8 s per round, 64 agents, 1 and 12
    .venv/bin/python bench/trainer_ingest.py           # 20 s per round, 16/64/256 agents
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_load import LoadSpec, merge, run_load, running_version, start_trainer


def _pin_load(cores: list[int]) -> None:
    os.sched_setaffinity(0, cores)


def run_round(address: str, certs: str | None, version: str, agents: int, samples: int,
              seconds: float, trainer_pid: int, load_cores: list[int],
              first: int) -> dict[str, float]:
    warmup = 2.0 + agents / 200
    start_at = time.time() + warmup
    spec = LoadSpec(address, first, agents, seconds, start_at, period_s=0.0, samples=samples,
                    running_version=version, certs=certs, tokens=certs is not None,
                    ramp_s=min(warmup - 0.5, 3.0))
    process = psutil.Process(trainer_pid)
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_pin_load, initargs=(load_cores,)) as pool:
        pending = pool.apply_async(run_load, (spec,))
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, t0 = process.cpu_times(), time.perf_counter()
        time.sleep(seconds)
        cpu1, t1 = process.cpu_times(), time.perf_counter()
        result = merge([pending.get(timeout=seconds + 120)])
    elapsed = t1 - t0
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    batches_s = result["acks"] / seconds
    lat = result["latencies_ms"]
    return {"agents": agents, "samples": samples, "batches_s": batches_s,
            "samples_s": batches_s * samples,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "cpu": cpu, "per_core": batches_s / cpu if cpu > 0 else float("nan"),
            "errors": sum(result["errors"].values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 s per round, 64 agents, batches of 1 and 12 samples")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--agents", help="comma-separated agent counts")
    parser.add_argument("--samples", help="comma-separated samples per batch")
    parser.add_argument("--plaintext", action="store_true", help="no TLS, no tokens")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    counts = [int(x) for x in (args.agents or ("64" if args.quick else "16,64,256")).split(",")]
    shapes = [int(x) for x in (args.samples or "1,12").split(",")]
    cores = sorted(os.sched_getaffinity(0))
    trainer_cores, load_cores = [cores[0]], cores[1:] or cores[:1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmad-bench-") as tmp:
        folder = Path(tmp)
        trainer, address, certs = start_trainer(folder, sum(counts) * len(shapes),
                                                tls=not args.plaintext)
        try:
            # The trainer gets one core; the agents the rest (the same core if only one).
            for thread in psutil.Process(trainer.pid).threads():
                os.sched_setaffinity(thread.id, trainer_cores)
            version = running_version(address, certs)
            first = 0
            for samples in shapes:
                for n in counts:
                    rows.append(run_round(address, certs, version, n, samples, seconds,
                                          trainer.pid, load_cores, first))
                    first += n
        finally:
            trainer.stop()
    print(f"trainer ingest on 1 core (cpu {trainer_cores[0]}), "
          f"{'plaintext' if args.plaintext else 'mTLS + tokens'}, one open stream per agent, "
          f"batches back to back, {seconds:.0f} s per round")
    print(f"{'agents':>7} {'samples/batch':>14} {'batches/s':>10} {'samples/s':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'trainer CPU':>12} {'batches/CPU-s':>14} "
          f"{'errors':>7}")
    for r in rows:
        print(f"{r['agents']:>7} {r['samples']:>14} {r['batches_s']:>10.0f} "
              f"{r['samples_s']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['cpu'] * 100:>11.0f}% {r['per_core']:>14.0f} {r['errors']:>7}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
