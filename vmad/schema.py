"""The default metric set: one definition shared by the agent's sampler, the synthetic
generator and the default model bundle.

Units: CPU and memory in percent of the VM's capacity (0-100); disk and network in
MB/s (read+write, received+sent), as rates computed from psutil's counters.
"""

from __future__ import annotations

DEFAULT_METRICS: tuple[str, ...] = ("cpu_percent", "memory_percent", "disk_mb_s", "net_mb_s")

# The paper samples 12 times a minute and classifies windows of 64 samples.
DEFAULT_INTERVAL_S = 5.0
DEFAULT_WINDOW = 64

# Smallest normalization scale per default metric, in its own units: deviations of a few
# of these are ordinary jitter on any VM (2 % CPU, 0.5 % memory, 5 MB/s disk, 2 MB/s
# network: a log flush or a package download), however still the metric was while the
# VM's statistics were fitted.
DEFAULT_SCALE_FLOORS: tuple[float, ...] = (2.0, 0.5, 5.0, 2.0)
