"""`vmad plan`: filter one VM's history, forecast, reserve a size per period, report.

Writes the plan as CSV (period_start, period_end, forecast_peak, reserved, price) and,
when asked, an HTML report with the plots embedded as base64 PNG so it is one file a
person can open or mail.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vmad.planner.config import PlannerConfig

__all__ = ["Plan", "make_plan", "parse_duration_h", "plan_command"]

KB_PER_GB = 2.0**20


def parse_duration_h(text: str) -> int:
    """'7d' -> 168, '12h' -> 12, '2w' -> 336."""
    match = re.fullmatch(r"\s*(\d+)\s*([hdw])\s*", text)
    if not match:
        raise ValueError(f"duration {text!r}: use a number and h, d or w (e.g. 7d)")
    return int(match.group(1)) * {"h": 1, "d": 24, "w": 168}[match.group(2)]


@dataclass
class Plan:
    first_hour: int  # epoch hour of peaks[0]
    peaks: np.ndarray  # hourly peaks of the history
    point: np.ndarray
    recurrent: np.ndarray
    forecast: np.ndarray  # hourly, from the end of the history
    period_h: int
    needs: list[float]
    sizes: list[float]
    prices: list[float]


def make_plan(
    timestamps: np.ndarray,
    values: np.ndarray,
    config: PlannerConfig,
    filter_name: str = "wha",
    forecaster: str = "lstm",
    period_h: int = 168,
    horizon_h: int = 672,
    margin: float = 0.1,
    epochs: int = 30,
) -> Plan:
    from vmad.planner.filtering import filter_history, hourly_peaks
    from vmad.planner.forecast import LSTMForecaster, seasonal_naive
    from vmad.planner.sizing import smallest_covering

    first_hour, peaks = hourly_peaks(timestamps, values)
    if peaks.size < 96:
        raise ValueError(f"history covers {peaks.size} hours; planning needs at least 96")
    filtered = filter_history(peaks, filter_name, config)
    horizon = int(np.ceil(horizon_h / period_h)) * period_h
    if forecaster == "seasonal":
        fc = seasonal_naive(filtered.cleaned, horizon)
    else:
        since = max(0, peaks.size - config.planning.lookback_h)
        model = LSTMForecaster(epochs=epochs).fit(
            filtered.cleaned[since:], hour0=first_hour + since
        )
        fc = np.clip(model.forecast(filtered.cleaned, horizon, hour0=first_hour), 0, None)
    sizes = [float(s) for s in config.planning.sizes]
    table = dict(zip(sizes, config.planning.prices or sizes, strict=True))
    needs = [float(fc[k : k + period_h].max()) for k in range(0, horizon, period_h)]
    chosen = [smallest_covering(n * (1 + margin), tuple(sizes)) for n in needs]
    return Plan(
        first_hour,
        peaks,
        filtered.point,
        filtered.recurrent,
        fc,
        period_h,
        needs,
        chosen,
        [table[s] for s in chosen],
    )


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def write_report(plan: Plan, path: Path, title: str, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(hours: np.ndarray) -> list[datetime]:
        return [datetime.fromtimestamp(int(h) * 3600, UTC) for h in hours]

    h = plan.first_hour + np.arange(plan.peaks.size)
    f = h[-1] + 1 + np.arange(plan.forecast.size)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(when(h), plan.peaks, lw=0.7, color="tab:blue", label="history (hourly peak)")
    ax.plot(
        when(h[plan.point]),
        plan.peaks[plan.point],
        "x",
        color="red",
        label="point anomaly (removed)",
    )
    ax.plot(
        when(h[plan.recurrent]),
        plan.peaks[plan.recurrent],
        "o",
        mfc="none",
        color="orange",
        label="recurrent anomaly (kept)",
    )
    ax.plot(when(f), plan.forecast, lw=0.9, color="tab:green", label="forecast")
    steps = np.repeat(plan.sizes, plan.period_h)
    ax.step(when(f), steps, where="post", color="black", lw=1.5, label="reservation")
    ax.set_ylabel(unit)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = _png(fig)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{when(np.array([f[0] + k * plan.period_h]))[0]:%Y-%m-%d %H:%M}</td>"
        f"<td>{n:.3f}</td><td>{s:g}</td><td>{p:g}</td></tr>"
        for k, (n, s, p) in enumerate(zip(plan.needs, plan.sizes, plan.prices, strict=True))
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1150px;margin:auto}"
        "td,th{padding:2px 10px;text-align:right}</style></head><body>"
        f"<h1>Reservation plan: {html.escape(title)}</h1>"
        f"<p>{int(plan.point.sum())} point anomalies removed, {int(plan.recurrent.sum())} "
        "recurrent samples kept before forecasting.</p>"
        f"<img alt='history, forecast and reservation' src='data:image/png;base64,{image}'>"
        "<table><tr><th>period start (UTC)</th><th>forecast peak</th><th>reserved</th>"
        f"<th>price</th></tr>{rows}</table><p>Total price: {sum(plan.prices):g}</p>"
        "</body></html>"
    )


def plan_command(args: argparse.Namespace) -> int:
    from vmad.errors import UsageError
    from vmad.planner.config import ConfigError, load_config
    from vmad.planner.history import HistoryError, read_columns, read_history

    try:
        config = load_config(args.config)
        sizes = tuple(float(s) for s in args.sizes.split(","))
        config = config.model_copy(
            update={"planning": config.planning.model_copy(update={"sizes": sizes, "prices": None})}
        )
        period_h, horizon_h = parse_duration_h(args.period), parse_duration_h(args.horizon)
        if args.metric == "memory" and "mem_usage_kb" in read_columns(args.history):
            hist = read_history(args.history, column="mem_usage_kb", scale=1 / KB_PER_GB)
        else:
            hist = read_history(
                args.history, column="value" if args.metric == "memory" else args.metric
            )
        margin = config.planning.margin if args.margin is None else args.margin
        plan = make_plan(
            hist.timestamps,
            hist.values,
            config,
            args.filter,
            args.forecaster,
            period_h,
            horizon_h,
            margin,
        )
    except (ConfigError, HistoryError, ValueError, OSError) as error:
        raise UsageError(str(error)) from error
    start = (plan.first_hour + plan.peaks.size) * 3600
    with args.out.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["period_start", "period_end", "forecast_peak", "reserved", "price"])
        for k, (n, s, p) in enumerate(zip(plan.needs, plan.sizes, plan.prices, strict=True)):
            a = datetime.fromtimestamp(start + k * period_h * 3600, UTC)
            b = datetime.fromtimestamp(start + (k + 1) * period_h * 3600, UTC)
            writer.writerow([a.isoformat(), b.isoformat(), f"{n:.4f}", f"{s:g}", f"{p:g}"])
    reserved = ", ".join(f"{s:g}" for s in plan.sizes)
    print(f"{len(plan.sizes)} periods: reserve {reserved} -> {args.out}")
    if args.report:
        unit = "GB" if args.metric == "memory" else args.metric
        write_report(plan, args.report, hist.name, unit)
        print(f"report -> {args.report}")
    return 0
