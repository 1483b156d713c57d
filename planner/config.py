"""`planner.yaml`: the planner's configuration schema (detectors, planning, prices).

Loaded by the project's one loader (vmad/config.py) and validated with pydantic at
start-up; an unknown key or a wrong type is a ``ConfigError`` naming the key and the
file. deploy/planner.yaml is the documented example, and tests load it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from vmad import config as vmad_config
from vmad.config import ConfigError, StrictModel

__all__ = ["ConfigError", "PlannerConfig", "load_config"]


class LAConfig(StrictModel):
    lower: float | None = Field(None, description="static lower limit; learned if absent")
    upper: float | None = Field(None, description="static upper limit; learned if absent")
    learn: int = Field(288, ge=1, description="samples used to learn a missing limit")
    slack: float = Field(0.1, ge=0, description="learned limits widened by this share of range")


class DLAConfig(StrictModel):
    window: int = Field(288, ge=3, description="moving-median length in samples")
    tolerance: float = Field(4.0, gt=0, description="band half-width in robust std devs")


class WHAConfig(StrictModel):
    window: int = Field(288, ge=5)
    half_life: float = Field(144.0, gt=0, description="age in samples at which weight halves")
    tolerance: float = Field(4.0, gt=0)
    weights: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="median, kalman, savgol"
    )
    sg_window: int = Field(13, ge=3)
    sg_order: int = Field(2, ge=0)
    kalman_q: float = Field(0.05, gt=0)
    threshold: float = Field(0.5, gt=0, le=1)

    def model_post_init(self, _context: object) -> None:
        if any(not 0.0 <= w <= 1.0 for w in self.weights):
            raise ValueError(f"wha.weights must each be in [0, 1], got {self.weights}")


class LikelihoodConfig(StrictModel):
    """The first NAB detector (`vmad detect --detector wha-likelihood`): WHA with
    these window settings, its raw score turned into an anomaly likelihood."""

    window: int = Field(864, ge=5, description="WHA window (samples; 864 = 3 days at 5 min)")
    half_life: float = Field(432.0, gt=0, description="WHA half-life (samples)")
    tolerance: float = Field(1.0, gt=0, description="WHA tolerance (robust std devs)")
    learn: int = Field(288, ge=1, description="samples before the first judgement")
    history: int = Field(2016, ge=10, description="reference window of short averages")
    short: int = Field(10, ge=1, description="samples in the short average")
    min_std: float = Field(0.03, gt=0, description="floor of the reference spread")


class AlarmConfig(StrictModel):
    """`vmad detect --detector wha-alarm` and the NAB detector: WHA (these window
    settings; the rest from `wha`) -> HTM's anomaly likelihood (nupic's defaults for
    5-minute data) + new extremes + a rest after each alarm (planner/likelihood.py)."""

    window: int = Field(288, ge=5, description="WHA window (samples; 288 = 1 day at 5 min)")
    half_life: float = Field(144.0, gt=0, description="WHA half-life (samples)")
    tolerance: float = Field(4.0, gt=0, description="WHA tolerance (robust std devs)")
    learn: int = Field(288, ge=0, description="raw scores left out of the reference")
    estimation: int = Field(100, ge=1, description="more samples before the first score")
    history: int = Field(8640, ge=10, description="reference of short averages (30 days)")
    short: int = Field(10, ge=1, description="raw scores in the short average")
    reestimate: int = Field(100, ge=1, description="samples between fits of the reference")
    min_mean: float = Field(0.03, ge=0, description="floor of the reference mean")
    min_var: float = Field(0.0003, gt=0, description="floor of the reference variance")
    novelty: float = Field(
        0.05, ge=0, description="beyond the history's range by this share of it = score 1"
    )
    rest: int = Field(150, ge=0, description="samples reporting 0 after an alarm")
    threshold: float = Field(0.5, gt=0, le=1, description="alarm at or above (0.5: L=1-1e-5)")


class RecurrenceConfig(StrictModel):
    periods_h: tuple[float, ...] = Field((24.0, 168.0, 672.0), description="periods watched, hours")
    find_periods: bool = Field(True, description="also watch autocorrelation peaks in the history")
    slack: int = Field(1, ge=0, description="samples a repeat may drift")
    decay: float = Field(0.5, gt=0, lt=1, description="confidence kept per missed repeat")


class ExcludeInterval(StrictModel):
    """Usage an operator says not to plan for (a one-off migration, a runaway job)."""

    vm: str = Field("*", description="VM name (file name without .csv/.csv.gz); * = every VM")
    start: datetime = Field(description="UTC start, e.g. 2013-08-01T00:00:00Z")
    end: datetime = Field(description="UTC end")
    reason: str = ""

    def model_post_init(self, _context: object) -> None:
        if self.end <= self.start:
            raise ValueError(f"exclude: end {self.end} is not after start {self.start}")


class PlanningConfig(StrictModel):
    sizes: tuple[float, ...] = Field((1, 2, 4, 8, 16), description="reservation sizes (GB)")
    prices: tuple[float, ...] | None = Field(
        None, description="price per week per size; default = size"
    )
    target_risk: float = Field(
        0.001, gt=0, lt=1, description="share of time under-provisioned the operator accepts"
    )
    horizon_weeks: int = Field(4, ge=1, le=12, description="weeks planned ahead")
    lookback_h: int = Field(24 * 28, ge=24, description="history the usage distribution uses")
    half_life_h: float = Field(168.0, gt=0, description="age at which a sample weighs half")
    calibration_weeks: int = Field(
        0,
        ge=0,
        description="fleet weeks the risk target is calibrated on; 0 = every week before",
    )
    vm_prior_weeks: float | Literal["auto"] | None = Field(
        "auto",
        description="per-VM calibration: the fleet's risk weighs as this many weeks of the "
        "VM's own; auto = read from how much the fleet's VMs differ (empirical Bayes); "
        "null = one fleet-wide knob",
    )
    calibration_strata: bool = Field(
        True,
        description="calibrate decisions made with the full history window (look-back and "
        "month-back week seen) apart from earlier ones",
    )
    trend_guard: bool = Field(True, description="project a significant upward trend")
    month_guard: bool = Field(True, description="cover the same week a month back")
    cold_start_h: int = Field(168, ge=0, description="less history than this = cold start")
    cold_start_factor: float = Field(
        1.5, ge=1, description="cold start: reserve this times the peak seen"
    )
    exclude: tuple[ExcludeInterval, ...] = Field(
        (), description="intervals not to plan for (also: vmad plan --exclude-labels)"
    )

    def model_post_init(self, _context: object) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"planning.sizes must be positive, got {self.sizes}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"planning.sizes must be increasing, got {self.sizes}")
        if self.prices is not None and len(self.prices) != len(self.sizes):
            raise ValueError(
                f"planning.prices has {len(self.prices)} entries for {len(self.sizes)} sizes"
            )

    def price_table(self) -> np.ndarray:
        return np.asarray(self.prices if self.prices is not None else self.sizes, dtype=float)


class PlannerConfig(StrictModel):
    la: LAConfig = LAConfig()
    dla: DLAConfig = DLAConfig()
    wha: WHAConfig = WHAConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    alarm: AlarmConfig = AlarmConfig()
    recurrence: RecurrenceConfig = RecurrenceConfig()
    planning: PlanningConfig = PlanningConfig()


def load_config(path: str | Path | None) -> PlannerConfig:
    """Read and validate a YAML file with the project's one loader (vmad/config.py:
    ``${ENV}`` substitution, errors naming file and key); None gives the defaults."""
    if path is None:
        return PlannerConfig()
    return vmad_config.load_config(path, PlannerConfig)
