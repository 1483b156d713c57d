"""What the distance from a VM's principal subspace costs the agent's graph.

    .venv/bin/python bench/subspace_latency.py [--metrics 38] [--windows 20000]

A VM with a wide metric set (default 38, as SMD's servers) is adapted twice by the
trainer's `fit_adaptation`, network weight 0 (the weight SMD's fits choose): with
`subspace_variance` 0 (the per-metric deviation alone) and 0.9 (the default: its mean
with the distance from the subspace). Both ONNX graphs run in one ONNX Runtime
process on one thread, call by call alternately, on the same window; p50 and p99 in
microseconds. On the agent's 4 default metrics no subspace is fitted
(`SUBSPACE_MIN_METRICS`), so its graph is unchanged; `bench/agent_latency.py` times
that whole path.
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
from vmad.windows import Normalizer

WINDOW = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=int, default=38)
    parser.add_argument("--windows", type=int, default=20000, help="calls per graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    metrics = tuple(f"m{i}" for i in range(args.metrics))
    # A few shared drivers and a little noise per metric: a low-dimensional normal.
    history = rng.normal(size=(1500, 4)) @ rng.normal(size=(4, args.metrics)) \
        + 0.3 * rng.normal(size=(1500, args.metrics)) + 50
    checkpoint = Checkpoint(build_model("zoom-cnn", args.metrics, WINDOW), "zoom-cnn", metrics,
                            WINDOW, Normalizer.fit(history), 0.5)
    sessions = {}
    for variance in (0.0, 0.9):
        adaptation = fit_adaptation(checkpoint.model, history, WINDOW, cnn_weight=0.0,
                                    subspace_variance=variance)
        name = "deviation alone" if adaptation.subspace is None else \
            f"deviation and distance ({len(adaptation.subspace.components)} components)"
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(
            export_bundle(checkpoint, name, adaptation=adaptation).onnx_bytes, options,
            providers=["CPUExecutionProvider"])
    window = rng.normal(size=(1, args.metrics, WINDOW)).astype(np.float32)
    times: dict[str, list[int]] = {name: [] for name in sessions}
    names = list(sessions)
    for call in range(args.windows):
        for name in names if call % 2 else names[::-1]:
            started = time.perf_counter_ns()
            sessions[name].run(None, {"windows": window})
            times[name].append(time.perf_counter_ns() - started)
    print(f"{args.metrics} metrics, network weight 0, {args.windows} calls each, one thread")
    for name, values in times.items():
        p50, p99 = np.percentile(np.asarray(values) / 1000, [50, 99])
        print(f"{name:45s} p50 {p50:6.1f} us  p99 {p99:6.1f} us")


if __name__ == "__main__":
    main()
