"""Fleet benchmark: how many agents one trainer holds at the real agent's call pattern.

One real trainer process (mTLS, a token per agent) on this machine; `--agents` simulated
agents (bench/fleet_load.py) spread over `--procs` load processes, each agent with its
own channel (TCP + TLS connection) and its own identity (client id + token, and its own
certificate with `--per-vm-certs`), one open WatchBundles and one open Stream each, a
batch of one sample and one verdict every 5 s (the agent's default interval and flush).
Connections are spread over the ramp; then every agent sends for `--seconds`.

Prints: agents, agents connected, agents with every batch acked, batches, ack p50 / p99 /
max, errors by status, the trainer's CPU share and peak RSS. Exit status 1 unless every
agent had every batch acked.

    .venv/bin/python bench/trainer_fleet.py --quick      # 200 agents, 20 s
    .venv/bin/python bench/trainer_fleet.py              # 2,000 agents, 60 s
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_load import LoadSpec, merge, run_load, running_version, start_trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 agents, 20 s")
    parser.add_argument("--agents", type=int)
    parser.add_argument("--seconds", type=float, help="sending time after the ramp")
    parser.add_argument("--procs", type=int, default=4, help="load processes")
    parser.add_argument("--period", type=float, default=5.0, help="seconds between batches")
    parser.add_argument("--per-vm-certs", action="store_true",
                        help="a client certificate per agent (vmad certs issue --vm)")
    args = parser.parse_args()
    agents = args.agents or (200 if args.quick else 2000)
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    procs = max(1, min(args.procs, agents))
    ramp = max(5.0, agents / 100)  # TLS handshakes: ~100 new connections a second
    with tempfile.TemporaryDirectory(prefix="vmad-fleet-") as tmp:
        folder = Path(tmp)
        trainer, address, certs = start_trainer(folder, agents, tls=True,
                                                per_vm_certs=args.per_vm_certs)
        try:
            version = running_version(address, certs, args.per_vm_certs)
            process = psutil.Process(trainer.pid)
            start_at = time.time() + ramp + 2.0
            per = -(-agents // procs)
            specs = [LoadSpec(address, first, min(per, agents - first), seconds, start_at,
                              period_s=args.period, running_version=version, certs=certs,
                              per_vm_certs=args.per_vm_certs, tokens=True, ramp_s=ramp)
                     for first in range(0, agents, per)]
            peak_rss = 0
            stop = threading.Event()

            def watch_rss() -> None:
                nonlocal peak_rss
                while not stop.wait(1.0):
                    peak_rss = max(peak_rss, process.memory_info().rss)

            watcher = threading.Thread(target=watch_rss, daemon=True)
            watcher.start()
            with multiprocessing.get_context("spawn").Pool(len(specs)) as pool:
                pending = pool.map_async(run_load, specs)
                time.sleep(max(0.0, start_at - time.time()))
                cpu0, t0 = process.cpu_times(), time.perf_counter()
                result = merge(pending.get(timeout=ramp + seconds + 300))
                cpu1, t1 = process.cpu_times(), time.perf_counter()
            stop.set()
            watcher.join()
            log_tail = trainer.log_text()[-2000:]
        finally:
            trainer.stop()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    lat = result["latencies_ms"]
    ok = result["all_acked"] == agents and not result["errors"]
    print(f"one trainer, {agents} agents (mTLS + a token per agent"
          f"{', a certificate per agent' if args.per_vm_certs else ''}), each its own "
          f"channel with an open Stream and WatchBundles, a batch every {args.period:g} s, "
          f"{seconds:.0f} s after a {ramp:.0f} s ramp, {len(specs)} load processes")
    print(f"{'agents':>7} {'connected':>10} {'all acked':>10} {'batches':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'trainer CPU':>12} {'trainer RSS':>12}")
    print(f"{agents:>7} {result['connected']:>10} {result['all_acked']:>10} "
          f"{result['acks']:>8} {np.percentile(lat, 50) if len(lat) else float('nan'):>7.1f} "
          f"{np.percentile(lat, 99) if len(lat) else float('nan'):>7.1f} "
          f"{lat.max() if len(lat) else float('nan'):>7.1f} {cpu * 100:>11.0f}% "
          f"{peak_rss / 2**20:>9.0f} MB")
    if result["errors"]:
        print("errors:", result["errors"])
    if not ok:
        print(log_tail, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
