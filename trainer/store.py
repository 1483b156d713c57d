"""Per-VM bounded storage on the trainer: recent samples, the agent's verdicts, labels,
and each VM's model bookkeeping, in one SQLite file.

Why SQLite and not memory: a trainer killed mid-stream and restarted must neither lose
nor double-count a sample. A batch's samples and the VM's new acknowledgement are
committed in one transaction *before* the ack goes back to the agent, so whatever the
agent saw acknowledged is on disk, and whatever it replays after a restart is recognised
by (VM id, sequence number). WAL mode with synchronous=NORMAL survives the process being
killed (the case that matters here); a power cut may lose the last few commits, which
the agent then replays from its spool.

De-duplication: an agent streams its samples in sequence order on one stream, so the
trainer keeps, per VM, the highest sequence number it has stored (`acked`). A sample at
or below it is a duplicate (counted, dropped); a sample above `acked + 1` means the agent
skipped some (its spool dropped its oldest when full): the gap is counted as `lost` and
`acked` moves on, so one lost sample never wedges the stream. Samples refused by
validation (trainer/intake.py) are acknowledged too and counted as `refused`, not lost.

Spools: an agent names its spool (`spool_id`). A VM whose agent starts a new spool (its
seqs restart at 1) continues in a new seq space after everything stored: the store adds
`seq_offset` to the agent's seqs, so stored seqs stay unique and increasing, and acks go
back in the agent's numbering. A new VM (or spool) whose first seq is above 1 dropped
those samples before first contact: counted lost.

Bounds (documented in trainer.yaml): at most `max_samples` samples, `max_verdicts`
verdicts and `max_labels` label intervals per VM; the oldest go first. Pruning runs every
`prune_every` inserted samples, so the table may hold up to that many extra for a while.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmad import sqlite as vmad_sqlite
from vmad.labels import LabelInterval

__all__ = ["IngestBatch", "IngestResult", "RecentData", "TelemetryStore", "VMModelInfo"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    metrics TEXT NOT NULL,
    acked INTEGER NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    since_prune INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    spool_id TEXT NOT NULL DEFAULT '',
    seq_offset INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS samples (
    vm_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    vals BLOB NOT NULL,
    PRIMARY KEY (vm_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verdicts (
    vm_id TEXT NOT NULL,
    ts REAL NOT NULL,
    score REAL NOT NULL,
    anomalous INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    contributions BLOB,
    PRIMARY KEY (vm_id, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels (
    label_id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL,
    start_ts REAL NOT NULL,
    end_ts REAL NOT NULL,
    anomalous INTEGER NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_vm ON labels (vm_id, label_id);
CREATE TABLE IF NOT EXISTS models (
    vm_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    finetuned INTEGER NOT NULL,
    batches_trained INTEGER NOT NULL,
    trained_at REAL,
    samples_at_training INTEGER NOT NULL,
    threshold REAL NOT NULL,
    pushed INTEGER NOT NULL DEFAULT 0
);
"""

# Columns added since the first release, for stores an older vmad created.
_ADDED_VM_COLUMNS = (("spool_id", "TEXT NOT NULL DEFAULT ''"),
                     ("seq_offset", "INTEGER NOT NULL DEFAULT 0"),
                     ("refused", "INTEGER NOT NULL DEFAULT 0"))


@dataclass(frozen=True)
class IngestResult:
    """What one batch did: new samples stored, duplicates dropped, samples the agent
    skipped, and the acknowledgement to send (highest sequence number stored)."""

    stored: int
    duplicates: int
    lost: int
    acked: int


@dataclass(frozen=True)
class IngestBatch:
    """One telemetry batch for `TelemetryStore.ingest_many` (see `ingest`)."""

    vm_id: str
    metrics: tuple[str, ...]
    seqs: Sequence[int] | np.ndarray
    timestamps: Sequence[float] | np.ndarray
    values: np.ndarray
    verdicts: Sequence[tuple] = ()  # (ts, score, anomalous, version[, contributions])
    labels: Sequence[LabelInterval] = ()
    spool_id: str = ""
    refused_seqs: Sequence[int] = ()


@dataclass(frozen=True)
class RecentData:
    """The most recent samples of one VM, oldest first."""

    seqs: np.ndarray  # int64 [N]
    timestamps: np.ndarray  # float64 [N], Unix seconds
    values: np.ndarray  # float32 [N, M]

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass(frozen=True)
class VMModelInfo:
    """Which model a VM runs and what has been spent on it (persisted across restarts)."""

    version: str
    finetuned: bool
    batches_trained: int
    trained_at: float | None
    samples_at_training: int
    threshold: float
    pushed: int


@dataclass(frozen=True)
class VMCounters:
    vm_id: str
    metrics: tuple[str, ...]
    acked: int
    received: int
    duplicates: int
    lost: int
    first_seen: float
    last_seen: float
    refused: int = 0  # samples refused by validation
    spool_id: str = ""  # the agent spool seen last
    seq_offset: int = 0  # agent seq + seq_offset = stored seq (see `ingest`)


class TelemetryStore:
    """Thread-safe; one instance per trainer process."""

    def __init__(self, path: str | Path, *, max_samples: int = 20_000,
                 max_verdicts: int = 20_000, max_labels: int = 1_000,
                 prune_every: int = 1_000) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_verdicts = max_verdicts
        self.max_labels = max_labels
        self.prune_every = prune_every
        self._lock = threading.Lock()
        self._db = vmad_sqlite.connect(path)
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(verdicts)")}
        if "contributions" not in columns:  # a store written before contributions existed
            self._db.execute("ALTER TABLE verdicts ADD COLUMN contributions BLOB")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(vms)")}
        for name, kind in _ADDED_VM_COLUMNS:
            if name not in columns:  # a store written by an older vmad
                self._db.execute(f"ALTER TABLE vms ADD COLUMN {name} {kind}")
        if "ext_id" not in {r[1] for r in self._db.execute("PRAGMA table_info(labels)")}:
            self._db.execute("ALTER TABLE labels ADD COLUMN ext_id TEXT")
        # NULLs are distinct in a UNIQUE index: labels without an id are never merged.
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS labels_ext ON labels "
                         "(vm_id, ext_id)")

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return vmad_sqlite.transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- ingest -------------------------------------------------------------------------

    def ingest(
        self,
        vm_id: str,
        metrics: Sequence[str],
        seqs: Sequence[int] | np.ndarray,
        timestamps: Sequence[float] | np.ndarray,
        values: np.ndarray,
        *,
        verdicts: Sequence[tuple] = (),
        labels: Sequence[LabelInterval] = (),
        now: float | None = None,
        spool_id: str = "",
        refused_seqs: Sequence[int] = (),
    ) -> IngestResult:
        """Store one telemetry batch atomically and return the acknowledgement.

        seqs / timestamps / values: the samples, in sequence order, `values[N, M]` in the
        order of `metrics`. verdicts: (window end timestamp, score, anomalous, model
        version[, per-metric contributions]). labels: ground-truth intervals the agent
        shipped (e.g. an injection).
        spool_id: the agent's spool (see `IngestBatch`). refused_seqs: seqs of this batch
        refused by validation (acknowledged, counted apart, never as lost).
        Raises ValueError for a batch whose shape or metric list does not fit.
        """
        batch = IngestBatch(vm_id, tuple(metrics), seqs, timestamps, values, verdicts, labels,
                            spool_id, refused_seqs)
        (result,) = self.ingest_many([batch], now=now)
        if isinstance(result, Exception):
            raise result
        return result

    def ingest_many(self, batches: Sequence[IngestBatch], now: float | None = None
                    ) -> list[IngestResult | ValueError]:
        """Store several batches in one transaction (group commit: one commit for every
        stream's waiting batch). Each batch is its own savepoint, so a batch refused with
        ValueError changes nothing and the others are stored. A failure of the whole
        transaction (disk full) raises sqlite3.Error and stores none of them."""
        now = time.time() if now is None else now
        results: list[IngestResult | ValueError] = []
        with self._write() as db:
            for batch in batches:
                db.execute("SAVEPOINT batch")
                try:
                    results.append(self._ingest_one(db, batch, now))
                except ValueError as error:
                    db.execute("ROLLBACK TO batch")
                    results.append(error)
                db.execute("RELEASE batch")
        return results

    def _ingest_one(self, db: sqlite3.Connection, batch: IngestBatch,
                    now: float) -> IngestResult:
        vm_id, metrics = batch.vm_id, batch.metrics
        values = np.asarray(batch.values, dtype=np.float32)
        seqs = np.asarray(batch.seqs, dtype=np.int64)
        timestamps = batch.timestamps
        if values.ndim != 2 or values.shape != (len(seqs), len(metrics)):
            raise ValueError(f"batch of {len(seqs)} samples has values of shape {values.shape},"
                             f" expected ({len(seqs)}, {len(metrics)})")
        if len(timestamps) != len(seqs):
            raise ValueError(f"{len(seqs)} sequence numbers but {len(timestamps)} timestamps")
        seq_list = seqs.tolist()
        if any(b <= a for a, b in itertools.pairwise(seq_list)):
            raise ValueError("sequence numbers in a batch must strictly increase")
        metrics_text = ",".join(metrics)
        row = db.execute("SELECT metrics, acked, since_prune, spool_id, seq_offset FROM vms "
                         "WHERE vm_id=?", (vm_id,)).fetchone()
        lost = 0
        if row is None:
            # A VM's first batch sets the base. An agent that names its spool numbers it
            # from 1, so seqs below its first were dropped before first contact: lost.
            # Without a spool id whatever came before is not known to be ours.
            first = int(seqs[0]) if len(seqs) else 1
            acked = 0 if batch.spool_id else first - 1
            offset, since_prune = 0, 0
            db.execute("INSERT INTO vms (vm_id, metrics, acked, first_seen, last_seen, "
                       "spool_id, seq_offset) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (vm_id, metrics_text, acked, now, now, batch.spool_id, offset))
        else:
            if row[0] != metrics_text:
                raise ValueError(f"VM {vm_id} sends metrics [{metrics_text}] but earlier "
                                 f"sent [{row[0]}]")
            acked, since_prune, offset = int(row[1]), int(row[2]), int(row[4])
            if batch.spool_id and batch.spool_id != row[3]:
                if row[3]:
                    # A new spool restarts its seqs at 1: it continues this VM's seq space
                    # after everything stored so far (neither duplicates nor double
                    # counts), and seqs below its first were dropped before first contact.
                    offset = acked
                # (An agent naming the spool it has always had keeps its seqs.)
                db.execute("UPDATE vms SET spool_id=?, seq_offset=? WHERE vm_id=?",
                           (batch.spool_id, offset, vm_id))
        # From here on seqs are the trainer's: the agent's plus the spool's offset.
        # (Plain lists: a batch is 1 to a few hundred samples.)
        fresh = [i for i, seq in enumerate(seq_list) if seq + offset > acked]
        refused = {seq + offset for seq in batch.refused_seqs if seq + offset > acked}
        duplicates = len(seq_list) - len(fresh)
        stored = len(fresh)
        if fresh:
            stamps = np.asarray(timestamps, dtype=np.float64).tolist()
            db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)",
                           ((vm_id, seq_list[i] + offset, stamps[i], values[i].tobytes())
                            for i in fresh))
        top = max(acked, seq_list[-1] + offset if fresh else 0, max(refused, default=0))
        # Every seq in (acked, top] is now stored, refused or given up on (lost).
        lost += (top - acked) - stored - len(refused)
        acked = top
        since_prune += stored
        if batch.verdicts:
            db.executemany(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?)",
                ((vm_id, float(v[0]), float(v[1]), int(bool(v[2])), v[3],
                  np.asarray(v[4], np.float32).tobytes() if len(v) > 4 and len(v[4])
                  else None)
                 for v in batch.verdicts))
        for label in batch.labels:
            self._insert_label(db, vm_id, label)
        if since_prune >= self.prune_every:
            self._prune(db, vm_id)
            since_prune = 0
        db.execute(
            "UPDATE vms SET acked=?, received=received+?, duplicates=duplicates+?, "
            "lost=lost+?, refused=refused+?, since_prune=?, last_seen=? WHERE vm_id=?",
            (acked, stored, duplicates, lost, len(batch.refused_seqs), since_prune, now,
             vm_id))
        return IngestResult(stored, duplicates, lost, acked - offset)

    def _insert_label(self, db: sqlite3.Connection, vm_id: str, label: LabelInterval) -> None:
        if not label.end >= label.start:
            raise ValueError(f"label interval ends ({label.end}) before it starts "
                             f"({label.start})")
        # A label with an id is stored once however often it is resent.
        db.execute("INSERT OR IGNORE INTO labels (vm_id, start_ts, end_ts, anomalous, source, "
                   "ext_id) VALUES (?, ?, ?, ?, ?, ?)",
                   (vm_id, float(label.start), float(label.end), int(label.anomalous),
                    label.source, label.id or None))

    def add_labels(self, vm_id: str, labels: Sequence[LabelInterval]) -> None:
        with self._write() as db:
            for label in labels:
                self._insert_label(db, vm_id, label)
            self._prune(db, vm_id)

    def _prune(self, db: sqlite3.Connection, vm_id: str) -> None:
        db.execute(
            "DELETE FROM samples WHERE vm_id=? AND seq <= (SELECT seq FROM samples WHERE "
            "vm_id=? ORDER BY seq DESC LIMIT 1 OFFSET ?)", (vm_id, vm_id, self.max_samples))
        db.execute(
            "DELETE FROM verdicts WHERE vm_id=? AND ts <= (SELECT ts FROM verdicts WHERE "
            "vm_id=? ORDER BY ts DESC LIMIT 1 OFFSET ?)", (vm_id, vm_id, self.max_verdicts))
        db.execute(
            "DELETE FROM labels WHERE vm_id=? AND label_id <= (SELECT label_id FROM labels "
            "WHERE vm_id=? ORDER BY label_id DESC LIMIT 1 OFFSET ?)",
            (vm_id, vm_id, self.max_labels))

    # -- reads --------------------------------------------------------------------------

    def vm_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT vm_id FROM vms ORDER BY vm_id")]

    def counters(self, vm_id: str) -> VMCounters | None:
        with self._lock:
            row = self._db.execute(
                "SELECT vm_id, metrics, acked, received, duplicates, lost, first_seen, "
                "last_seen, refused, spool_id, seq_offset FROM vms WHERE vm_id=?",
                (vm_id,)).fetchone()
        if row is None:
            return None
        return VMCounters(row[0], tuple(row[1].split(",")) if row[1] else (), *row[2:])

    def acked(self, vm_id: str) -> int | None:
        """The acknowledgement as the VM's agent counts (its current spool's seqs)."""
        counters = self.counters(vm_id)
        return None if counters is None else counters.acked - counters.seq_offset

    def recent(self, vm_id: str, limit: int | None = None) -> RecentData:
        """The newest `limit` samples (all stored when None), oldest first."""
        limit = self.max_samples if limit is None else limit
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, ts, vals FROM samples WHERE vm_id=? ORDER BY seq DESC LIMIT ?",
                (vm_id, limit)).fetchall()
        rows.reverse()
        if not rows:
            return RecentData(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 0), np.float32))
        values = np.stack([np.frombuffer(r[2], dtype=np.float32) for r in rows])
        return RecentData(np.array([r[0] for r in rows], dtype=np.int64),
                          np.array([r[1] for r in rows], dtype=np.float64), values)

    def verdicts(self, vm_id: str, limit: int = 1_000) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
        """Newest `limit` verdicts, oldest first: (timestamps, scores, anomalous)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, score, anomalous FROM verdicts WHERE vm_id=? ORDER BY ts DESC "
                "LIMIT ?", (vm_id, limit)).fetchall()
        rows.reverse()
        arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
        return arr[:, 0], arr[:, 1], arr[:, 2] > 0

    def contributions(self, vm_id: str, limit: int = 100) -> list[tuple[float, np.ndarray]]:
        """Newest `limit` verdicts that carry per-metric contributions, oldest first:
        (timestamp, contributions[M])."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, contributions FROM verdicts WHERE vm_id=? AND contributions IS "
                "NOT NULL ORDER BY ts DESC LIMIT ?", (vm_id, limit)).fetchall()
        rows.reverse()
        return [(r[0], np.frombuffer(r[1], dtype=np.float32)) for r in rows]

    def last_blamed(self, vm_id: str) -> tuple[float, np.ndarray] | None:
        """The newest anomalous verdict that carries per-metric contributions:
        (timestamp, contributions[M]); None when there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT ts, contributions FROM verdicts WHERE vm_id=? AND anomalous=1 AND "
                "contributions IS NOT NULL ORDER BY ts DESC LIMIT 1", (vm_id,)).fetchone()
        return None if row is None else (row[0], np.frombuffer(row[1], dtype=np.float32))

    def label_intervals(self, vm_id: str) -> list[LabelInterval]:
        """Oldest first; a later interval overrides an earlier one where they overlap."""
        with self._lock:
            rows = self._db.execute(
                "SELECT start_ts, end_ts, anomalous, source FROM labels WHERE vm_id=? "
                "ORDER BY label_id", (vm_id,)).fetchall()
        return [LabelInterval(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def last_label_id(self, vm_id: str, normal_only: bool = False) -> int:
        """The id of the VM's newest label (of normal only, with `normal_only`); ids only
        grow, so a fit that saw id n has seen every label up to n. 0: none."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(label_id) FROM labels WHERE vm_id=?"
                + (" AND anomalous=0" if normal_only else ""), (vm_id,)).fetchone()
        return int(row[0] or 0)

    def labels_at(self, vm_id: str, timestamps: np.ndarray) -> np.ndarray:
        """Label per timestamp: 1 anomalous, 0 normal, -1 unknown."""
        out = np.full(len(timestamps), -1, dtype=np.int8)
        for label in self.label_intervals(vm_id):
            inside = (timestamps >= label.start) & (timestamps <= label.end)
            out[inside] = 1 if label.anomalous else 0
        return out

    # -- per-VM model bookkeeping --------------------------------------------------------

    def model_info(self, vm_id: str) -> VMModelInfo | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, finetuned, batches_trained, trained_at, samples_at_training, "
                "threshold, pushed FROM models WHERE vm_id=?", (vm_id,)).fetchone()
        if row is None:
            return None
        return VMModelInfo(row[0], bool(row[1]), row[2], row[3], row[4], row[5], row[6])

    def set_model_info(self, vm_id: str, info: VMModelInfo) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (vm_id, info.version, int(info.finetuned), info.batches_trained,
                        info.trained_at, info.samples_at_training, info.threshold,
                        info.pushed))
