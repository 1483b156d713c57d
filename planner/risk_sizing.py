"""Sizing from the usage distribution at a chosen risk.

For one VM and one week: estimate ``P(usage > size)`` for every size from the raw samples
seen before the week, then reserve the size that minimises
``price(size) / price(largest) + lambda * P(usage > size)``.

Where P comes from (all from raw usage; nothing is smoothed or filtered away):
- recent: the last ``lookback_h`` of samples, each weighted ``0.5 ** (age / half_life)``;
- trend guard: when the Theil-Sen slope of daily peaks is significantly positive (its
  90 % interval above 0), last week's samples moved forward along that slope to the end of
  the planned week;
- month guard: the same week four weeks back, unweighted (a monthly job seen once);
and P is the largest of the three, so a guard can only make the plan safer.

The operator's knob is one ordered list of settings from cheap to safe: lambda rising over
a log grid, then "no exceedance seen at all" with a growing headroom (usage x 1.05 ... x 2)
for targets below what the history itself supports. ``calibrate`` maps a target risk
(share of time under-provisioned) to the cheapest knob setting whose backtested risk meets
it; the backtest is the fleet's own past weeks (conformal in spirit: the errors of the
planner's own past choices set its margin). ``vm_knob`` does the same per VM: a VM's own
past weeks, shrunk toward the fleet's (a VM with one calm week is not trusted alone; one
with months of calm weeks is), so steady VMs get cheaper sizes and volatile ones safer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vmad.planner.config import PlanningConfig

__all__ = [
    "HEADROOMS",
    "KNOB",
    "WeekRisk",
    "calibrate",
    "cheapest_knob",
    "choose_size",
    "conservative_knob",
    "exceedance",
    "mature_h",
    "prior_weeks",
    "realised_counts",
    "vm_knob",
    "vm_risk",
    "week_risk",
]

HOUR = 3600
DAY = 24 * HOUR
WEEK = 7 * DAY

LAMBDAS = tuple(float(x) for x in np.logspace(0, 6, 49))
HEADROOMS = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0)
# Knob settings from cheapest to safest: (lambda, index into HEADROOMS).
KNOB: tuple[tuple[float, int], ...] = tuple((lam, 0) for lam in LAMBDAS) + tuple(
    (np.inf, k) for k in range(len(HEADROOMS))
)


@dataclass
class WeekRisk:
    """What the planner knows about one VM before one week starts."""

    exceed: np.ndarray  # (len(HEADROOMS), n sizes): P(usage x headroom > size)
    history_h: float  # hours between the first sample and the week start
    cold: bool  # less than cold_start_h of history: the conservative rule applies
    cold_size_index: int  # the size the cold-start rule reserves (when cold)
    stale_h: float  # hours between the last sample and the week start (a gap)
    growth_gb_week: float  # trend-guard slope in force (0 when the guard is off)
    month_peak: float  # peak of the same week a month back (nan when not seen)
    peak: float  # highest usage the distribution allows (trend-projected included)
    notes: list[str] = field(default_factory=list)

    @property
    def capped(self) -> bool:
        """Usage above the largest size is likely: reserving it is a cap, said aloud."""
        return bool(self.exceed[0, -1] > 0.0)


def exceedance(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Weighted share of ``values`` above each threshold."""
    total = float(weights.sum())
    if values.size == 0 or total <= 0:
        return np.zeros(thresholds.size)
    order = np.argsort(values)
    v, w = values[order], weights[order]
    tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])
    return tail[np.searchsorted(v, thresholds, side="right")] / total


def _daily_peaks(ts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    days = ts // DAY
    uniq, inverse = np.unique(days, return_inverse=True)
    peaks = np.full(uniq.size, -np.inf)
    np.maximum.at(peaks, inverse, values)
    return uniq.astype(float), peaks


def _growth_per_s(ts: np.ndarray, values: np.ndarray) -> float:
    """Theil-Sen slope of daily peaks (GB/s) when significantly positive, else 0."""
    from scipy.stats import theilslopes

    days, peaks = _daily_peaks(ts, values)
    if days.size < 7:
        return 0.0
    slope, _, low, _ = theilslopes(peaks, days, alpha=0.90)
    return float(slope) / DAY if low > 0 else 0.0


def week_risk(
    ts: np.ndarray,
    usage: np.ndarray,
    start: float,
    config: PlanningConfig,
    ahead: int = 0,
) -> WeekRisk | None:
    """P(usage > size) for the week starting ``start + ahead weeks``, from samples before
    ``start``. None when the VM has no sample before ``start``.

    ``ts``/``usage`` are the VM's samples (sorted, excluded intervals already removed).
    Gaps never fail: with no sample in the look-back window the distribution comes from
    the last ``lookback_h`` of history that exists, and ``stale_h`` says how old it is.
    """
    sizes = np.asarray(config.sizes, dtype=float)
    end = int(np.searchsorted(ts, start, side="left"))
    if end == 0:
        return None
    t_last = float(ts[end - 1])
    stale_h = (start - t_last) / HOUR
    lookback = config.lookback_h * HOUR
    anchor = start if stale_h * HOUR < lookback else t_last + 1.0
    begin = int(np.searchsorted(ts, anchor - lookback, side="left"))
    t, x = ts[begin:end].astype(float), usage[begin:end]
    history_h = (start - float(ts[0])) / HOUR
    notes: list[str] = []
    if stale_h >= 24:
        notes.append(f"history ends {stale_h / 24:.1f} days before the week; planned from it")
    week_start = start + ahead * WEEK
    week_end = week_start + WEEK

    if history_h < config.cold_start_h:
        peak = float(usage[:end].max()) * config.cold_start_factor
        index = int(np.searchsorted(sizes, peak, side="left"))
        exceed = np.zeros((len(HEADROOMS), sizes.size))
        exceed[:, :] = (peak > sizes)[None, :].astype(float)
        return WeekRisk(
            exceed,
            history_h,
            True,
            min(index, sizes.size - 1),
            stale_h,
            0.0,
            np.nan,
            peak,
            [
                *notes,
                f"cold start: {history_h / 24:.1f} days of history, "
                f"{config.cold_start_factor:g} x the peak seen",
            ],
        )

    weights = 0.5 ** ((anchor - t) / (config.half_life_h * HOUR))
    scaled = sizes[None, :] / np.asarray(HEADROOMS)[:, None]
    exceed = np.stack([exceedance(x, weights, row) for row in scaled])
    peak = float(x.max())

    growth = 0.0
    if config.trend_guard:
        growth = _growth_per_s(t, x)
        if growth > 0:
            # The whole recent distribution (same weights), each sample moved along the
            # slope to the same time of the planned week: the trend is added to every
            # quantile, not to a peak, and a one-off excursion keeps the small weight it
            # had instead of being replayed at a full week's share.
            weeks_ahead = np.ceil((week_start - t) / WEEK)
            projected = x + growth * WEEK * weeks_ahead
            exceed = np.maximum(
                exceed, np.stack([exceedance(projected, weights, r) for r in scaled])
            )
            peak = max(peak, float(projected.max()))
            notes.append(f"growth {growth * WEEK:+.2f} GB/week projected")

    month_peak = np.nan
    if config.month_guard:
        lo, hi = week_start - 4 * WEEK, week_end - 4 * WEEK
        a, b = np.searchsorted(ts, [lo, min(hi, start)], side="left")
        if b > a:
            back = usage[a:b]
            month_peak = float(back.max())
            ones = np.ones(back.size)
            exceed = np.maximum(exceed, np.stack([exceedance(back, ones, r) for r in scaled]))
    return WeekRisk(exceed, history_h, False, -1, stale_h, growth * WEEK, month_peak, peak, notes)


def mature_h(config: PlanningConfig) -> float:
    """History (hours) after which the distribution reads every window it can: the whole
    look-back and, with the month guard, the same week a month back. Decisions made
    before that see less (a monthly job met for the first time is not foreseeable), so
    their realised risk says little about decisions made after it: the calibration keeps
    the two apart (``backtest.calibrate_fleet``)."""
    return float(max(config.lookback_h, 4 * WEEK / HOUR if config.month_guard else 0.0))


def choose_size(risk: WeekRisk, prices: np.ndarray, knob: int) -> int:
    """Index of the size to reserve at one knob setting."""
    if risk.cold:
        return risk.cold_size_index
    if risk.capped:  # no size covers it: the largest, with the warning (never a quiet cap)
        return risk.exceed.shape[1] - 1
    lam, h = KNOB[knob]
    p = risk.exceed[h]
    if np.isinf(lam):  # the smallest size with the least exceedance seen
        return int(np.flatnonzero(p <= p.min())[0])
    return int(np.argmin(prices / prices[-1] + lam * p))


def realised_counts(actual: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Samples above each size (the realised risk of every possible choice)."""
    return (actual[:, None] > sizes[None, :]).sum(axis=0)


def calibrate(
    choices: np.ndarray, counts: np.ndarray, samples: np.ndarray, target: float
) -> tuple[int, float]:
    """The cheapest knob whose pooled realised risk is at most ``target``.

    choices: (records, knobs) size index chosen at each knob; counts: (records, sizes)
    samples above each size; samples: (records,). Returns (knob, its realised risk, not
    counting usage above the largest size); with
    no records the safest knob, with risk nan. Cold-start records choose the same size
    at every knob, so they shift every knob's risk alike and never pick one.
    """
    if choices.shape[0] == 0 or samples.sum() == 0:
        return len(KNOB) - 1, float("nan")
    rows = np.arange(choices.shape[0])[:, None]
    # Usage above the largest size is missed at every setting (a capped VM, warned about
    # on its own); it must not push the whole fleet to the safest setting.
    reachable = counts - counts[:, -1:]
    risk = reachable[rows, choices].sum(axis=0) / samples.sum()
    knob = cheapest_knob(risk, target)
    return knob, float(risk[knob])


def cheapest_knob(risk: np.ndarray, target: float) -> int:
    """The first (cheapest) knob whose estimated `risk` is at most `target`; the safest
    when none is (the history says the target is out of reach)."""
    ok = np.flatnonzero(risk <= target)
    return int(ok[0]) if ok.size else len(KNOB) - 1


def conservative_knob(factor: float) -> int:
    """The knob used while there is nothing to calibrate on (the fleet's first planned
    week): cover every sample seen x the cold-start factor, the same rule as a cold start."""
    for j, (lam, h) in enumerate(KNOB):
        if np.isinf(lam) and HEADROOMS[h] >= factor:
            return j
    return len(KNOB) - 1


def vm_risk(
    vm_under: np.ndarray,
    vm_samples: np.ndarray,
    fleet_under: np.ndarray,
    fleet_samples: float,
    prior_samples: float,
) -> np.ndarray:
    """Each VM's risk at every knob, from its own past weeks shrunk toward the fleet's.

    ``vm_under``: (VMs, knobs) samples above the size each knob chose in past weeks
    (usage above the largest size left out); ``vm_samples``: (VMs,) samples in those
    weeks. The estimate is ``(vm_under + prior * fleet_rate) / (vm_samples + prior)``:
    the fleet's rate as a prior worth ``prior_samples`` samples, so the VM's own record
    decides once it is long, and the fleet's while it is short (a Beta-binomial
    posterior mean).
    """
    rate = fleet_under / fleet_samples
    return (vm_under + prior_samples * rate) / (np.asarray(vm_samples)[..., None] + prior_samples)


def vm_knob(
    vm_under: np.ndarray,
    vm_samples: float,
    fleet_under: np.ndarray,
    fleet_samples: float,
    target: float,
    prior_samples: float,
) -> int:
    """The cheapest knob whose risk, from the VM's own past weeks shrunk toward the
    fleet's (``vm_risk``), is at most ``target``; the safest when none is."""
    risk = vm_risk(
        vm_under[None, :], np.array([vm_samples]), fleet_under, fleet_samples, prior_samples
    )[0]
    return cheapest_knob(risk, target)


# A prior worth more weeks than this is the fleet's rate alone (VMs do not differ).
MAX_PRIOR_WEEKS = 1e6


def prior_weeks(vm_ids: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Per knob, how many weeks of a VM's own record weigh as much as the fleet's rate:
    ``sigma^2 / tau^2`` of a one-way random-effects model of weekly miss rates (method of
    moments). ``vm_ids``: (records,) VM of each past VM-week; ``rates``: (records, knobs)
    its share of samples missed at each knob. sigma^2 is the week-to-week variance within
    a VM, tau^2 the variance of the VMs' own means beyond what sigma^2 explains. VMs that
    differ little (tau^2 ~ 0) get the fleet's rate; VMs that differ much, their own record
    after a week or two. The amount of shrinkage is read from the fleet, not set.
    """
    knobs = rates.shape[1]
    groups, inverse = np.unique(vm_ids, return_inverse=True)
    g, n = groups.size, rates.shape[0]
    if g < 2 or n <= g:
        return np.full(knobs, MAX_PRIOR_WEEKS)
    counts = np.bincount(inverse, minlength=g).astype(float)
    means = np.zeros((g, knobs))
    np.add.at(means, inverse, rates)
    means /= counts[:, None]
    grand = rates.mean(axis=0)
    within = ((rates - means[inverse]) ** 2).sum(axis=0) / (n - g)
    between = (counts[:, None] * (means - grand) ** 2).sum(axis=0) / (g - 1)
    n0 = (n - float((counts**2).sum()) / n) / (g - 1)
    tau2 = (between - within) / n0
    with np.errstate(divide="ignore", invalid="ignore"):
        weeks = np.where(tau2 > 0, within / np.where(tau2 > 0, tau2, 1.0), MAX_PRIOR_WEEKS)
    return np.clip(weeks, 0.0, MAX_PRIOR_WEEKS)
