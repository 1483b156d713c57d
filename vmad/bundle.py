"""Model bundles: an exported detector as ONNX plus the metadata needed to run it.

A bundle is a folder holding `model.onnx` and `bundle.json`. The metadata carries
everything the agent must not guess: metric names and order, window length,
normalization, decision threshold, model kind, provenance, the sha256 of the ONNX
file, `warmup`: true when the statistics are not the VM's own (the pooled bundle a
fresh VM starts with), so its verdicts must not raise alarms, and `alarm_after`: how many
windows in a row must reach the threshold before a verdict is anomalous (Prometheus'
`for:`; 1 = every window on its own). The ONNX graph takes
normalized windows `float32[batch, M, T]` and returns the anomaly score
`float32[batch]` in [0, 1] and, optionally, each metric's contribution
`float32[batch, M]` (larger = more to blame).

Loading never unpickles anything, and every check failure raises `BundleError` naming
the problem. NumPy + ONNX Runtime only: the agent imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmad.errors import InputError
from vmad.evaluation import run_lengths
from vmad.windows import Normalizer

FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
METADATA_FILE = "bundle.json"
# An agent-side model is small; anything bigger is a mistake or an attack.
MAX_ONNX_BYTES = 64 * 1024 * 1024
# Windows in a row before an alarm: beyond an hour at 5 s is a misconfiguration.
MAX_ALARM_AFTER = 720
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"


# np.clip's own ufunc: `np.clip` reaches it through a Python wrapper that costs more than
# clipping one window (about 8 us against 2 us per call); min then max where it is absent.
try:
    from numpy._core.umath import clip as _clip_ufunc
except ImportError:  # pragma: no cover - numpy < 2 names it numpy.core.umath.clip
    _clip_ufunc = None


class BundleError(InputError):
    """A bundle that is malformed, corrupt, or does not fit what the caller expects."""


@dataclass(frozen=True)
class BundleMetadata:
    """What `bundle.json` holds. `version` names this model build (shown in metrics)."""

    version: str
    model_kind: str
    metrics: tuple[str, ...]
    window: int
    normalization: Normalizer
    threshold: float
    onnx_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)
    warmup: bool = False
    alarm_after: int = 1
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "version": self.version,
                "model_kind": self.model_kind,
                "metrics": list(self.metrics),
                "window": self.window,
                "normalization": self.normalization.to_dict(),
                "threshold": self.threshold,
                "onnx_file": ONNX_FILE,
                "onnx_sha256": self.onnx_sha256,
                "provenance": self.provenance,
                "warmup": self.warmup,
                "alarm_after": self.alarm_after,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleMetadata:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"bundle metadata is not valid JSON: {error}") from None
        except RecursionError:
            raise BundleError("bundle metadata is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise BundleError("bundle metadata must be a JSON object")
        fmt = data.get("format_version")
        if fmt != FORMAT_VERSION:
            raise BundleError(
                f"bundle format_version {fmt!r} is not supported (this vmad reads {FORMAT_VERSION})"
            )
        expected_types: dict[str, type | tuple[type, ...]] = {
            "version": str, "model_kind": str, "metrics": list, "window": int,
            "normalization": dict, "threshold": (int, float), "onnx_sha256": str,
        }
        for key, kind in expected_types.items():
            if key not in data:
                raise BundleError(f"bundle metadata lacks the key {key!r}")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise BundleError(f"bundle metadata key {key!r} has the wrong type")
        metrics = tuple(data["metrics"])
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise BundleError("bundle metadata 'metrics' must be a non-empty list of names")
        if len(set(metrics)) != len(metrics):
            raise BundleError("bundle metadata 'metrics' repeats a name")
        if data["window"] < 1:
            raise BundleError(f"bundle window must be >= 1, got {data['window']}")
        threshold = float(data["threshold"])
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise BundleError(f"bundle threshold must lie in [0, 1], got {threshold}")
        try:
            normalization = Normalizer.from_dict(data["normalization"])
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"bundle normalization is invalid: {error}") from None
        if len(normalization.center) != len(metrics):
            raise BundleError(
                f"bundle normalization covers {len(normalization.center)} metrics "
                f"but the bundle names {len(metrics)}"
            )
        warmup = data.get("warmup", False)
        if not isinstance(warmup, bool):
            raise BundleError("bundle metadata key 'warmup' has the wrong type")
        # Absent in bundles written before it existed: every window on its own.
        alarm_after = data.get("alarm_after", 1)
        if isinstance(alarm_after, bool) or not isinstance(alarm_after, int) \
                or not 1 <= alarm_after <= MAX_ALARM_AFTER:
            raise BundleError(f"bundle alarm_after must be an integer in [1, {MAX_ALARM_AFTER}], "
                              f"got {alarm_after!r}")
        return cls(
            version=data["version"],
            model_kind=data["model_kind"],
            metrics=metrics,
            window=int(data["window"]),
            normalization=normalization,
            threshold=threshold,
            onnx_sha256=data["onnx_sha256"].lower(),
            provenance=dict(data.get("provenance") or {}),
            warmup=warmup,
            alarm_after=alarm_after,
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bundle:
    """A verified bundle, ready to score raw (un-normalized) windows.

    Construct with `load_bundle` (from disk) or `Bundle.from_parts` (bytes received over
    the network); both run the same checks.
    """

    def __init__(self, metadata: BundleMetadata, onnx_bytes: bytes, session: Any) -> None:
        self.metadata = metadata
        self.onnx_bytes = onnx_bytes
        self._session = session
        self._input_name = session.get_inputs()[0].name
        # Asked for by name once: `run(None, ...)` rebuilds this list on every call.
        self._output_names = [output.name for output in session.get_outputs()]
        self._one: _OneWindow | None = None  # the agent's single-window path, see score_window
        self._one_lock = threading.Lock()

    @classmethod
    def from_parts(
        cls,
        metadata_json: str | bytes,
        onnx_bytes: bytes,
        *,
        expect_metrics: Sequence[str] | None = None,
        expect_window: int | None = None,
        metrics_within: Sequence[str] | None = None,
    ) -> Bundle:
        """`metrics_within`: the bundle takes these metrics or the first of them (an
        agent that samples metrics of its own after a network's runs a bundle over the
        network's alone until its own arrives)."""
        metadata = BundleMetadata.from_json(metadata_json)
        if len(onnx_bytes) > MAX_ONNX_BYTES:
            raise BundleError(
                f"ONNX model is {len(onnx_bytes)} bytes, above the {MAX_ONNX_BYTES} byte limit"
            )
        actual = sha256_hex(onnx_bytes)
        if actual != metadata.onnx_sha256:
            raise BundleError(
                f"ONNX checksum mismatch: metadata says {metadata.onnx_sha256[:12]}..., "
                f"file is {actual[:12]}..."
            )
        if expect_metrics is not None and tuple(expect_metrics) != metadata.metrics:
            raise BundleError(
                f"bundle metrics {list(metadata.metrics)} "
                f"differ from expected {list(expect_metrics)}"
            )
        if metrics_within is not None and \
                tuple(metrics_within[:len(metadata.metrics)]) != metadata.metrics:
            raise BundleError(
                f"bundle metrics {list(metadata.metrics)} are not "
                f"{list(metrics_within)} or the first of them"
            )
        if expect_window is not None and expect_window != metadata.window:
            raise BundleError(
                f"bundle window {metadata.window} differs from expected {expect_window}"
            )
        session = _open_session(onnx_bytes)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) not in (1, 2):
            raise BundleError(
                "ONNX model must have one input and one or two outputs (score, "
                f"contributions), has {len(inputs)} and {len(outputs)}"
            )
        shape = inputs[0].shape
        want = (len(metadata.metrics), metadata.window)
        if len(shape) != 3 or tuple(shape[1:]) != want:
            raise BundleError(
                f"ONNX input shape {shape} does not match metadata [batch, {want[0]}, {want[1]}]"
            )
        bundle = cls(metadata, onnx_bytes, session)
        bundle.self_test()
        return bundle

    def self_test(self) -> None:
        """Run the model on realistic raw windows (at the normalization centre, typical
        noise, far out on either side, past the clip) and refuse it unless it runs and
        every output is a finite probability: a model whose output is NaN or that fails
        at run time must never be installed."""
        center = np.asarray(self.metadata.normalization.center, dtype=np.float32)
        scale = np.asarray(self.metadata.normalization.scale, dtype=np.float32)
        m, t = len(self.metadata.metrics), self.metadata.window
        z = np.random.default_rng(0).normal(size=(8, m, t)).astype(np.float32)
        z[1] = 0.0
        z[2] += 3.0
        z[3] -= 3.0
        z[4] = 20.0  # past the clip
        z[5, :, t // 2:] += 6.0  # a step, as at the start of an incident
        raw = center[None, :, None] + scale[None, :, None] * z
        try:
            scores, contributions = self.score_with_contributions(raw)
        except Exception as error:  # onnxruntime raises several private exception types
            raise BundleError(f"the model fails to run: {str(error)[:300]}") from None
        if scores.shape != (len(raw),):
            raise BundleError(f"ONNX output shape {scores.shape} is not [batch]")
        if contributions is not None and (contributions.shape != (len(raw), m)
                                          or not np.all(np.isfinite(contributions))):
            raise BundleError(f"ONNX contributions (shape {contributions.shape}) are not "
                              f"finite [batch, {m}]")
        if not np.all(np.isfinite(scores)) or scores.min() < 0.0 or scores.max() > 1.0:
            raise BundleError("the model's output on test windows is not a finite "
                              f"probability in [0, 1] (min {scores.min()}, max {scores.max()})")
        # The agent's own path (`score_window`) must run too: refused now, not rolled
        # back at the first window.
        try:
            score, blame = self.score_window(raw[5])
        except Exception as error:  # onnxruntime raises several private exception types
            raise BundleError(f"the model fails to run one window: {str(error)[:300]}"
                              ) from None
        if not 0.0 <= score <= 1.0 or len(blame) not in (0, m):  # NaN fails too
            raise BundleError(f"the model's output on one window is not a probability "
                              f"and {m} contributions (score {score}, {len(blame)} values)")

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.metadata.metrics

    @property
    def window(self) -> int:
        return self.metadata.window

    def run(self, normalized: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Score per window and, if the graph gives them, per-metric contributions
        `[W, M]`, for already-normalized `float32[W, M, T]`."""
        feed = np.ascontiguousarray(normalized, dtype=np.float32)  # no copy when it is one
        outputs = self._session.run(self._output_names, {self._input_name: feed})
        scores = np.asarray(outputs[0], dtype=np.float32).reshape(-1)
        contributions = np.asarray(outputs[1], dtype=np.float32) if len(outputs) > 1 else None
        return scores, contributions

    def probabilities(self, normalized: np.ndarray) -> np.ndarray:
        """Anomaly score per window for already-normalized `float32[W, M, T]`."""
        return self.run(normalized)[0]

    def normalize(self, raw_windows: np.ndarray) -> np.ndarray:
        """`float32[W, M, T]`, C-contiguous, normalized with the bundle's statistics."""
        return self.metadata.normalization.apply_windows(raw_windows)

    def score(self, raw_windows: np.ndarray) -> np.ndarray:
        """Anomaly score per window for raw `[W, M, T]` windows (normalized here)."""
        return self.probabilities(self.normalize(raw_windows))

    def score_with_contributions(self, raw_windows: np.ndarray
                                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores and per-metric contributions for raw `[W, M, T]` windows."""
        return self.run(self.normalize(raw_windows))

    def score_window(self, raw_window: np.ndarray) -> tuple[float, tuple[float, ...]]:
        """Score and per-metric contributions (empty if the graph has none) of one raw
        window `[M, T]` (any strides, e.g. a view into a ring of samples): the same
        numbers as `score_with_contributions(raw_window[None])`, at a fraction of its
        Python cost. The agent calls this once per sample; see `_OneWindow`."""
        with self._one_lock:  # the buffers are shared; the agent scores from one thread
            if self._one is None:
                self._one = _OneWindow(self)
            return self._one.score(raw_window)

    def verdicts(self, scores: np.ndarray, before: int = 0) -> np.ndarray:
        """The agent's verdicts on the scores of consecutive windows, oldest first: at the
        threshold for `alarm_after` windows in a row (`before` such windows just ahead of
        them count), never during warm-up."""
        meta = self.metadata
        if meta.warmup:
            return np.zeros(len(scores), dtype=bool)
        over = run_lengths(np.asarray(scores) >= meta.threshold, before)
        return over >= meta.alarm_after

    def save(self, folder: str | Path) -> Path:
        return write_bundle(folder, self.metadata, self.onnx_bytes)


class _OneWindow:
    """Preallocated buffers and an ONNX Runtime IOBinding for one window at a time.

    Per window, `session.run` would allocate the normalized input, convert the feed dict,
    look up the output names and wrap each output in a new array; half the agent's time
    per window went there, not into the model. Here the normalized window is written
    into one float32 buffer that stays bound as the graph's input, and the outputs land
    in buffers bound once. The output shapes come from one ordinary run at creation
    (the graph's batch axis is symbolic): a graph whose output shape changed with the
    window's values would fail here and be treated as a bundle failing to score.
    """

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle
        m, t = len(bundle.metadata.metrics), bundle.metadata.window
        # The Normalizer's arithmetic (float32 subtract, divide, clip), in place on one
        # `[M, T]` window, with its statistics as float32 columns `[M, 1]` built once;
        # `Bundle.normalize` is the reference the tests hold this path equal to.
        norm = bundle.metadata.normalization
        self._center = np.asarray(norm.center, dtype=np.float32)[:, None]
        self._scale = np.asarray(norm.scale, dtype=np.float32)[:, None]
        self._clip = np.float32(norm.clip)
        self._input = np.zeros((1, m, t), dtype=np.float32)
        self._view = self._input[0]
        outputs = bundle.run(self._input)  # shapes only; the values are not used
        self._score = np.zeros(outputs[0].shape, dtype=np.float32)
        self._score_flat = self._score.reshape(-1)  # a view: [1] or [1, 1] alike
        self._contributions = (np.zeros(outputs[1].shape, dtype=np.float32)
                               if outputs[1] is not None else None)
        session = bundle._session
        self._binding = session.io_binding()
        self._binding.bind_input(bundle._input_name, "cpu", 0, np.float32,
                                 list(self._input.shape), self._input.ctypes.data)
        for name, buffer in zip(bundle._output_names, (self._score, self._contributions),
                                strict=False):
            if buffer is not None:
                self._binding.bind_output(name, "cpu", 0, np.float32, list(buffer.shape),
                                          buffer.ctypes.data)
        self._run = session.run_with_iobinding

    def score(self, raw_window: np.ndarray) -> tuple[float, tuple[float, ...]]:
        view, clip = self._view, self._clip
        if raw_window.dtype != np.float32:  # float32 first, as `Bundle.normalize` does
            raw_window = raw_window.astype(np.float32)
        np.subtract(raw_window, self._center, out=view)  # also copies a strided view
        np.divide(view, self._scale, out=view)
        if _clip_ufunc is not None:
            _clip_ufunc(view, -clip, clip, out=view)
        else:
            np.minimum(view, clip, out=view)  # the same values as np.clip, NaN stays NaN
            np.maximum(view, -clip, out=view)
        self._run(self._binding)
        contributions = self._contributions
        return (float(self._score_flat[0]),
                tuple(contributions[0].tolist()) if contributions is not None else ())


def _session_options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread each: the agent shares the VM with the customer's workload.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ONNX Runtime's defaults, stated: nodes one after another, every graph optimization
    # (measured, bench/agent_latency.py: the options below change the p50 by less than
    # the machine's noise).
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One small window at a time: an arena and pre-planned memory patterns only hold on to
    # memory the agent does not need (docs/agent.md, bench/agent_imports.py).
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def _open_session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = _session_options()
    try:
        return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises several private exception types
        raise BundleError(f"ONNX Runtime cannot load the model: {error}") from None


def load_bundle(
    folder: str | Path,
    *,
    expect_metrics: Sequence[str] | None = None,
    expect_window: int | None = None,
    metrics_within: Sequence[str] | None = None,
) -> Bundle:
    """Load and verify the bundle in `folder`; raises `BundleError` naming the problem."""
    folder = Path(folder)
    meta_path, onnx_path = folder / METADATA_FILE, folder / ONNX_FILE
    for path in (meta_path, onnx_path):
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}")
    if onnx_path.stat().st_size > MAX_ONNX_BYTES:
        raise BundleError(f"{onnx_path} is larger than {MAX_ONNX_BYTES} bytes")
    try:
        return Bundle.from_parts(
            meta_path.read_bytes(),
            onnx_path.read_bytes(),
            expect_metrics=expect_metrics,
            expect_window=expect_window,
            metrics_within=metrics_within,
        )
    except BundleError as error:
        raise BundleError(f"{folder}: {error}") from None


def write_bundle(folder: str | Path, metadata: BundleMetadata, onnx_bytes: bytes) -> Path:
    """Write a bundle atomically: into a temporary sibling folder, then renamed in place."""
    folder = Path(folder)
    if sha256_hex(onnx_bytes) != metadata.onnx_sha256:
        raise BundleError("metadata checksum does not match the ONNX bytes being written")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    (staging / ONNX_FILE).write_bytes(onnx_bytes)
    (staging / METADATA_FILE).write_text(metadata.to_json() + "\n")
    if folder.exists():
        retired = folder.with_name(f".{folder.name}.old")
        if retired.exists():
            _remove_tree(retired)
        os.replace(folder, retired)
        os.replace(staging, folder)
        _remove_tree(retired)
    else:
        os.replace(staging, folder)
    return folder


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def load_default_bundle() -> Bundle:
    """The pretrained bundle shipped inside the package for the default metrics."""
    from vmad.schema import DEFAULT_METRICS, DEFAULT_WINDOW

    return load_bundle(DEFAULT_BUNDLE_DIR, expect_metrics=DEFAULT_METRICS,
                       expect_window=DEFAULT_WINDOW)
