"""A real `vmad inject memory-leak` on this machine is flagged by a real `vmad agent`
within a bounded time: psutil readings, the agent's windows and ONNX inference, the
verdict stream to a trainer on loopback. The bundle is a transparent rule written in
ONNX (memory rose 3 points above the first half of the window), so the test is about the
runtime path, not about how well a trained model detects (docs/detection.md)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.test_agent import start_trainer, wait_for
from tests.test_agent_process import vmad, write_config
from vmad.bundle import BundleMetadata, sha256_hex
from vmad.edge_agent.detector import BundleSlot
from vmad.edge_agent.sampler import METRICS
from vmad.schema import DEFAULT_WINDOW
from vmad.windows import Normalizer

ROOT = Path(__file__).resolve().parents[1]
WINDOW = DEFAULT_WINDOW  # the agent runs bundles of the default window only
RISE_POINTS = 3.0
FLAG_WITHIN_S = 5.0


def memory_rise_bundle() -> tuple[str, bytes]:
    """score = sigmoid(20 * (mem[-1] - mean(mem[:T/2]) - rise)) on memory / 10."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(METRICS), WINDOW])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    memory = METRICS.index("memory_percent")

    def const(name: str, values: list, kind: int = TensorProto.INT64) -> TensorProto:
        return helper.make_tensor(name, kind, [len(values)], values)

    nodes = [
        helper.make_node("Gather", ["x", "row"], ["mem"], axis=1),  # [batch, T]
        helper.make_node("Slice", ["mem", "first0", "first1", "time"], ["head"]),
        helper.make_node("ReduceMean", ["head"], ["base"], axes=[1], keepdims=1),
        helper.make_node("Slice", ["mem", "last0", "last1", "time"], ["now"]),
        helper.make_node("Sub", ["now", "base"], ["rise"]),
        helper.make_node("Sub", ["rise", "margin"], ["over"]),
        helper.make_node("Mul", ["over", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Squeeze", ["p", "time"], ["y"]),
    ]
    initializers = [
        helper.make_tensor("row", TensorProto.INT64, [], [memory]),
        const("first0", [0]), const("first1", [WINDOW // 2]),
        const("last0", [WINDOW - 1]), const("last1", [WINDOW]), const("time", [1]),
        helper.make_tensor("margin", TensorProto.FLOAT, [], [RISE_POINTS / 10]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0]),
    ]
    graph = helper.make_graph(nodes, "memory-rise", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx_bytes = model.SerializeToString()
    # Scale 10: percentages become 0-10, inside the normalizer's clip.
    metadata = BundleMetadata(
        version="memory-rise", model_kind="rule", metrics=METRICS, window=WINDOW,
        normalization=Normalizer(tuple(0.0 for _ in METRICS), tuple(10.0 for _ in METRICS),
                                 10.0),
        threshold=0.5, onnx_sha256=sha256_hex(onnx_bytes))
    return metadata.to_json(), onnx_bytes


def test_injected_memory_leak_is_flagged_within_bounded_time(tmp_path: Path) -> None:
    BundleSlot(tmp_path / "bundles", METRICS, WINDOW).install(*memory_rise_bundle())
    server, port, trainer = start_trainer()
    config = write_config(tmp_path, port, interval_s=0.1)
    text = config.read_text().replace("max_memory_share: 0.05", "max_memory_share: 0.1")
    config.write_text(text)
    agent = subprocess.Popen(vmad("agent", "--config", str(config)), cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        # A window of quiet first: the rule must not fire on an idle machine, else the
        # flag below would prove nothing.
        wait_for(lambda: trainer.verdicts >= WINDOW, timeout=60)
        assert trainer.flagged == [], "flagged before anything was injected"
        injected = subprocess.run(
            vmad("inject", "memory-leak", "--duration", "4", "--intensity", "1.0",
                 "--config", str(config)), cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert injected.returncode == 0, injected.stderr
        # Timed from the event: the moment the leak began, as `vmad inject` recorded it
        # (not from before its process started, which on a loaded machine is seconds
        # earlier).
        started = json.loads(injected.stdout)["start"]
        wait_for(lambda: any(t >= started for t in trainer.flagged), timeout=20)
        first = min(t for t in trainer.flagged if t >= started)
        assert first - started <= FLAG_WITHIN_S
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=20)
        server.stop(None)
    assert agent.returncode == 0, stderr
