"""Synthetic VM workloads with labelled faults: the source domain for pretraining.

Each VM gets a workload profile (web, batch, database, idle) with its own levels, a
daily and weekly rhythm, correlated noise, and *normal* events a detector must not flag
(web traffic bursts, scheduled batch jobs, garbage-collection saw-tooth). Faults are
then injected and labelled 1 for their whole duration:

- `memory_leak`  memory climbs linearly (a restart ends it)
- `memory_spike` memory jumps and stays high briefly
- `cpu_hog`      CPU pinned near 100 %
- `disk_storm`   disk throughput far above the VM's normal
- `net_flood`    network throughput far above the VM's normal
- combinations: `leak_hog` (leak + hog: a GC-thrashing process), `storm_hog`, `flood_hog`

Metrics are `vmad.schema.DEFAULT_METRICS` in their units. Durations are defined in
seconds, so a series sampled every 5 s and one sampled every 60 s see the same faults in
wall-clock terms. Everything is drawn from `numpy.random.default_rng(seed)`: the same
seed gives the same series. NumPy only (the demo's simulated agents use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmad.schema import DEFAULT_INTERVAL_S, DEFAULT_METRICS
from vmad.series import Series

__all__ = ["FAULT_KINDS", "PROFILES", "Fault", "generate_fleet", "generate_vm", "inject_fault",
           "inject_faults"]

CPU, MEM, DISK, NET = range(4)

# kind -> (metrics it touches, duration range in seconds)
FAULT_KINDS: dict[str, tuple[tuple[str, ...], tuple[float, float]]] = {
    "memory_leak": (("memory_percent",), (600.0, 3000.0)),
    "memory_spike": (("memory_percent",), (30.0, 300.0)),
    "cpu_hog": (("cpu_percent",), (120.0, 1200.0)),
    "disk_storm": (("disk_mb_s",), (60.0, 900.0)),
    "net_flood": (("net_mb_s",), (60.0, 900.0)),
    "leak_hog": (("memory_percent", "cpu_percent"), (600.0, 2400.0)),
    "storm_hog": (("disk_mb_s", "cpu_percent"), (60.0, 900.0)),
    "flood_hog": (("net_mb_s", "cpu_percent"), (60.0, 900.0)),
}
PROFILES = ("web", "batch", "database", "idle")
DAY_S = 86_400.0
# Monday 2025-01-06 00:00 UTC; each VM starts at a random time in the following 4 weeks.
EPOCH_START = 1_736_121_600


@dataclass(frozen=True)
class Fault:
    kind: str
    start: int  # first sample
    stop: int  # one past the last sample
    metrics: tuple[str, ...]


def _smooth_noise(rng: np.random.Generator, n: int, memory: float) -> np.ndarray:
    """Unit-variance noise correlated over about `memory` samples (an AR(1)-like kernel)."""
    if memory <= 1:
        return rng.standard_normal(n)
    length = int(memory * 5)
    kernel = np.exp(-np.arange(length) / memory)
    kernel /= np.sqrt((kernel ** 2).sum())
    raw = rng.standard_normal(n + length - 1)
    return np.convolve(raw, kernel, mode="valid")


def _rhythm(timestamps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Load in [0, 1]: a daily curve peaking in the afternoon, quieter weekends."""
    hour = (timestamps % DAY_S) / 3600.0
    peak = rng.uniform(13.0, 17.0)
    daily = 0.5 * (1 + np.cos(2 * np.pi * (hour - peak) / 24.0))
    weekday = ((timestamps // DAY_S) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    weekend = np.where(weekday >= 5, rng.uniform(0.4, 0.8), 1.0)
    return daily * weekend


def _normal_workload(profile: str, timestamps: np.ndarray, interval_s: float,
                     rng: np.random.Generator) -> np.ndarray:
    n = len(timestamps)
    load = _rhythm(timestamps, rng)
    slow = 600.0 / interval_s  # noise correlated over ~10 minutes
    values = np.empty((n, 4), dtype=np.float64)
    cpu_base, cpu_amp = {"web": (10, 45), "batch": (8, 15), "database": (15, 30),
                         "idle": (2, 4)}[profile]
    cpu_base *= rng.uniform(0.6, 1.4)
    cpu_amp *= rng.uniform(0.6, 1.4)
    values[:, CPU] = (cpu_base + cpu_amp * load + 0.12 * (cpu_base + cpu_amp)
                      * (0.6 * _smooth_noise(rng, n, slow) + 0.4 * rng.standard_normal(n)))
    mem_base = {"web": 45, "batch": 35, "database": 70, "idle": 20}[profile] * rng.uniform(0.7, 1.2)
    values[:, MEM] = mem_base + 6 * load + 1.5 * _smooth_noise(rng, n, slow) \
        + 0.3 * rng.standard_normal(n)
    disk_base = {"web": 2, "batch": 5, "database": 20, "idle": 0.3}[profile] * rng.uniform(0.5, 2)
    values[:, DISK] = disk_base * (0.5 + load) * np.exp(0.5 * rng.standard_normal(n))
    net_base = {"web": 8, "batch": 1.5, "database": 6, "idle": 0.2}[profile] * rng.uniform(0.5, 2)
    values[:, NET] = net_base * (0.3 + load) * np.exp(0.35 * _smooth_noise(rng, n, 60 / interval_s)
                                                      + 0.2 * rng.standard_normal(n))
    _normal_events(profile, values, timestamps, interval_s, rng)
    return values


def _normal_events(profile: str, values: np.ndarray, timestamps: np.ndarray,
                   interval_s: float, rng: np.random.Generator) -> None:
    """Busy-but-healthy episodes: the false alarms a good detector avoids."""
    n = len(values)

    def samples(seconds: float) -> int:
        return max(1, round(seconds / interval_s))

    if profile == "batch":
        # A scheduled job every 15-60 minutes: CPU and disk busy for 1-8 minutes.
        period = samples(rng.choice([900.0, 1800.0, 3600.0]))
        offset = int(rng.integers(0, period))
        for start in range(offset, n, period):
            stop = min(n, start + samples(rng.uniform(60, 480)))
            values[start:stop, CPU] += rng.uniform(20, 45)
            values[start:stop, DISK] *= rng.uniform(2, 5)
    if profile in ("web", "database"):
        # Traffic bursts: short CPU + network surges a few times an hour.
        count = rng.poisson(n * interval_s / 1200.0)
        for start in rng.integers(0, n, size=count):
            stop = min(n, start + samples(rng.uniform(10, 90)))
            factor = rng.uniform(1.3, 2.0)
            values[start:stop, CPU] *= factor
            values[start:stop, NET] *= factor
    if profile in ("web", "batch") and rng.random() < 0.6:
        # Garbage-collected runtime: memory creeps up a few points, then drops back.
        period = samples(rng.uniform(600, 2400))
        phase = (np.arange(n) + rng.integers(0, period)) % period
        values[:, MEM] += rng.uniform(2, 6) * phase / period


def _inject(kind: str, values: np.ndarray, start: int, stop: int,
            rng: np.random.Generator) -> None:
    span = stop - start
    region = slice(start, stop)
    if kind in ("memory_leak", "leak_hog"):
        rise = rng.uniform(15, 45)
        values[region, MEM] += np.linspace(0, rise, span) + 0.5 * rng.standard_normal(span)
    if kind == "memory_spike":
        values[region, MEM] += rng.uniform(20, 40) + rng.standard_normal(span)
    if kind in ("cpu_hog", "leak_hog", "storm_hog", "flood_hog"):
        level = rng.uniform(85, 99)
        values[region, CPU] = np.maximum(values[region, CPU], level + 2 * rng.standard_normal(span))
    if kind in ("disk_storm", "storm_hog"):
        normal = np.median(values[:, DISK])
        values[region, DISK] += (rng.uniform(20, 150) + normal * rng.uniform(5, 20)) \
            * np.exp(0.3 * rng.standard_normal(span))
    if kind in ("net_flood", "flood_hog"):
        normal = np.median(values[:, NET])
        values[region, NET] += (rng.uniform(30, 300) + normal * rng.uniform(5, 20)) \
            * np.exp(0.3 * rng.standard_normal(span))


def _clip_to_units(values: np.ndarray) -> None:
    """Keep `values[N, 4]` in DEFAULT_METRICS' ranges, in place: percentages in [0, 100],
    rates not below 0."""
    values[:, CPU] = np.clip(values[:, CPU], 0, 100)
    values[:, MEM] = np.clip(values[:, MEM], 0, 100)
    values[:, DISK:] = np.clip(values[:, DISK:], 0, None)


def inject_fault(kind: str, values: np.ndarray, start: int, stop: int,
                 rng: np.random.Generator) -> None:
    """Add fault `kind` to rows [start, stop) of `values[N, 4]` (DEFAULT_METRICS, in their
    units) in place; disk and network faults scale with the series' own median level."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; kinds: {sorted(FAULT_KINDS)}")
    _inject(kind, values, start, stop, rng)
    _clip_to_units(values)


def inject_faults(
    values: np.ndarray,
    rng: np.random.Generator,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    fault_rate: float = 0.05,
    fault_kinds: tuple[str, ...] = tuple(FAULT_KINDS),
) -> tuple[np.ndarray, list[Fault]]:
    """Inject faults into `values[N, 4]` (DEFAULT_METRICS, in their units, sampled every
    `interval_s` seconds) in place: kinds drawn from `fault_kinds`, about `fault_rate` of
    the samples inside one, with exponential gaps between them. Generated VMs get theirs
    this way, and so can a real VM's trace (bench/normalization.py `--real`). Returns the
    per-sample labels (1 inside a fault) and the faults."""
    unknown = [k for k in fault_kinds if k not in FAULT_KINDS]
    if unknown or values.ndim != 2 or values.shape[1] != len(DEFAULT_METRICS) \
            or interval_s <= 0 or not 0 <= fault_rate < 1:
        raise ValueError(f"need values [samples, {len(DEFAULT_METRICS)}], interval_s > 0, "
                         f"0 <= fault_rate < 1 and known kinds; got {values.shape}, "
                         f"{interval_s}, {fault_rate}, unknown kinds {unknown}")
    n_samples = len(values)
    labels = np.zeros(n_samples, dtype=np.int8)
    faults: list[Fault] = []
    if fault_rate > 0 and fault_kinds:
        mean_span = np.mean([np.mean(FAULT_KINDS[k][1]) for k in fault_kinds]) / interval_s
        mean_gap = mean_span * (1 - fault_rate) / fault_rate
        position = int(rng.exponential(mean_gap))
        while True:
            kind = str(rng.choice(fault_kinds))
            low, high = FAULT_KINDS[kind][1]
            span = max(2, int(rng.uniform(low, high) / interval_s))
            if position + span > n_samples:
                break
            _inject(kind, values, position, position + span, rng)
            labels[position:position + span] = 1
            faults.append(Fault(kind, position, position + span, FAULT_KINDS[kind][0]))
            position += span + max(2, int(rng.exponential(mean_gap)))
    _clip_to_units(values)
    return labels, faults


def generate_vm(
    seed: int,
    n_samples: int,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    fault_rate: float = 0.05,
    fault_kinds: tuple[str, ...] = tuple(FAULT_KINDS),
    profile: str | None = None,
    name: str | None = None,
) -> tuple[Series, list[Fault]]:
    """One VM: `n_samples` every `interval_s` seconds, about `fault_rate` of its samples
    inside injected faults (0 for none). Returns the labelled series and its faults."""
    if n_samples < 1 or interval_s <= 0 or not 0 <= fault_rate < 1:
        raise ValueError(f"need n_samples >= 1, interval_s > 0, 0 <= fault_rate < 1; got "
                         f"{n_samples}, {interval_s}, {fault_rate}")
    unknown = [k for k in fault_kinds if k not in FAULT_KINDS]
    if unknown or (profile is not None and profile not in PROFILES):
        raise ValueError(f"unknown fault kinds {unknown} or profile {profile!r}; kinds: "
                         f"{sorted(FAULT_KINDS)}, profiles: {PROFILES}")
    rng = np.random.default_rng(seed)
    profile = profile or str(rng.choice(PROFILES, p=[0.4, 0.25, 0.2, 0.15]))
    start_time = EPOCH_START + int(rng.integers(0, 28 * 86_400 // interval_s)) * interval_s
    timestamps = (start_time + np.arange(n_samples) * interval_s).astype(np.int64)
    values = _normal_workload(profile, timestamps, interval_s, rng)
    labels, faults = inject_faults(values, rng, interval_s=interval_s, fault_rate=fault_rate,
                                   fault_kinds=fault_kinds)
    series = Series(name or f"synthetic-{profile}-{seed}", timestamps, values.astype(np.float32),
                    DEFAULT_METRICS, labels)
    return series, faults


def generate_fleet(seed: int, n_vms: int, n_samples: int, **options) -> list[Series]:
    """`n_vms` VMs with seeds derived from `seed`; options go to `generate_vm`."""
    seeds = np.random.SeedSequence(seed).generate_state(n_vms)
    return [generate_vm(int(s), n_samples, name=f"synthetic-{seed}-{i:02d}", **options)[0]
            for i, s in enumerate(seeds)]
