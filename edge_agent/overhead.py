"""Edge agent overhead: RSS, CPU share of one core, inference latency.

Runs the real agent (`vmad agent`, its own process, default 5 s interval, Prometheus
endpoint on, no trainer so only the agent's own work counts) for `--duration` seconds
(default 120, `--quick` 20) and samples the process every second with psutil: peak and
final RSS, CPU seconds / wall seconds after a 2 s start-up allowance.

Inference latency: the first window is complete only after 64 samples (320 s at 5 s),
so a 2-minute run scores no window. Latency is therefore measured in this process on the
same code path the agent runs per sample (`WindowScorer.push` on a full ring: the sample
into the ring, the window normalized into the bound ONNX input, ONNX Runtime with one
thread, the verdict), 2,000 times, p50 and p99. `bench/agent_latency.py` splits that
time between the model and the Python around it.

The bundle is the packaged default, the one a fresh agent runs.

    vmad bench agent-overhead [--quick]          # 2 minutes; --quick 20 s
    vmad bench agent-overhead --interval 0.5 --duration 60   # RSS while scoring
    .venv/bin/python bench/agent_overhead.py     # the same, from a checkout
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"rss_mb": 80.0, "cpu_percent": 1.0, "p50_us": 100.0}


def inference_latency(bundle: Path | None, runs: int = 2000) -> tuple[float, float, str]:
    from vmad.edge_agent.detector import BundleSlot, WindowScorer
    from vmad.edge_agent.sampler import METRICS
    from vmad.schema import DEFAULT_WINDOW

    with tempfile.TemporaryDirectory() as scratch:
        slot = BundleSlot(scratch, METRICS, DEFAULT_WINDOW)
        loaded = slot.load_initial(bundle)
        assert loaded is not None, "no usable bundle"
        detector = WindowScorer(slot)
        rng = np.random.default_rng(0)
        for _ in range(DEFAULT_WINDOW):
            detector.push(list(rng.random(4) * 50))
        times = []
        for _ in range(runs):
            values = list(rng.random(4) * 50)
            start = time.perf_counter()
            detector.push(values)
            times.append(time.perf_counter() - start)
    micro = np.asarray(times) * 1e6
    return float(np.percentile(micro, 50)), float(np.percentile(micro, 99)), \
        f"{loaded.metadata.model_kind} {loaded.metadata.version}"


def sampling_latency(own_metrics: tuple[str, ...], runs: int = 300) -> tuple[float, float]:
    """p50 and p99 microseconds of one real sample (psutil and /proc readings, rates)."""
    from vmad.edge_agent.sampler import Sampler

    sampler = Sampler(own_metrics=own_metrics)
    sampler.sample()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sampler.sample()
        times.append(time.perf_counter() - start)
    micro = np.asarray(times) * 1e6
    return float(np.percentile(micro, 50)), float(np.percentile(micro, 99))


def run_agent(bundle: Path | None, duration: float, interval: float,
              work: Path, own_metrics: tuple[str, ...] = ()) -> dict[str, float]:
    import psutil
    import yaml

    from vmad.launch import free_port

    config = {
        "vm_id": "bench", "interval_s": interval, "bundle": str(bundle) if bundle else None,
        "own_metrics": list(own_metrics),
        "bundle_dir": str(work / "bundles"),
        "trainer": {"address": None},
        "spool": {"path": str(work / "spool.db")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "inject": {"labels_file": str(work / "labels.jsonl")},
        "security": {"insecure": True},
    }
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "vmad.cli", "agent", "--config", str(path),
         "--log-level", "WARNING"], cwd=work)
    proc = psutil.Process(process.pid)
    try:
        time.sleep(2.0)  # imports and start-up are not steady-state overhead
        cpu0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()
        peak = 0
        while time.monotonic() - wall0 < duration:
            if process.poll() is not None:
                raise RuntimeError(f"agent exited early with code {process.returncode}")
            peak = max(peak, proc.memory_info().rss)
            time.sleep(1.0)
        cpu1, wall1 = sum(proc.cpu_times()[:2]), time.monotonic()
        final = proc.memory_info().rss
        # USS: pages only this process holds (shared libraries' clean pages excluded).
        uss = proc.memory_full_info().uss
    finally:
        process.terminate()
        process.wait(timeout=20)
    return {"rss_peak_mb": peak / 2**20, "rss_final_mb": final / 2**20,
            "uss_final_mb": uss / 2**20,
            "cpu_percent": 100.0 * (cpu1 - cpu0) / (wall1 - wall0), "seconds": wall1 - wall0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s instead of 120 s")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--own-metrics", nargs="*", default=[], metavar="NAME",
                        help="the agent also samples these (agent.yaml's own_metrics; "
                             "`all`: every one it knows)")
    args = parser.parse_args(argv)
    from vmad.edge_agent.sampler import OWN_METRICS

    own = tuple(OWN_METRICS) if args.own_metrics == ["all"] else tuple(args.own_metrics)
    duration = args.duration or (20.0 if args.quick else 120.0)
    with tempfile.TemporaryDirectory(prefix="vmad-bench-agent-") as scratch:
        work = Path(scratch)
        bundle = None  # the packaged default
        p50, p99, which = inference_latency(bundle)
        sample_p50, sample_p99 = sampling_latency(own)
        usage = run_agent(bundle, duration, args.interval, work, own)
    rows = [
        ("RSS peak (MB)", usage["rss_peak_mb"], TARGETS["rss_mb"]),
        ("RSS final (MB)", usage["rss_final_mb"], TARGETS["rss_mb"]),
        ("USS final (MB)", usage["uss_final_mb"], None),
        ("CPU (% of one core)", usage["cpu_percent"], TARGETS["cpu_percent"]),
        ("inference p50 (us)", p50, TARGETS["p50_us"]),
        ("inference p99 (us)", p99, None),
        ("sampling p50 (us)", sample_p50, None),
        ("sampling p99 (us)", sample_p99, None),
    ]
    print(f"agent overhead: {usage['seconds']:.0f} s at interval {args.interval:g} s, "
          f"bundle {which}, {4 + len(own)} metrics")
    print(f"{'measure':24s} {'value':>10s} {'target':>8s}  ok")
    for name, value, target in rows:
        ok = "" if target is None else ("yes" if value <= target else "NO")
        shown = "" if target is None else f"{target:g}"
        print(f"{name:24s} {value:10.2f} {shown:>8s}  {ok}")
    return 0

