"""Rolling-origin backtest of weekly reservations over a fleet, shared by `vmad bench
planning` and `vmad plan`.

Weeks are aligned across the fleet (``origin + k weeks``) so the planner's risk target can
be calibrated on the fleet's own previous weeks (``calibrate_fleet``). For every VM and
every week it has usage in, a method sees only the samples before the week starts and
reserves one size. A VM-week is planned once the VM has ``cold_start_h`` of history.
Gaps never fail: every rule plans from the history that exists (and the VM-week is flagged when that
history ends more than a day before the week).

Per VM-week the backtest keeps the realised outcome of *every* size (samples above it,
unserved and idle area), so scoring any method, at any knob, is array indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vmad.planner import sizing
from vmad.planner.config import PlanningConfig
from vmad.planner.risk_sizing import (
    KNOB,
    WEEK,
    WeekRisk,
    cheapest_knob,
    choose_size,
    conservative_knob,
    mature_h,
    prior_weeks,
    realised_counts,
    week_risk,
)

__all__ = [
    "BASELINES",
    "VM",
    "Calibration",
    "VMBacktest",
    "backtest_vm",
    "bootstrap_ci",
    "calibrate_fleet",
    "from_week",
    "load_fleet",
    "planner_choice",
    "provisioned_totals",
    "totals",
    "without_intervals",
]

KB_PER_GB = 2.0**20


@dataclass
class VM:
    name: str
    timestamps: np.ndarray  # epoch s, sorted
    usage: np.ndarray  # GB
    provisioned: np.ndarray | None = None  # GB, what the trace actually reserved


def load_fleet(
    root: Path, max_gb: float | None = None, limit: int | None = None, column: str = "memory"
) -> list[VM]:
    """Every ``*.csv`` / ``*.csv.gz`` in ``root`` (or the one file ``root``).

    ``column="memory"`` reads Bitbrains' ``mem_usage_kb`` (kB / 2^20 = GB) and
    ``mem_capacity_kb`` when present, else ``value``. ``max_gb`` keeps the VMs whose usage
    fits (the benchmark's population); None keeps all (the planner warns instead).
    """
    from vmad.planner.history import HistoryError, read_columns, read_history

    paths = [root] if root.is_file() else sorted(root.glob("*.csv*"))
    if not paths:
        raise HistoryError(f"{root}: no .csv or .csv.gz files")
    vms = []
    for path in paths:
        header = read_columns(path)
        if column == "memory" and "mem_usage_kb" in header:
            use = read_history(path, column="mem_usage_kb", scale=1 / KB_PER_GB, strict_order=False)
            cap = (
                read_history(path, "mem_capacity_kb", 1 / KB_PER_GB, strict_order=False).values
                if "mem_capacity_kb" in header
                else None
            )
        else:
            name = "value" if column == "memory" else column
            use, cap = read_history(path, column=name, strict_order=False), None
        order = np.argsort(use.timestamps, kind="stable")
        if max_gb is not None and float(use.values.max()) > max_gb:
            continue
        vms.append(
            VM(
                use.name,
                use.timestamps[order],
                use.values[order],
                None if cap is None else cap[order],
            )
        )
        if limit is not None and len(vms) >= limit:
            break
    return vms


def without_intervals(vm: VM, intervals: list[tuple[float, float]]) -> VM:
    """The VM with samples inside operator-excluded intervals removed (not planned for)."""
    if not intervals:
        return vm
    keep = np.ones(vm.timestamps.size, dtype=bool)
    for start, end in intervals:
        keep &= ~((vm.timestamps >= start) & (vm.timestamps <= end))
    cap = None if vm.provisioned is None else vm.provisioned[keep]
    return VM(vm.name, vm.timestamps[keep], vm.usage[keep], cap)


def _before(vm: VM, a: int, start: float, seconds: float) -> np.ndarray:
    """Samples in [start - seconds, start); when that window is empty (a gap), the last
    ``seconds`` of history that exists."""
    if a == 0:
        return vm.usage[:0]
    since = int(np.searchsorted(vm.timestamps, start - seconds))
    if since >= a:
        since = int(np.searchsorted(vm.timestamps, vm.timestamps[a - 1] - seconds))
    return vm.usage[since:a]


def last_week_max(vm: VM, a: int, start: float) -> float:
    return float(_before(vm, a, start, WEEK).max())


def p99_four_weeks(vm: VM, a: int, start: float) -> float:
    return float(np.percentile(_before(vm, a, start, 4 * WEEK), 99.0)) * 1.1


def compute_optimizer(vm: VM, a: int, start: float) -> float:
    """AWS Compute Optimizer's documented defaults for memory: 14-day look-back, 20 %
    headroom; memory has no percentile setting (the threshold is CPU-only), so the peak."""
    return float(_before(vm, a, start, 14 * 86400).max()) * 1.2


# Look-back rules: (vm, index of the week's first sample, week start) -> need in GB.
BASELINES = {
    "last-week-max": last_week_max,
    "p99-4-weeks-x1.1": p99_four_weeks,
    "compute-optimizer": compute_optimizer,
}


@dataclass
class VMBacktest:
    """One VM's planned weeks and the realised outcome of every size in each."""

    name: str
    week: np.ndarray  # fleet week index k of each planned week
    samples: np.ndarray  # (weeks,) samples in the week
    counts: np.ndarray  # (weeks, sizes) samples above each size
    short: np.ndarray  # (weeks, sizes) GB x samples of usage above each size
    usage_area: np.ndarray  # (weeks,) GB x samples used
    choices: np.ndarray  # (weeks, knobs) planner's size index at each knob
    methods: dict[str, np.ndarray]  # baseline -> (weeks,) size index
    est_risk: np.ndarray  # (weeks, knobs) planner's own P(usage > chosen size)
    provisioned: dict[str, np.ndarray] = field(default_factory=dict)  # trace: cap stats
    flags: list[list[str]] = field(default_factory=list)
    risks: list[WeekRisk] = field(default_factory=list)
    # (weeks,) True where the planner's history covered every window its distribution
    # reads (``risk_sizing.mature_h``); None = one stratum (see ``calibrate_fleet``).
    mature: np.ndarray | None = None


def from_week(result: VMBacktest, first: int) -> VMBacktest:
    """The same backtest restricted to fleet weeks >= ``first``."""
    m = result.week >= first
    return VMBacktest(
        result.name,
        result.week[m],
        result.samples[m],
        result.counts[m],
        result.short[m],
        result.usage_area[m],
        result.choices[m],
        {name: v[m] for name, v in result.methods.items()},
        result.est_risk[m],
        {name: v[m] for name, v in result.provisioned.items()},
        [f for f, keep in zip(result.flags, m, strict=True) if keep],
        [r for r, keep in zip(result.risks, m, strict=True) if keep] if result.risks else [],
        None if result.mature is None else result.mature[m],
    )


def backtest_vm(
    vm: VM, origin: float, config: PlanningConfig, keep_risks: bool = False
) -> VMBacktest:
    sizes = np.asarray(config.sizes, dtype=float)
    prices = config.price_table()
    first_k = int(np.floor((vm.timestamps[0] - origin) / WEEK))
    last_k = int(np.floor((vm.timestamps[-1] - origin) / WEEK))
    rows: dict[str, list] = {
        k: []
        for k in ("week", "samples", "counts", "short", "usage", "choices", "est", "cap", "mature")
    }
    full_h = mature_h(config)
    methods: dict[str, list[int]] = {name: [] for name in [*BASELINES, "vpa", "weekly-oracle"]}
    flags: list[list[str]] = []
    risks: list[WeekRisk] = []
    vpa = sizing.VPAMemoryRecommender()
    for k in range(first_k, last_k + 1):
        start = origin + k * WEEK
        a, b = np.searchsorted(vm.timestamps, [start, start + WEEK])
        if b <= a or a == 0:
            continue
        if (start - vm.timestamps[0]) / 3600 < config.cold_start_h:
            continue  # not yet planned: the VM's first weeks are its history
        risk = week_risk(vm.timestamps, vm.usage, start, config)
        assert risk is not None  # a > 0: there is history
        actual = vm.usage[a:b]
        rows["week"].append(k)
        rows["mature"].append(risk.history_h >= full_h)
        rows["samples"].append(actual.size)
        rows["counts"].append(realised_counts(actual, sizes))
        rows["short"].append(np.clip(actual[:, None] - sizes[None, :], 0, None).sum(axis=0))
        rows["usage"].append(float(actual.sum()))
        chosen = np.array([choose_size(risk, prices, j) for j in range(len(KNOB))])
        rows["choices"].append(chosen)
        rows["est"].append(risk.exceed[0][chosen])
        for name, rule in BASELINES.items():
            methods[name].append(sizing.size_index(rule(vm, int(a), start), sizes))
        methods["weekly-oracle"].append(sizing.size_index(float(actual.max()), sizes))
        vpa_size = vpa.recommend(vm.timestamps[:a], vm.usage[:a], start)
        methods["vpa"].append(sizing.size_index(vpa_size, sizes))
        vpa.observe_week(vm.timestamps[a:b], actual, float(sizes[methods["vpa"][-1]]))
        if vm.provisioned is not None:
            cap = vm.provisioned[a:b]
            rows["cap"].append(
                (
                    float(cap.mean()) * prices[-1] / sizes[-1],
                    int((actual > cap).sum()),
                    float(np.clip(actual - cap, 0, None).sum()),
                )
            )
        flags.append(risk.notes)
        if keep_risks:
            risks.append(risk)
    n = len(rows["week"])
    s = sizes.size
    provisioned = {}
    if rows["cap"]:
        cap = np.asarray(rows["cap"])
        provisioned = {"cost": cap[:, 0], "under": cap[:, 1], "short": cap[:, 2]}
    return VMBacktest(
        vm.name,
        np.asarray(rows["week"], dtype=np.int64),
        np.asarray(rows["samples"], dtype=np.int64),
        np.asarray(rows["counts"], dtype=np.int64).reshape(n, s),
        np.asarray(rows["short"], dtype=float).reshape(n, s),
        np.asarray(rows["usage"], dtype=float),
        np.asarray(rows["choices"], dtype=np.int64).reshape(n, len(KNOB)),
        {name: np.asarray(v, dtype=np.int64) for name, v in methods.items()},
        np.asarray(rows["est"], dtype=float).reshape(n, len(KNOB)),
        provisioned,
        flags,
        risks,
        np.asarray(rows["mature"], dtype=bool),
    )


@dataclass
class Calibration:
    """The planner's knob for every planned VM-week, each chosen from earlier weeks only."""

    knobs: list[np.ndarray]  # per VM (results' order): knob per planned week
    next_knobs: np.ndarray  # per VM: knob for weeks after the last calibrated one (the plan)
    fleet: dict[int, tuple[int, float]]  # week -> fleet knob at the target, its past risk


def _records(results: list[VMBacktest]) -> tuple[np.ndarray, ...]:
    """(vm index, week, under (records, knobs), samples, mature) over every planned
    VM-week. ``under`` leaves out usage above the largest size: no knob can cover it."""
    vm, week, under, samples, mature = [], [], [], [], []
    for i, r in enumerate(results):
        reach = r.counts - r.counts[:, -1:]
        under.append(reach[np.arange(r.week.size)[:, None], r.choices].reshape(-1, len(KNOB)))
        vm.append(np.full(r.week.size, i))
        week.append(r.week)
        samples.append(r.samples)
        mature.append(np.ones(r.week.size, dtype=bool) if r.mature is None else r.mature)
    if not results:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, len(KNOB))), empty.astype(float), empty.astype(bool)
    return (
        np.concatenate(vm),
        np.concatenate(week),
        np.concatenate(under).astype(float),
        np.concatenate(samples).astype(float),
        np.concatenate(mature),
    )


def calibrate_fleet(
    results: list[VMBacktest],
    config: PlanningConfig,
    target: float | None = None,
    plan_week: int | None = None,
    pool: list[VMBacktest] | None = None,
    plan_mature: np.ndarray | None = None,
) -> Calibration:
    """The knob for every planned VM-week (and for ``plan_week``, the plan), from the
    planner's own decisions in the weeks before it.

    Week w's knob is calibrated on every VM-week before w (``calibration_weeks`` > 0:
    only that many weeks back): the fleet's pooled realised risk at each knob, and, unless
    ``vm_prior_weeks`` is None, each VM's own realised risk shrunk toward it
    (``risk_sizing.vm_knob``). With no week before w to calibrate on, the conservative
    rule (``cold_start_factor`` x the peak seen). ``pool``: calibrate the fleet part on
    these VMs instead (a split check: the fleet's rates from one half of the VMs, applied
    to the other half with each VM's own record).

    Strata (``calibration_strata``): a decision made with the VM's full history window
    (``risk_sizing.mature_h``: the look-back and the month-back week seen) is calibrated
    on past decisions made the same way, and an earlier one on the earlier ones, while
    the stratum has any past record (else on all). Without this, the misses of the
    fleet's first weeks (a monthly job not yet seen once) hold every later week at a
    knob far safer than the target asks: conformal calibration per category (Mondrian),
    so that the realised risk meets the target in each. ``plan_mature``: per VM, whether
    the plan's week is in the mature stratum (default: yes).
    """
    target = config.target_risk if target is None else target
    vm, week, under, samples, mature = _records(results)
    if pool is None:
        p_vm, p_week, p_under, p_samples, p_mature = vm, week, under, samples, mature
    else:
        p_vm, p_week, p_under, p_samples, p_mature = _records(pool)
    if not config.calibration_strata:
        mature, p_mature = np.ones_like(mature), np.ones_like(p_mature)
    fallback = conservative_knob(1.0)
    knobs = [np.zeros(r.week.size, dtype=np.int64) for r in results]
    n_vms = len(results)
    fleet: dict[int, tuple[int, float]] = {}
    next_knobs = np.full(n_vms, fallback, dtype=np.int64)
    if plan_mature is None or not config.calibration_strata:
        plan_mature = np.ones(n_vms, dtype=bool)
    weeks = {int(k) for k in np.unique(week)}
    if plan_week is not None:
        weeks.add(plan_week)
    for w in sorted(weeks):
        past = week < w
        p_past = p_week < w
        if config.calibration_weeks:
            past &= week >= w - config.calibration_weeks
            p_past &= p_week >= w - config.calibration_weeks
        # Each VM's stratum this week (the plan's week: ``plan_mature``).
        now = np.array(plan_mature, dtype=bool)
        this = week == w
        now[vm[this]] = mature[this]
        chosen = np.full(n_vms, fallback, dtype=np.int64)
        # Per VM: its estimated risk at every knob (nan: nothing to calibrate on).
        curves = np.full((n_vms, len(KNOB)), np.nan)
        n_all = float(p_samples[p_past].sum())
        if n_all > 0:
            rate_all = p_under[p_past].sum(axis=0) / n_all
            n_weeks = max(np.unique(p_week[p_past]).size, 1)
            rates = {}
            for stratum in (False, True):
                # The stratum's pooled rate, shrunk toward every past decision's with a
                # prior worth one fleet week of samples: one week of a new stratum is
                # not trusted alone; with no record of its own, every past decision's.
                p_in = p_past & (p_mature == stratum)
                prior_fleet = n_all / n_weeks
                rates[stratum] = (p_under[p_in].sum(axis=0) + prior_fleet * rate_all) / (
                    float(p_samples[p_in].sum()) + prior_fleet
                )
                if stratum or w not in fleet:
                    f_knob = cheapest_knob(rates[stratum], target)
                    fleet[w] = (f_knob, float(rates[stratum][f_knob]))
            now_rate = np.where(now[:, None], rates[True][None, :], rates[False][None, :])
            if config.vm_prior_weeks is not None:
                # Each VM's misses against what the fleet's rates expected of it in the
                # same weeks (each week at its stratum's rate), shrunk toward 1 with a
                # prior worth ``vm_prior_weeks`` weeks (a Poisson-gamma posterior mean):
                # a VM's record carries over from its early weeks to its mature ones.
                # With one stratum this is the Beta-binomial ``vm_risk``.
                observed = np.zeros((n_vms, len(KNOB)))
                expected = np.zeros((n_vms, len(KNOB)))
                np.add.at(observed, vm[past], under[past])
                past_rate = np.where(mature[past][:, None], rates[True], rates[False])
                np.add.at(expected, vm[past], samples[past][:, None] * past_rate)
                if config.vm_prior_weeks == "auto":
                    # How much a VM's own weeks say beyond the fleet's, from how much
                    # VMs differ in the fleet's own record (empirical Bayes).
                    weeks_worth = prior_weeks(
                        p_vm[p_past], p_under[p_past] / p_samples[p_past, None]
                    )
                else:
                    weeks_worth = np.full(len(KNOB), float(config.vm_prior_weeks))
                prior = weeks_worth * float(np.median(p_samples[p_past])) * rate_all
                tiny = 1e-12
                curves = now_rate * (observed + prior + tiny) / (expected + prior + tiny)
            else:
                curves = now_rate.copy()
        if not float(p_samples[p_past].sum()):
            # Nothing to calibrate on (the fleet's first planned week): the planner's own
            # distribution is the only estimate of its risk, so each VM takes the
            # cheapest knob whose estimated P(usage > size) meets the target.
            for i, r in enumerate(results):
                m = np.flatnonzero(r.week == w)
                if m.size:
                    curves[i] = r.est_risk[m[0]]
        known = ~np.isnan(curves[:, 0])
        for i in np.flatnonzero(known):
            chosen[i] = cheapest_knob(curves[i], target)
        for i, r in enumerate(results):
            knobs[i][r.week == w] = chosen[i]
        if plan_week is not None and w == plan_week:
            next_knobs = chosen
    return Calibration(knobs, next_knobs, fleet)


def planner_choice(result: VMBacktest, knobs: np.ndarray) -> np.ndarray:
    """Size index per planned week, at the knob calibrated for that week."""
    if result.week.size == 0:
        return np.zeros(0, dtype=np.int64)
    return result.choices[np.arange(result.week.size), knobs]


@dataclass
class Totals:
    """Per-VM sums, the unit the bootstrap resamples."""

    cost: np.ndarray
    max_cost: np.ndarray
    under: np.ndarray
    samples: np.ndarray
    short: np.ndarray
    usage: np.ndarray

    def pooled(self, idx: np.ndarray | None = None) -> dict[str, float]:
        take = (lambda x: x) if idx is None else (lambda x: x[idx])
        return {
            "saving": 1.0
            - float(take(self.cost).sum()) / max(float(take(self.max_cost).sum()), 1e-12),
            "under_provisioned_time": float(take(self.under).sum())
            / max(float(take(self.samples).sum()), 1),
            "unserved_demand": float(take(self.short).sum())
            / max(float(take(self.usage).sum()), 1e-12),
        }


def totals(results: list[VMBacktest], choice: list[np.ndarray], prices: np.ndarray) -> Totals:
    """Per-VM sums for one method given its size index per planned week."""
    rows = []
    for r, c in zip(results, choice, strict=True):
        i = np.arange(c.size)
        rows.append(
            (
                float(prices[c].sum()),
                float(prices[-1]) * c.size,
                int(r.counts[i, c].sum()),
                int(r.samples.sum()),
                float(r.short[i, c].sum()),
                float(r.usage_area.sum()),
            )
        )
    cols = np.asarray(rows, dtype=float).reshape(len(rows), 6).T
    return Totals(*cols)


def provisioned_totals(results: list[VMBacktest], prices: np.ndarray) -> Totals | None:
    with_cap = [r for r in results if r.provisioned]
    if not with_cap:
        return None
    rows = [
        (
            float(r.provisioned["cost"].sum()),
            float(prices[-1]) * r.week.size,
            float(r.provisioned["under"].sum()),
            float(r.samples.sum()),
            float(r.provisioned["short"].sum()),
            float(r.usage_area.sum()),
        )
        for r in with_cap
    ]
    return Totals(*np.asarray(rows, dtype=float).T)


def bootstrap_ci(t: Totals, draws: int = 2000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile interval over VMs resampled with replacement (VMs are the unit:
    weeks of one VM are not independent)."""
    n = t.cost.size
    if n == 0:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    saving = 1.0 - t.cost[idx].sum(1) / np.maximum(t.max_cost[idx].sum(1), 1e-12)
    risk = t.under[idx].sum(1) / np.maximum(t.samples[idx].sum(1), 1)
    return {
        "saving": (float(np.percentile(saving, 2.5)), float(np.percentile(saving, 97.5))),
        "under_provisioned_time": (
            float(np.percentile(risk, 2.5)),
            float(np.percentile(risk, 97.5)),
        ),
    }
