"""Multivariate monitoring series and the shared CSV format.

A file is `timestamp,<metric>...[,label]`, plain or gzip (`.gz`), one header row.
Timestamps are epoch seconds or ISO-8601 (`2024-01-17T10:54:00Z`, `2014-02-14 14:30:00`);
labels are 0 or 1. A series folder holds `train.csv[.gz]` (labels optional) and
`test.csv[.gz]` (labelled), as in `../shared/datasets/smd/`.

Bad input raises `SeriesFormatError` naming file, line (1-based, the header is line 1)
and column. The one documented repair: a run of at most `max_fill` missing cells
(empty, `nan`) in a metric column is forward-filled from the sample before it; a longer
run, or a missing first value, is an error. NumPy only, and no component imported: every
layer (agent, trainer, planner) may read series with it.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from vmad.errors import InputError
from vmad.evaluation import events

_FLOAT32_MAX = float(np.finfo(np.float32).max)  # series hold float32

__all__ = [
    "DEFAULT_MAX_FILL",
    "Series",
    "SeriesFormatError",
    "list_series_folders",
    "read_series",
    "read_series_folder",
    "write_series",
]

# A few lost samples are a scrape hiccup; more than this is a gap no repair should hide.
DEFAULT_MAX_FILL = 3
MISSING = {"", "nan", "NaN", "NAN", "null", "NULL", "NA"}


class SeriesFormatError(InputError):
    """A series file that cannot be read as it stands; names where and why."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None,
                 column: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Series:
    """`values[N, M]` float32 samples of `metrics` at `timestamps[N]` (int64 epoch
    seconds, strictly increasing), with optional `labels[N]` (int8, 1 = anomalous)."""

    name: str
    timestamps: np.ndarray
    values: np.ndarray
    metrics: tuple[str, ...]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.timestamps)
        if self.values.ndim != 2 or self.values.shape != (n, len(self.metrics)):
            raise ValueError(f"series {self.name}: values shape {self.values.shape} does not "
                             f"match {n} timestamps x {len(self.metrics)} metrics")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"series {self.name}: {len(self.labels)} labels for {n} samples")

    def __len__(self) -> int:
        return len(self.timestamps)

    def select(self, metrics: Sequence[str]) -> Series:
        """The same series with only `metrics`, in that order."""
        metrics = tuple(metrics)
        missing = [m for m in metrics if m not in self.metrics]
        if missing:
            raise ValueError(f"series {self.name} lacks metrics {missing}; it has "
                             f"{list(self.metrics)}")
        columns = [self.metrics.index(m) for m in metrics]
        return Series(self.name, self.timestamps, self.values[:, columns], metrics, self.labels)

    def slice(self, start: int, stop: int | None = None) -> Series:
        """Samples [start, stop)."""
        part = slice(start, stop)
        labels = None if self.labels is None else self.labels[part]
        return Series(self.name, self.timestamps[part], self.values[part], self.metrics, labels)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parse_timestamps(path: Path, cells: list[str]) -> np.ndarray:
    try:
        return np.array([int(float(c)) for c in cells], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    out = np.empty(len(cells), dtype=np.int64)
    for row, text in enumerate(cells):
        try:
            stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                out[row] = int(float(text))
                continue
            except (ValueError, OverflowError):
                raise SeriesFormatError(path, f"timestamp {text!r} is neither epoch seconds "
                                        "nor ISO-8601", line=row + 2, column="timestamp") from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        out[row] = int(stamp.timestamp())
    return out


def _parse_column(path: Path, name: str, cells: list[str], max_fill: int) -> np.ndarray:
    values = np.empty(len(cells), dtype=np.float64)
    missing = np.zeros(len(cells), dtype=bool)
    for row, text in enumerate(cells):
        text = text.strip()
        if text in MISSING:
            missing[row] = True
            continue
        try:
            values[row] = float(text)
        except ValueError:
            raise SeriesFormatError(path, f"{text!r} is not a number", line=row + 2,
                                    column=name) from None
        if not np.isfinite(values[row]):
            missing[row] = True
    if missing.any():
        _forward_fill(path, name, values, missing, max_fill)
    return values


def _forward_fill(path: Path, name: str, values: np.ndarray, missing: np.ndarray,
                  max_fill: int) -> None:
    for start, stop in events(missing):
        if start == 0:
            raise SeriesFormatError(path, "the first value is missing (nothing to fill from)",
                                    line=2, column=name)
        if stop - start > max_fill:
            raise SeriesFormatError(
                path, f"{stop - start} missing values in a row (lines {start + 2}-{stop + 1}); "
                f"at most {max_fill} are forward-filled", line=start + 2, column=name)
        values[start:stop] = values[start - 1]


def read_series(
    path: str | Path,
    required_metrics: Sequence[str] | None = None,
    *,
    max_fill: int = DEFAULT_MAX_FILL,
    name: str | None = None,
    allow_negative: bool = False,
) -> Series:
    """Read one CSV (see the module docstring for the format and the errors)."""
    path = Path(path)
    try:
        with _open_text(path) as handle:
            rows = list(csv.reader(handle))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error) as error:
        # A corrupt .gz raises zlib.error (bad data) or EOFError (truncated).
        raise SeriesFormatError(path, f"cannot read: {error}") from error
    if not rows or not rows[0]:
        raise SeriesFormatError(path, "empty file (a header row is required)", line=1)
    header = [c.strip() for c in rows[0]]
    if header[0] != "timestamp":
        raise SeriesFormatError(path, f"the first column must be 'timestamp', got {header[0]!r}",
                                line=1, column=header[0])
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise SeriesFormatError(path, f"duplicate column names {duplicated}", line=1)
    has_labels = header[-1] == "label"
    metrics = tuple(header[1:-1] if has_labels else header[1:])
    if not metrics:
        raise SeriesFormatError(path, "no metric columns after 'timestamp'", line=1)
    if required_metrics is not None:
        absent = [m for m in required_metrics if m not in metrics]
        if absent:
            raise SeriesFormatError(path, f"missing columns {absent}; the file has "
                                    f"{list(metrics)}", line=1)
    body = rows[1:]
    while body and not any(c.strip() for c in body[-1]):
        body.pop()  # trailing blank lines
    if not body:
        raise SeriesFormatError(path, "no data rows after the header", line=2)
    for row, cells in enumerate(body):
        if len(cells) != len(header):
            raise SeriesFormatError(path, f"{len(cells)} cells, the header has {len(header)}",
                                    line=row + 2)
    columns = list(zip(*body, strict=True))
    timestamps = _parse_timestamps(path, list(columns[0]))
    steps = np.diff(timestamps)
    if (steps <= 0).any():
        row = int(np.flatnonzero(steps <= 0)[0]) + 1
        kind = "duplicate" if steps[row - 1] == 0 else "out-of-order"
        raise SeriesFormatError(path, f"{kind} timestamp {columns[0][row]!r} (timestamps must "
                                "strictly increase)", line=row + 2, column="timestamp")
    values = np.empty((len(body), len(metrics)), dtype=np.float64)
    for j, metric in enumerate(metrics):
        values[:, j] = _parse_column(path, metric, list(columns[j + 1]), max_fill)
        too_big = np.abs(values[:, j]) > _FLOAT32_MAX  # would be stored as infinity
        if too_big.any():
            row = int(np.flatnonzero(too_big)[0])
            raise SeriesFormatError(path, f"value {values[row, j]} is out of range (at most "
                                    f"{_FLOAT32_MAX:.3g})", line=row + 2, column=metric)
        if not allow_negative and (values[:, j] < 0).any():
            row = int(np.flatnonzero(values[:, j] < 0)[0])
            raise SeriesFormatError(path, f"negative value {values[row, j]} (usage metrics are "
                                    ">= 0)", line=row + 2, column=metric)
    labels = None
    if has_labels:
        labels = _parse_labels(path, list(columns[-1]))
    return Series(name or _series_name(path), timestamps, values.astype(np.float32), metrics,
                  labels)


def _parse_labels(path: Path, cells: list[str]) -> np.ndarray:
    labels = np.empty(len(cells), dtype=np.int8)
    for row, text in enumerate(cells):
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value not in (0.0, 1.0):
            raise SeriesFormatError(path, f"label {text!r} is not 0 or 1", line=row + 2,
                                    column="label")
        labels[row] = int(value)
    return labels


def _series_name(path: Path) -> str:
    stem = path.name.removesuffix(".gz").removesuffix(".csv")
    return f"{path.parent.name}/{stem}" if stem in ("train", "test") else stem


def _part(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.csv.gz", folder / f"{stem}.csv"):
        if candidate.is_file():
            return candidate
    raise SeriesFormatError(folder, f"no {stem}.csv.gz or {stem}.csv in this series folder")


def read_series_folder(folder: str | Path, **options) -> tuple[Series, Series]:
    """(train, test) of one series folder, both named after the folder."""
    folder = Path(folder)
    train = read_series(_part(folder, "train"), name=folder.name, **options)
    test = read_series(_part(folder, "test"), name=folder.name, **options)
    if train.metrics != test.metrics:
        raise SeriesFormatError(folder, "train and test have different metric columns")
    return train, test


def list_series_folders(data_dir: str | Path) -> list[Path]:
    """Sub-folders of `data_dir` holding a test part, sorted by name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SeriesFormatError(data_dir, "not a folder")
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and any(
        (p / f).is_file() for f in ("test.csv.gz", "test.csv")))


def write_series(path: str | Path, series: Series) -> None:
    """Write in the shared format (gzip when the name ends in .gz), ISO-8601 UTC times."""
    path = Path(path)
    header = ["timestamp", *series.metrics] + (["label"] if series.labels is not None else [])
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:  # type: ignore[operator]
        writer = csv.writer(handle)
        writer.writerow(header)
        stamps = np.datetime_as_string(series.timestamps.astype("datetime64[s]"), unit="s")
        for i in range(len(series)):
            row = [f"{stamps[i]}Z", *(f"{v:.6g}" for v in series.values[i])]
            if series.labels is not None:
                row.append(str(int(series.labels[i])))
            writer.writerow(row)
