"""The agent's model: the last T samples, the current bundle, verdicts.

`BundleSlot` holds the running bundle and the previous one. A new bundle (pushed by the
trainer) is verified completely first — checksum from the wire against the bytes, the
bundle's own metadata checks, the metric names and window this agent samples — and only
then written to disk (`current/`, the old one moved to `previous/`) and swapped in with
one reference assignment, so inference never sees a half-installed model. A bundle that
fails any check never runs: it is counted in `rejected` and the old one keeps running.
`rollback()` swaps back to the previous bundle; a bundle that fails while scoring (an
ONNX Runtime error, a score that is not a probability) is rolled back the same way and
counted in `run_failures`.

`WindowScorer` keeps the ring of the last T samples and scores the newest window with
the slot's bundle. A bundle marked `warmup` (statistics pooled over other VMs, before
the trainer has fitted this VM's own) is scored but never raises an alarm: that is the
agent's warm-up state, shown in its log, `/metrics` and the trainer's store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vmad.bundle import Bundle, BundleError, load_bundle, sha256_hex
from vmad.state import blame_text

__all__ = ["BundleSlot", "WindowScorer", "WindowVerdict"]

log = logging.getLogger(__name__)


class BundleSlot:
    def __init__(self, directory: str | Path, metrics: tuple[str, ...], window: int) -> None:
        self.directory = Path(directory)
        self.metrics = metrics
        self.window = window
        self._lock = threading.Lock()
        self.current: Bundle | None = None
        self.previous: Bundle | None = None
        self.rejected = 0
        self.run_failures = 0
        self.last_error = ""

    def load_initial(self, configured: str | Path | None) -> Bundle | None:
        """Start with bundle_dir/current (the last pushed one), else `configured`, else
        the packaged default. Each candidate is verified; a bad one is skipped, logged."""
        candidates: list[tuple[str, object]] = [("pushed", self.directory / "current")]
        if configured is not None:
            candidates.append(("configured", Path(configured)))
        candidates.append(("default", None))
        for name, where in candidates:
            if isinstance(where, Path) and not where.exists():
                continue
            try:
                if where is None:
                    from vmad.bundle import load_default_bundle

                    bundle = load_default_bundle()
                else:
                    bundle = load_bundle(where, metrics_within=self.metrics,
                                         expect_window=self.window)
            except BundleError as error:
                log.warning("not using the %s bundle: %s", name, error)
                continue
            prev_dir = self.directory / "previous"
            if prev_dir.exists():
                try:
                    self.previous = load_bundle(prev_dir, metrics_within=self.metrics,
                                                expect_window=self.window)
                except BundleError:
                    self.previous = None
            self.current = bundle
            log.info("running %s bundle %s", name, bundle.metadata.version)
            return bundle
        log.warning("no usable bundle: sampling and shipping telemetry without verdicts")
        return None

    def install(self, metadata_json: str | bytes, onnx_bytes: bytes,
                sha256: str | None = None) -> Bundle:
        """Verify, persist and swap in a bundle; raise BundleError (counted) if it fails."""
        try:
            if sha256 is not None and sha256.lower() != sha256_hex(onnx_bytes):
                raise BundleError(f"ONNX checksum mismatch: message says {sha256[:12]}..., "
                                  f"bytes are {sha256_hex(onnx_bytes)[:12]}...")
            bundle = Bundle.from_parts(metadata_json, onnx_bytes, metrics_within=self.metrics,
                                       expect_window=self.window)
        except BundleError as error:
            self._refused(error)
            raise
        with self._lock:
            current, previous = self.directory / "current", self.directory / "previous"
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                bundle.save(self.directory / "incoming")
                if current.exists():
                    if previous.exists():
                        shutil.rmtree(previous)
                    os.replace(current, previous)
                os.replace(self.directory / "incoming", current)
            except OSError as error:  # disk full, read-only: the running bundle stays
                shutil.rmtree(self.directory / "incoming", ignore_errors=True)
                refusal = BundleError(f"cannot write bundle {bundle.metadata.version}: "
                                      f"{error}")
            else:
                self.previous, self.current = self.current, bundle
                refusal = None
        if refusal is not None:
            self._refused(refusal)
            raise refusal
        log.info("installed bundle %s", bundle.metadata.version)
        return bundle

    def _refused(self, error: BundleError) -> None:
        with self._lock:
            self.rejected += 1
            self.last_error = str(error)
        log.error("refused bundle: %s", error)

    def failed_to_run(self, bundle: Bundle, error: str) -> None:
        """`bundle` failed while scoring: go back to the previous bundle (counted in
        `run_failures`); without one, keep it and try again on the next sample."""
        with self._lock:
            self.run_failures += 1
            self.last_error = f"bundle {bundle.metadata.version} failed to score: {error}"
            rolled_back = self.current is bundle and self.previous is not None
        log.error("%s; %s", self.last_error,
                  "rolling back to the previous bundle" if rolled_back else "no previous bundle")
        if rolled_back:
            with contextlib.suppress(BundleError, OSError):
                self.rollback()

    def rollback(self) -> Bundle:
        """Run the previous bundle again (disk and memory); raise if there is none."""
        with self._lock:
            if self.previous is None:
                raise BundleError("no previous bundle to roll back to")
            current, previous = self.directory / "current", self.directory / "previous"
            if current.exists() and previous.exists():
                swap = self.directory / "swap"
                os.replace(current, swap)
                os.replace(previous, current)
                os.replace(swap, previous)
            self.current, self.previous = self.previous, self.current
            return self.current


class WindowVerdict(NamedTuple):
    """One window's verdict. A NamedTuple, not a frozen dataclass: as immutable, and
    built once per sample at a third of the cost."""

    score: float
    # score >= threshold for the bundle's `alarm_after` windows in a row, never in warm-up
    anomalous: bool
    version: str
    warmup: bool  # the bundle's statistics are not this VM's own yet
    contributions: tuple[float, ...]  # per metric, larger = more to blame; may be empty

    def top_metrics(self, metrics: tuple[str, ...], count: int = 2) -> str:
        """'memory_percent=12.3,cpu_percent=1.1': the metrics most to blame."""
        return blame_text(metrics, self.contributions, count)


class WindowScorer:
    """Ring of the last `window` samples; scores the newest window with the slot's bundle.

    The ring is time-major, twice the window long, and each sample is written twice (rows
    `i` and `i + window`), so the newest window, oldest sample first, is always the view
    `ring[head:head + window]`: no copy or roll per sample. `Bundle.score_window`
    normalizes that view (transposed to `[M, T]`) straight into its bound input buffer."""

    def __init__(self, slot: BundleSlot) -> None:
        self.slot = slot
        self._window = slot.window
        self._ring = np.zeros((2 * slot.window, len(slot.metrics)), dtype=np.float32)
        self._filled = 0
        self._head = 0  # next sample's row, and once full the oldest sample's
        self._over = 0  # windows in a row at or above the threshold
        self.last_latency_s = 0.0

    def push(self, values: list[float]) -> WindowVerdict | None:
        """Add a sample; return the newest window's verdict once a window is full."""
        t, head, ring = self._window, self._head, self._ring
        ring[head] = values  # float32, as every path rounds a sample
        ring[head + t] = values
        head = self._head = head + 1 if head + 1 < t else 0
        if self._filled < t:
            self._filled += 1
        bundle = self.slot.current  # one read: a concurrent swap is seen whole or not at all
        if bundle is None or self._filled < t:
            return None
        start = time.perf_counter()
        # A bundle may read the first of the agent's metrics only (the network's, before
        # the trainer sends one over the agent's own metrics too); its contributions are
        # padded, so every verdict names one value per metric the agent samples.
        reads = len(bundle.metadata.metrics)
        try:
            if reads == ring.shape[1]:
                score, contributions = bundle.score_window(ring[head:head + t].T)
            else:
                score, contributions = bundle.score_window(ring[head:head + t, :reads].T)
                if contributions:
                    contributions += (0.0,) * (ring.shape[1] - reads)
        except Exception as error:  # onnxruntime's own types: never stop sampling
            self.slot.failed_to_run(bundle, str(error)[:300])
            return None
        self.last_latency_s = time.perf_counter() - start
        if not 0.0 <= score <= 1.0:  # NaN fails too
            self.slot.failed_to_run(bundle, f"score {score} is not a probability")
            return None
        meta = bundle.metadata
        self._over = self._over + 1 if score >= meta.threshold else 0
        return WindowVerdict(score, self._over >= meta.alarm_after and not meta.warmup,
                             meta.version, meta.warmup, contributions)
