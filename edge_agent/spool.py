"""The agent's bounded on-disk queue of telemetry not yet acknowledged by the trainer.

SQLite in WAL mode (one file, crash-safe, survives restarts). Each row is one sample,
keyed by its sequence number, with the serialized `Sample` and, when the window ending
there was scored, the serialized `Verdict`. Label intervals wait in their own table.

Bound: `max_rows` samples, and the spool's files (database + WAL) within `max_bytes`:
stored payload is kept under half of it (SQLite's pages add overhead) and the WAL under
an eighth (checkpointed and truncated when it grows past that). When an append would
exceed either bound, the oldest samples are deleted first and counted. Detection never
stops for the spool: an append that cannot be written (disk full, read-only or failing
disk) drops that sample, counts it by reason and returns False; the next append tries
again, so spooling resumes by itself when space returns. Drops are in `drops` (reason ->
count; "spool full" is persisted as `dropped`).

Sequence numbers come from here (`next_seq` persisted), so they keep growing across
agent restarts and (vm_id, seq) stays unique for the receiver's de-duplication.
`ack(seq)` deletes every sample with a sequence <= seq.

Each spool file has a random `spool_id`, sent with every batch. A spool that is lost
(deleted by an operator, or corrupt and moved aside at start: `<path>.corrupt-<time>`)
is replaced by a fresh one whose seqs restart at 1 under a new id, so the trainer starts
a new seq space for the VM instead of taking the new samples for duplicates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from vmad import sqlite as vmad_sqlite

__all__ = ["Spool"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY, sample BLOB NOT NULL,
                                    verdict BLOB);
CREATE TABLE IF NOT EXISTS labels (id TEXT PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
SPOOL_FULL = "spool full"  # the bound: oldest dropped for the newest


def _reason(error: sqlite3.Error) -> str:
    text = str(error).lower()
    if "full" in text:
        return "disk full"
    if "readonly" in text or "read-only" in text:
        return "spool read-only"
    return "spool write error"


class Spool:
    def __init__(self, path: str | Path, max_bytes: int, max_rows: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.payload_budget = max_bytes // 2
        self.wal_budget = max(max_bytes // 8, 32 * 1024)
        self._lock = threading.Lock()
        self.drops: Counter[str] = Counter()
        self.last_error = ""
        self._failing = False
        self.persistent = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open(self.path)
        except sqlite3.OperationalError as error:  # disk full, read-only, cannot open
            self._close_quietly()
            self.persistent = False
            self.drops["spool unwritable at start"] += 1
            log.error("spool %s cannot be opened (%s): keeping unacknowledged telemetry in "
                      "memory until the agent restarts", self.path, error)
            self._open(":memory:")
        except sqlite3.DatabaseError as error:  # corrupt, or not a database at all
            self._close_quietly()
            moved = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("spool %s is unreadable (%s): moved aside to %s, starting a fresh "
                      "spool (new spool id, seqs restart at 1)", self.path, error, moved)
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    os.replace(source, Path(f"{moved}{suffix}"))
            self._open(self.path)

    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _open(self, where: Path | str) -> None:
        # One connection shared by the agent's threads, serialized by the lock.
        self._db = None
        self._db = vmad_sqlite.connect(where)
        db = self._db
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        # Keep the WAL small: checkpoint every wal_budget of pages, truncate after.
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint={max(8, self.wal_budget // page)}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_budget}")
        db.executescript(_SCHEMA)
        rows, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(sample) + COALESCE(LENGTH(verdict), 0)), 0)"
            " FROM samples").fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._next_seq = max(self._meta("next_seq", 1), self._max_seq() + 1)
        self.dropped = self._meta("dropped", 0)
        self.drops[SPOOL_FULL] = self.dropped
        spool_id = self._meta("spool_id", 0)
        if not spool_id:
            spool_id = secrets.randbits(62) or 1
            self._set_meta("spool_id", spool_id)
        self.spool_id = f"{spool_id:016x}"

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _max_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM samples").fetchone()[0])

    def next_seq(self) -> int:
        """Reserve the next sequence number (persisted with the next append)."""
        with self._lock:
            return self._next_seq

    def append(self, seq: int, sample: bytes, verdict: bytes | None = None) -> bool:
        """Spool one sample; False when it could not be written (dropped and counted by
        reason; the seq is used up, so the trainer sees a gap and counts it lost)."""
        size = len(sample) + (len(verdict) if verdict else 0)
        with self._lock:
            self._next_seq = max(self._next_seq, seq + 1)
            rows, payload, dropped = self._rows, self._bytes, self.dropped
            try:
                with vmad_sqlite.transaction(self._db, None):
                    self._db.execute(
                        "INSERT INTO samples (seq, sample, verdict) VALUES (?, ?, ?)",
                        (seq, sample, verdict))
                    self._rows += 1
                    self._bytes += size
                    self._set_meta("next_seq", self._next_seq)
                    self._enforce_bound()
            except sqlite3.Error as error:
                # Nothing was stored: the counts go back to what is on disk.
                self._rows, self._bytes, self.dropped = rows, payload, dropped
                self._write_failed(error)
                return False
            self.drops[SPOOL_FULL] = self.dropped
            self._limit_wal()
            if self._failing:
                self._failing = False
                log.warning("spool %s writable again; %s", self.path, self._drop_summary())
            return True

    def _write_failed(self, error: sqlite3.Error) -> None:
        reason = _reason(error)
        self.drops[reason] += 1
        self.last_error = str(error)
        if not self._failing:  # once per outage, not per sample
            self._failing = True
            log.error("spool %s cannot be written (%s): detection goes on, samples are "
                      "dropped and counted until it can", self.path, error)

    def _drop_summary(self) -> str:
        return "dropped so far: " + ", ".join(f"{k} {v}" for k, v in self.drops.items() if v)

    def _limit_wal(self) -> None:
        """Checkpoint and truncate the WAL once it is past its budget."""
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if wal > self.wal_budget:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as error:  # committed already; the next append retries
                self._write_failed(error)

    def _enforce_bound(self) -> None:
        while self._rows > self.max_rows or (
                self._bytes > self.payload_budget and self._rows > 1):
            over_rows = max(self._rows - self.max_rows, 1)
            # Drop in chunks: one statement per chunk, not per row, when far over.
            victims = self._db.execute(
                "SELECT seq, LENGTH(sample) + COALESCE(LENGTH(verdict), 0) FROM samples"
                " ORDER BY seq LIMIT ?", (min(over_rows, 1000),)).fetchall()
            if self._rows <= self.max_rows:  # over in bytes only: drop until under
                victims, freed = [], 0
                for seq, size in self._db.execute(
                        "SELECT seq, LENGTH(sample) + COALESCE(LENGTH(verdict), 0)"
                        " FROM samples ORDER BY seq LIMIT 1000"):
                    if (self._bytes - freed <= self.payload_budget
                            or len(victims) == self._rows - 1):
                        break
                    victims.append((seq, size))
                    freed += size
            if not victims:
                break
            last = victims[-1][0]
            self._db.execute("DELETE FROM samples WHERE seq <= ?", (last,))
            self._rows -= len(victims)
            self._bytes -= sum(size for _, size in victims)
            self.dropped += len(victims)
        self._set_meta("dropped", self.dropped)

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, bytes, bytes | None]]:
        """Up to `limit` spooled samples with seq > after_seq, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, sample, verdict FROM samples WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit)).fetchall()

    def first_seq(self) -> int:
        """Oldest seq still held (next_seq when empty)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM samples").fetchone()
            return int(row[0]) if row[0] is not None else self._next_seq

    def ack(self, seq: int) -> int:
        """Forget every sample with seq <= `seq`; returns how many went (0 when the
        deletion cannot be written now: the trainer has them, the next ack retries)."""
        with self._lock:
            try:
                with vmad_sqlite.transaction(self._db, None):
                    row = self._db.execute(
                        "SELECT COUNT(*), COALESCE(SUM(LENGTH(sample) + "
                        "COALESCE(LENGTH(verdict), 0)), 0) FROM samples WHERE seq <= ?",
                        (seq,)).fetchone()
                    self._db.execute("DELETE FROM samples WHERE seq <= ?", (seq,))
            except sqlite3.Error as error:
                self._write_failed(error)
                return 0
            self._rows -= int(row[0])
            self._bytes -= int(row[1])
            self._limit_wal()
            return int(row[0])

    def add_label(self, label_id: str, payload: bytes) -> bool:
        with self._lock:
            try:
                self._db.execute("INSERT OR IGNORE INTO labels (id, payload) VALUES (?, ?)",
                                 (label_id, payload))
            except sqlite3.Error as error:
                self._write_failed(error)
                return False
            return True

    def labels(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return self._db.execute("SELECT id, payload FROM labels ORDER BY id").fetchall()

    def remove_labels(self, ids: list[str]) -> None:
        with self._lock:
            try:
                self._db.executemany("DELETE FROM labels WHERE id = ?", [(i,) for i in ids])
            except sqlite3.Error as error:
                self._write_failed(error)

    def get_meta(self, key: str, default: int = 0) -> int:
        with self._lock:
            return self._meta(key, default)

    def set_meta(self, key: str, value: int) -> None:
        with self._lock:
            try:
                self._set_meta(key, value)
            except sqlite3.Error as error:
                self._write_failed(error)

    def disk_bytes(self) -> int:
        """Bytes of the database and its WAL on disk."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
        return total

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()
