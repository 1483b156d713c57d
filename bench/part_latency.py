"""What each unsupervised part of the fused score costs the agent's graph.

    .venv/bin/python bench/part_latency.py [--metrics 4 38] [--windows 20000]

For each metric count, a VM is adapted by the trainer's `fit_adaptation`, network
weight 0 (the weight SMD's fits choose), once per combination of parts: the per-metric
deviation alone, with the distance from the nearest of 16 usual states
(`normal_states`, trainer/states.py), with the distance from the principal subspace
(`subspace_variance` 0.9) and with all three (the default). Both distances are fitted
only on wide metric sets (16 metrics or more), so a VM with the agent's 4 default
metrics has one graph, the deviation alone. The ONNX graphs
of one metric count run in one ONNX Runtime process on one thread, call by call in
turn, on the same window; p50 and p99 in microseconds. `bench/agent_latency.py` times
the agent's whole path around the graph.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch

from vmad.trainer.adaptation import fit_adaptation
from vmad.trainer.checkpoint import Checkpoint
from vmad.trainer.export import export_bundle
from vmad.trainer.models import build_model
from vmad.trainer.residual import SUBSPACE_MIN_METRICS
from vmad.trainer.states import NORMAL_STATES, STATES_MIN_METRICS
from vmad.windows import Normalizer

WINDOW = 64


def _sessions(n_metrics: int, rng: np.random.Generator) -> dict[str, ort.InferenceSession]:
    metrics = tuple(f"m{i}" for i in range(n_metrics))
    # A few shared drivers and a little noise per metric: a low-dimensional normal.
    history = rng.normal(size=(1500, 4)) @ rng.normal(size=(4, n_metrics)) \
        + 0.3 * rng.normal(size=(1500, n_metrics)) + 50
    checkpoint = Checkpoint(build_model("zoom-cnn", n_metrics, WINDOW), "zoom-cnn", metrics,
                            WINDOW, Normalizer.fit(history), 0.5)
    # Narrower VMs get neither part (SUBSPACE_MIN_METRICS, STATES_MIN_METRICS): one graph.
    wide = n_metrics >= min(SUBSPACE_MIN_METRICS, STATES_MIN_METRICS)
    sessions = {}
    for variance in (0.0, 0.9) if wide else (0.0,):
        for states in (0, NORMAL_STATES) if wide else (0,):
            adaptation = fit_adaptation(checkpoint.model, history, WINDOW, cnn_weight=0.0,
                                        subspace_variance=variance, normal_states=states)
            parts = ["deviation"]
            if adaptation.subspace is not None:
                parts.append(f"subspace ({len(adaptation.subspace.components)} components)")
            if adaptation.states is not None:
                parts.append(f"states ({len(adaptation.states.centres)})")
            name = " + ".join(parts)
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            sessions[name] = ort.InferenceSession(
                export_bundle(checkpoint, name, adaptation=adaptation).onnx_bytes, options,
                providers=["CPUExecutionProvider"])
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=int, nargs="+", default=[4, 38])
    parser.add_argument("--windows", type=int, default=20000, help="calls per graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for n_metrics in args.metrics:
        sessions = _sessions(n_metrics, rng)
        window = rng.normal(size=(1, n_metrics, WINDOW)).astype(np.float32)
        times: dict[str, list[int]] = {name: [] for name in sessions}
        names = list(sessions)
        for call in range(args.windows):
            for name in names[call % len(names):] + names[:call % len(names)]:
                started = time.perf_counter_ns()
                sessions[name].run(None, {"windows": window})
                times[name].append(time.perf_counter_ns() - started)
        print(f"{n_metrics} metrics, network weight 0, {args.windows} calls each, one thread")
        for name, values in times.items():
            p50, p99 = np.percentile(np.asarray(values) / 1000, [50, 99])
            print(f"  {name:55s} p50 {p50:6.1f} us  p99 {p99:6.1f} us")


if __name__ == "__main__":
    main()
