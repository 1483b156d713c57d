"""Where the agent's time per window goes: its own path against ONNX Runtime alone.

    .venv/bin/python bench/agent_latency.py [--against REV] [--rounds 6] [--windows 3000]
                                            [--block 1]

Rows, measured in one process, interleaved (`--block` calls of each row, then of each
row in the reverse order, and so on) so that a machine whose load changes during the
run weighs on every row alike. Call by call (`--block 1`, the default) each call finds
caches holding the other rows' work, closer to an agent that scores once every few
seconds; `--block 3000` times hot loops, as `vmad bench agent-overhead` does:

- `agent: WindowScorer.push` -- the agent's whole step per sample on a full ring, as
  `inference_latency` of `vmad bench agent-overhead` measures it;
- `agent: adapted, network weight 0.5` / `0` -- the same step on a bundle adapted to a
  synthetic VM as the trainer adapts it (the shipped network fused with the VM's
  per-metric deviation and its distance from the nearest of its usual states; on the 4
  default metrics no subspace distance), once with the
  network at weight 0.5 and once at 0, whose graph leaves the network out;
- `agent at REV` (with `--against`) -- the same step with `edge_agent/detector.py` and
  `vmad/bundle.py` as they were at git revision REV (same bundle, same samples);
- `ORT: bound buffers` -- `run_with_iobinding` on an already-normalized window: the floor
  for any Python around the model;
- `ORT: bound buffers, arena + mem patterns on` / `no spinning` -- the same on a session
  opened with ONNX Runtime's memory arena and memory patterns (the agent turns both off
  to save memory), or with the intra-op pool's spinning off;
- `ORT: session.run, both outputs` / `score only` -- the ordinary call, and whether
  fetching the contributions costs anything.

The bundle is the packaged default (the one a fresh agent runs). Reports p50, p90 and
p99 over all windows, in microseconds, and the range of the p50 over `--rounds` equal
parts of the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _module_at(rev: str, path: str, name: str, replace: dict[str, str], where: Path
               ) -> ModuleType:
    """Import `path` as it was at git revision `rev`, under the module name `name`."""
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    for old, new in replace.items():
        text = text.replace(old, new)
    file = where / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _previous_scorer_class(rev: str, where: Path) -> tuple[type, type]:
    """`(BundleSlot, WindowScorer)` from revision `rev`, running on its own bundle code."""
    import vmad.bundle

    old_bundle = _module_at(rev, "vmad/bundle.py", "_vmad_bundle_at_rev", {}, where)
    old_bundle.DEFAULT_BUNDLE_DIR = vmad.bundle.DEFAULT_BUNDLE_DIR  # the same bundle
    old_detector = _module_at(rev, "edge_agent/detector.py", "_vmad_detector_at_rev",
                              {"from vmad.bundle import": "from _vmad_bundle_at_rev import"},
                              where)
    return old_detector.BundleSlot, old_detector.WindowScorer


def _bound_call(onnx: bytes, name: str, window: np.ndarray, outputs: list[str],
                buffers: list[np.ndarray], change: dict[str, object]) -> Callable[[], None]:
    """`run_with_iobinding` on a session opened as the agent opens it, but for `change`
    (SessionOptions attributes; `allow_spinning` is the intra-op pool's config entry)."""
    import onnxruntime as ort

    from vmad.bundle import _session_options

    options = _session_options()
    for key, value in change.items():
        if key == "allow_spinning":
            options.add_session_config_entry("session.intra_op.allow_spinning", str(value))
        else:
            setattr(options, key, value)
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    binding.bind_cpu_input(name, window)
    copies = [buffer.copy() for buffer in buffers]
    for output, buffer in zip(outputs, copies, strict=True):
        binding.bind_output(output, "cpu", 0, np.float32, list(buffer.shape),
                            buffer.ctypes.data)
    return lambda: session.run_with_iobinding(binding)


def _adapted_bundle(cnn_weight: float) -> tuple[str, bytes]:
    """(metadata JSON, ONNX) of the shipped network adapted to a synthetic VM's first
    hour with the network at `cnn_weight` (the trainer's export; the agent never runs
    this code)."""
    from vmad.schema import DEFAULT_SCALE_FLOORS
    from vmad.synthetic import generate_vm
    from vmad.trainer.adaptation import fit_adaptation
    from vmad.trainer.checkpoint import load_default_checkpoint
    from vmad.trainer.config import AdaptationSettings
    from vmad.trainer.export import export_bundle

    checkpoint = load_default_checkpoint()
    vm, _ = generate_vm(900, 720)
    adaptation = fit_adaptation(checkpoint.model, vm.values, checkpoint.window,
                                floors=list(DEFAULT_SCALE_FLOORS), cnn_weight=cnn_weight,
                                normal_states=AdaptationSettings().normal_states)
    bundle = export_bundle(checkpoint, f"adapted-w{cnn_weight:g}", adaptation=adaptation)
    return bundle.metadata.to_json(), bundle.onnx_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the agent's step as it was at this git revision")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--windows", type=int, default=3000, help="per row and round")
    parser.add_argument("--block", type=int, default=1,
                        help="calls in a row before the next row (1: interleaved call by "
                             "call, caches shared as in an agent that scores every 5 s; "
                             "--windows: hot loops, as `vmad bench agent-overhead`)")
    args = parser.parse_args(argv)
    if args.block < 1 or args.windows % args.block:
        parser.error("--block must divide --windows")

    from vmad.edge_agent.detector import BundleSlot, WindowScorer
    from vmad.edge_agent.sampler import METRICS
    from vmad.schema import DEFAULT_WINDOW

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vmad-bench-latency-") as scratch:
        work = Path(scratch)

        def full_scorer(slot_class: type, scorer_class: type, name: str,
                        install: tuple[str, bytes] | None = None) -> Callable[[], None]:
            slot = slot_class(work / name, METRICS, DEFAULT_WINDOW)
            if install is None:
                assert slot.load_initial(None) is not None, "no usable bundle"
            else:
                slot.install(*install)
            scorer = scorer_class(slot)
            for _ in range(DEFAULT_WINDOW):
                scorer.push(list(rng.random(len(METRICS)) * 50))
            # Python floats, as the sampler gives them; a fresh sample every call.
            samples = itertools.cycle((rng.random((997, len(METRICS))) * 50).tolist())
            return lambda: scorer.push(next(samples))

        rows: dict[str, Callable[[], None]] = {
            "agent: WindowScorer.push": full_scorer(BundleSlot, WindowScorer, "now")}
        for weight in (0.5, 0.0):
            metadata, onnx = _adapted_bundle(weight)
            rows[f"agent: adapted, network weight {weight:g}"] = full_scorer(
                BundleSlot, WindowScorer, f"adapted-{weight:g}", (metadata, onnx))
        if args.against:
            rows[f"agent at {args.against}"] = full_scorer(
                *_previous_scorer_class(args.against, work), "rev")
        slot = BundleSlot(work / "ort", METRICS, DEFAULT_WINDOW)
        bundle = slot.load_initial(None)
        assert bundle is not None
        session, name = bundle._session, bundle._input_name
        window = bundle.normalize(rng.random((1, len(METRICS), DEFAULT_WINDOW)) * 50)
        outputs = [output.name for output in session.get_outputs()]
        binding = session.io_binding()
        binding.bind_cpu_input(name, window)
        buffers = [np.zeros(o.shape, np.float32)
                   for o in session.run(outputs, {name: window})]
        for output, buffer in zip(outputs, buffers, strict=True):
            binding.bind_output(output, "cpu", 0, np.float32, list(buffer.shape),
                                buffer.ctypes.data)
        rows["ORT: bound buffers"] = lambda: session.run_with_iobinding(binding)
        for label, change in (("arena + mem patterns on", {"enable_cpu_mem_arena": True,
                                                           "enable_mem_pattern": True}),
                              ("no spinning", {"allow_spinning": "0"})):
            rows[f"ORT: bound buffers, {label}"] = _bound_call(
                bundle.onnx_bytes, name, window, outputs, buffers, change)
        rows["ORT: session.run, both outputs"] = lambda: session.run(outputs, {name: window})
        rows["ORT: session.run, score only"] = lambda: session.run(outputs[:1],
                                                                   {name: window})

        times: dict[str, list[float]] = {row: [] for row in rows}
        clock = time.perf_counter
        forward, backward = list(rows.items()), list(reversed(rows.items()))
        for index in range(args.rounds * args.windows // args.block):
            for row, call in forward if index % 2 == 0 else backward:
                spent = times[row]
                for _ in range(args.block):
                    start = clock()
                    call()
                    spent.append(clock() - start)

    print(f"bundle {bundle.metadata.model_kind} {bundle.metadata.version}, "
          f"{args.rounds * args.windows} windows per row, one thread")
    print(f"{'row':46s} {'p50 us':>7s} {'p90 us':>7s} {'p99 us':>7s} {'rounds p50':>11s}")
    for row, spent in times.items():
        micro = np.asarray(spent) * 1e6
        # Each round's p50 (rounds of `--windows` calls): how steady the p50 was.
        rounds = np.percentile(micro.reshape(args.rounds, -1), 50, axis=1)
        print(f"{row:46s} {np.percentile(micro, 50):7.1f} {np.percentile(micro, 90):7.1f} "
              f"{np.percentile(micro, 99):7.1f} {rounds.min():5.1f}-{rounds.max():<5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
