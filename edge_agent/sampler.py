"""Sampling the VM: CPU %, memory %, disk MB/s and network MB/s (vmad.schema units).

Disk and network come from monotonically growing byte counters, so a sample is the rate
between two readings. Counters can go backwards: a 32-bit counter wraps, a NIC is
re-created, a VM is live-migrated. A backwards step never yields a negative or huge rate:
a step just under a 2**32 or 2**64 boundary is taken as a wrap, anything else as a reset
to zero (the new value is then the bytes since the reset).

The reading source is a parameter so tests replay recorded readings (resets included);
`PsutilSource` is the real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vmad.schema import DEFAULT_METRICS

__all__ = ["METRICS", "PsutilSource", "Reading", "Sampler", "counter_delta"]

METRICS = DEFAULT_METRICS
_MB = 1_000_000.0


@dataclass(frozen=True)
class Reading:
    """One raw reading: instantaneous percentages and cumulative byte counters."""

    timestamp: float
    cpu_percent: float
    memory_percent: float
    disk_bytes: int  # read + written since boot
    net_bytes: int  # received + sent since boot


class PsutilSource:
    """Readings from psutil. CPU % is since the previous call (psutil keeps the state)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        psutil.cpu_percent(interval=None)  # first call only primes psutil's reference

    def __call__(self) -> Reading:
        ps = self._psutil
        disk = ps.disk_io_counters(nowrap=True)
        net = ps.net_io_counters(nowrap=True)
        return Reading(
            timestamp=time.time(),
            cpu_percent=float(ps.cpu_percent(interval=None)),
            memory_percent=float(ps.virtual_memory().percent),
            disk_bytes=(disk.read_bytes + disk.write_bytes) if disk else 0,
            net_bytes=(net.bytes_recv + net.bytes_sent) if net else 0,
        )


def counter_delta(previous: int, current: int) -> int:
    """Bytes between two counter values, surviving wraps and resets (never negative)."""
    if current >= previous:
        return current - previous
    for width in (2**32, 2**64):
        # Wrapped when the old value was close to the boundary (within 1/8 of it).
        if width * 7 // 8 <= previous < width:
            return width - previous + current
    return current  # reset: the counter restarted from zero


class Sampler:
    """Turns readings into samples `(timestamp, [cpu %, mem %, disk MB/s, net MB/s])`."""

    def __init__(self, source: Callable[[], Reading] | None = None) -> None:
        self._source = source if source is not None else PsutilSource()
        self._previous: Reading | None = None
        self.resets = 0  # backward counter steps seen (wrap or reset)

    def sample(self) -> tuple[float, list[float]] | None:
        """The next sample, or None for the first reading (a rate needs two)."""
        reading = self._source()
        previous, self._previous = self._previous, reading
        if previous is None:
            return None
        elapsed = reading.timestamp - previous.timestamp
        if elapsed <= 0:  # clock stepped back: no rate can be trusted this once
            return None
        if reading.disk_bytes < previous.disk_bytes or reading.net_bytes < previous.net_bytes:
            self.resets += 1
        disk = counter_delta(previous.disk_bytes, reading.disk_bytes) / elapsed / _MB
        net = counter_delta(previous.net_bytes, reading.net_bytes) / elapsed / _MB
        return reading.timestamp, [reading.cpu_percent, reading.memory_percent, disk, net]
