"""Trainer ingest benchmark: telemetry batches per second on one core, many agents.

Starts a real trainer process pinned to one CPU core (no controller, so nothing but
ingest runs), then N concurrent simulated agents, each streaming lock-step batches of
12 samples (one minute at the default 5 s interval) with 12 verdicts, the agent's real
message shape. Agents run in this process, pinned to the other cores when there are any,
so the trainer's core is its own. Prints a table: agents, batches/s, samples/s, p50/p99
ack latency, trainer CPU share.

    .venv/bin/python bench/trainer_ingest.py --quick     # 10 s, 8 and 32 agents
    .venv/bin/python bench/trainer_ingest.py             # 30 s, 8, 32 and 128 agents
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

from vmad.launch import free_port, start, wait_serving
from vmad.replay import ReplayAgent, ReplaySeries
from vmad.schema import DEFAULT_METRICS


def _checkpoint(folder: Path) -> Path:
    from vmad.trainer.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint, save_checkpoint
    from vmad.trainer.models import build_model
    from vmad.windows import Normalizer

    if (DEFAULT_CHECKPOINT_DIR / "checkpoint.json").is_file():
        return DEFAULT_CHECKPOINT_DIR
    normalizer = Normalizer.fit(np.random.default_rng(0).normal(30, 3, (200, 4)))
    save_checkpoint(folder, Checkpoint(build_model("zoom-cnn", 4, 64), "zoom-cnn",
                                       DEFAULT_METRICS, 64, normalizer, 0.5))
    return folder


class _Bundle:
    """Stands in for the agent's ONNX bundle: verdicts are not what is measured here."""

    window = 1

    class metadata:  # mimics Bundle.metadata
        version = "bench"

    @staticmethod
    def score(raw: np.ndarray) -> np.ndarray:
        return np.full(len(raw), 0.1, dtype=np.float32)

    @staticmethod
    def verdicts(scores: np.ndarray) -> np.ndarray:
        return scores >= 0.5


def run_round(address: str, agents: int, seconds: float, trainer_pid: int) -> dict[str, float]:
    rng = np.random.default_rng(agents)
    n = 100_000
    series = ReplaySeries("bench", rng.normal(30, 3, (n, 4)).astype(np.float32),
                          np.zeros(n, np.int8), "bench")
    tag = f"{agents}-{time.time_ns()}"
    clients = [ReplayAgent(address, f"vm-{tag}-{i}", series, batch_size=12, bundle=_Bundle())
               for i in range(agents)]
    latencies: list[list[float]] = [[] for _ in clients]
    stop = threading.Event()

    def loop(i: int) -> None:
        client = clients[i]
        while not stop.is_set():
            begin = time.perf_counter()
            client.send_until(client.acked + 12)
            latencies[i].append(time.perf_counter() - begin)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(agents)]
    process = psutil.Process(trainer_pid)
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # warm-up: streams open, first VM rows created
    cpu0, acked0, t0 = process.cpu_times(), sum(c.acked for c in clients), time.perf_counter()
    time.sleep(seconds)
    cpu1, acked1, t1 = process.cpu_times(), sum(c.acked for c in clients), time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(10)
    for client in clients:
        client.close()
    elapsed = t1 - t0
    samples = acked1 - acked0
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    return {"agents": agents, "batches_s": samples / 12 / elapsed, "samples_s": samples / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s per round, 8 and 32 agents")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--agents", default=None, help="comma-separated agent counts")
    args = parser.parse_args()
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    counts = [int(x) for x in (args.agents or ("8,32" if args.quick else "8,32,128")).split(",")]
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="vmad-bench-") as tmp:
        folder = Path(tmp)
        port = free_port()
        config = folder / "trainer.yaml"
        config.write_text(yaml.safe_dump({
            "trainer_id": "bench", "listen": f"127.0.0.1:{port}",
            "data_dir": str(folder / "data"), "log_level": "WARNING",
            "controller": {"address": None},
            "model": {"pretrained": str(_checkpoint(folder / "pretrained"))},
            "security": {"insecure": True}}))
        trainer = start("trainer", ["trainer", "--config", str(config)], folder)
        try:
            wait_serving(f"127.0.0.1:{port}", 90, process=trainer)
            # The trainer gets one core; the agents the rest (the same core if only one).
            psutil.Process(trainer.pid).cpu_affinity([cores[0]])
            for thread in psutil.Process(trainer.pid).threads():
                os.sched_setaffinity(thread.id, [cores[0]])
            if len(cores) > 1:
                os.sched_setaffinity(0, cores[1:])
            rows = [run_round(f"127.0.0.1:{port}", n, seconds, trainer.pid) for n in counts]
        finally:
            trainer.stop()
    print(f"trainer ingest, 1 core (cpu {cores[0]}), batches of 12 samples + 12 verdicts, "
          f"{seconds:.0f} s per round")
    print(f"{'agents':>7} {'batches/s':>10} {'samples/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'trainer CPU':>12}")
    for r in rows:
        print(f"{r['agents']:>7} {r['batches_s']:>10.0f} {r['samples_s']:>10.0f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['cpu'] * 100:>11.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
