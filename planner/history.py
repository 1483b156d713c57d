"""Reading usage history (CSV) for the planner.

Univariate NAB-style files are ``timestamp,value[,label]``; multi-column files (Bitbrains)
name the column to use. Timestamps may be epoch seconds or ISO-8601 / "YYYY-MM-DD HH:MM:SS".
Bad input is a ``HistoryError`` naming the file and the problem: an empty file, a NaN or
non-numeric value, timestamps out of order.

Why not ``vmad.series.read_series``: NAB is scored row by row and one of its files steps
back in time (a clock change), which the shared reader rightly refuses; this reader can
keep file order (``strict_order=False``) and reads one named column of a wide file.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vmad.errors import InputError

__all__ = ["History", "HistoryError", "check_values", "read_columns", "read_history"]


class HistoryError(InputError):
    """A history file or array the planner cannot use; the message says why."""


@dataclass(frozen=True)
class History:
    name: str
    timestamps: np.ndarray  # int64 epoch seconds, strictly increasing
    values: np.ndarray  # float64
    labels: np.ndarray | None  # int8, when the file has a label column


def _epoch(text: str) -> int:
    text = text.strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return int(stamp.timestamp())


def check_values(values: np.ndarray, where: str) -> np.ndarray:
    """Reject what no detector or forecaster can use, with a message naming the place."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise HistoryError(f"{where}: no samples")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise HistoryError(f"{where}: value at row {int(bad[0]) + 1} is {values[bad[0]]}")
    return values


def read_columns(path: str | Path) -> list[str]:
    """The header of a CSV (plain or .gz), to pick a column before reading."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:  # type: ignore[operator]
            return [c.strip() for c in handle.readline().strip().split(",")]
    except OSError as error:
        raise HistoryError(f"{path}: cannot read: {error}") from error


def read_history(
    path: str | Path, column: str = "value", scale: float = 1.0, strict_order: bool = True
) -> History:
    """Read one series; ``scale`` multiplies values (e.g. 1/2**20 for kB -> GB).

    strict_order=False keeps rows in file order even where timestamps step back: NAB
    scores its files row by row and one of them has such a step (a clock change).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise HistoryError(f"{path}: cannot read: {error}") from error
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    reader = csv.reader(io.StringIO(raw.decode()))
    header = next(reader, None)
    if not header:
        raise HistoryError(f"{path}: empty file")
    header = [h.strip() for h in header]
    if "timestamp" not in header or column not in header:
        raise HistoryError(f"{path}: needs columns 'timestamp' and {column!r}, has {header}")
    it, iv = header.index("timestamp"), header.index(column)
    il = header.index("label") if "label" in header else None
    ts, vs, ls = [], [], []
    for row_no, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            ts.append(_epoch(row[it]))
            vs.append(float(row[iv]))
            if il is not None:
                ls.append(int(float(row[il])))
        except (ValueError, IndexError) as error:
            raise HistoryError(f"{path}: line {row_no}: {error}") from error
    if not ts:
        raise HistoryError(f"{path}: no samples")
    timestamps = np.asarray(ts, dtype=np.int64)
    order_bad = np.flatnonzero(np.diff(timestamps) <= 0)
    if order_bad.size and strict_order:
        raise HistoryError(
            f"{path}: timestamps not increasing at line {int(order_bad[0]) + 3}; sort, de-dup"
        )
    values = check_values(np.asarray(vs) * scale, str(path))
    labels = np.asarray(ls, dtype=np.int8) if il is not None else None
    return History(path.name.split(".")[0], timestamps, values, labels)
