"""Sampling the VM: CPU %, memory %, disk MB/s and network MB/s (vmad.schema units), and
any of `OWN_METRICS` the agent is configured to sample after them (`own_metrics`).

Disk and network come from monotonically growing byte counters, so a sample is the rate
between two readings. Counters can go backwards: a 32-bit counter wraps, a NIC is
re-created, a VM is live-migrated. A backwards step never yields a negative or huge rate:
a step just under a 2**32 or 2**64 boundary is taken as a wrap, anything else as a reset
to zero (the new value is then the bytes since the reset).

The reading source is a parameter so tests replay recorded readings (resets included);
`PsutilSource` is the real one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmad.schema import DEFAULT_METRICS

__all__ = ["METRICS", "OWN_METRICS", "PsutilSource", "Reading", "Sampler", "check_own_metrics",
           "counter_delta"]

METRICS = DEFAULT_METRICS
_MB = 1_000_000.0

# Metrics an agent may sample after the default four (`own_metrics` in agent.yaml): a
# server's usual ones, as SMD records them. The trainer's detector reads them beside the
# four its network reads (docs/runtime.md). Each is a gauge, or a rate per second of a
# cumulative counter (its divisor: MB for bytes). Linux; psutil and /proc/net/snmp.
OWN_METRICS: dict[str, tuple[str, float]] = {
    "load_1": ("gauge", 1.0), "load_5": ("gauge", 1.0), "load_15": ("gauge", 1.0),
    "cpu_user_percent": ("gauge", 1.0), "cpu_system_percent": ("gauge", 1.0),
    "cpu_iowait_percent": ("gauge", 1.0), "cpu_steal_percent": ("gauge", 1.0),
    "swap_percent": ("gauge", 1.0), "swap_in_mb_s": ("rate", _MB),
    "swap_out_mb_s": ("rate", _MB),
    "disk_read_mb_s": ("rate", _MB), "disk_write_mb_s": ("rate", _MB),
    "disk_ops_s": ("rate", 1.0),
    "net_rx_mb_s": ("rate", _MB), "net_tx_mb_s": ("rate", _MB),
    "net_packets_s": ("rate", 1.0), "net_errors_s": ("rate", 1.0),
    "context_switches_s": ("rate", 1.0), "interrupts_s": ("rate", 1.0),
    "processes": ("gauge", 1.0),
    "tcp_retrans_segs_s": ("rate", 1.0), "tcp_active_opens_s": ("rate", 1.0),
    "tcp_curr_estab": ("gauge", 1.0),
}
_SNMP = "/proc/net/snmp"


def check_own_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple; ValueError for one not in OWN_METRICS or listed twice."""
    unknown = [name for name in names if name not in OWN_METRICS]
    if unknown:
        raise ValueError(f"unknown own metrics {unknown}; choose from {', '.join(OWN_METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError("an own metric is listed twice")
    return tuple(names)


def _tcp_counters(path: str = _SNMP) -> dict[str, int]:
    """The `Tcp:` counters of /proc/net/snmp (a header line of names, then values)."""
    with open(path) as handle:
        rows = [line.split() for line in handle if line.startswith("Tcp:")]
    if len(rows) != 2:
        raise OSError(f"{path} has no Tcp: header and values")
    return {name: int(value) for name, value in zip(rows[0][1:], rows[1][1:], strict=True)}


def read_own(ps: Any, names: Sequence[str]) -> tuple[float | int, ...]:
    """The raw readings of `names` (of OWN_METRICS): a gauge's value, a rate's counter.
    Each source is read once, and only when one of its metrics is asked for."""
    wanted, got = set(names), {}
    if wanted & {"load_1", "load_5", "load_15"}:
        got["load_1"], got["load_5"], got["load_15"] = os.getloadavg()
    if wanted & {"cpu_user_percent", "cpu_system_percent", "cpu_iowait_percent",
                 "cpu_steal_percent"}:
        times = ps.cpu_times_percent(interval=None)
        got.update(cpu_user_percent=times.user, cpu_system_percent=times.system,
                   cpu_iowait_percent=getattr(times, "iowait", 0.0),
                   cpu_steal_percent=getattr(times, "steal", 0.0))
    if wanted & {"swap_percent", "swap_in_mb_s", "swap_out_mb_s"}:
        swap = ps.swap_memory()
        got.update(swap_percent=swap.percent, swap_in_mb_s=swap.sin, swap_out_mb_s=swap.sout)
    if wanted & {"disk_read_mb_s", "disk_write_mb_s", "disk_ops_s"}:
        disk = ps.disk_io_counters(nowrap=True)
        got.update(disk_read_mb_s=disk.read_bytes if disk else 0,
                   disk_write_mb_s=disk.write_bytes if disk else 0,
                   disk_ops_s=disk.read_count + disk.write_count if disk else 0)
    if wanted & {"net_rx_mb_s", "net_tx_mb_s", "net_packets_s", "net_errors_s"}:
        net = ps.net_io_counters(nowrap=True)
        got.update(net_rx_mb_s=net.bytes_recv if net else 0,
                   net_tx_mb_s=net.bytes_sent if net else 0,
                   net_packets_s=net.packets_recv + net.packets_sent if net else 0,
                   net_errors_s=net.errin + net.errout + net.dropin + net.dropout
                   if net else 0)
    if wanted & {"context_switches_s", "interrupts_s"}:
        stats = ps.cpu_stats()
        got.update(context_switches_s=stats.ctx_switches, interrupts_s=stats.interrupts)
    if "processes" in wanted:
        got["processes"] = len(ps.pids())
    if wanted & {"tcp_retrans_segs_s", "tcp_active_opens_s", "tcp_curr_estab"}:
        tcp = _tcp_counters()
        got.update(tcp_retrans_segs_s=tcp["RetransSegs"],
                   tcp_active_opens_s=tcp["ActiveOpens"], tcp_curr_estab=tcp["CurrEstab"])
    return tuple(got[name] for name in names)


@dataclass(frozen=True)
class Reading:
    """One raw reading: instantaneous percentages and cumulative byte counters."""

    timestamp: float
    cpu_percent: float
    memory_percent: float
    disk_bytes: int  # read + written since boot
    net_bytes: int  # received + sent since boot
    own: tuple[float | int, ...] = ()  # the own metrics' raw readings (`read_own`)


class PsutilSource:
    """Readings from psutil. CPU % is since the previous call (psutil keeps the state)."""

    def __init__(self, own_metrics: Sequence[str] = ()) -> None:
        import psutil

        self._psutil = psutil
        self.own_metrics = tuple(own_metrics)
        psutil.cpu_percent(interval=None)  # first call only primes psutil's reference
        if self.own_metrics:
            read_own(psutil, self.own_metrics)  # primes cpu_times_percent; fails early

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
            own=read_own(ps, self.own_metrics) if self.own_metrics else (),
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
    """Turns readings into samples `(timestamp, [cpu %, mem %, disk MB/s, net MB/s, own
    metrics...])`."""

    def __init__(self, source: Callable[[], Reading] | None = None,
                 own_metrics: Sequence[str] = ()) -> None:
        self.own_metrics = check_own_metrics(own_metrics)
        self._source = source if source is not None else PsutilSource(self.own_metrics)
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
        values = [reading.cpu_percent, reading.memory_percent, disk, net]
        if len(reading.own) != len(self.own_metrics):
            raise ValueError(f"a reading holds {len(reading.own)} own metrics, "
                             f"{len(self.own_metrics)} configured")
        for name, now, before in zip(self.own_metrics, reading.own, previous.own or
                                     reading.own, strict=True):
            kind, divisor = OWN_METRICS[name]
            if kind == "gauge":
                values.append(float(now))
                continue
            if now < before:
                self.resets += 1
            values.append(counter_delta(int(before), int(now)) / elapsed / divisor)
        return reading.timestamp, values
