"""The fleet registry: trainers, VMs, decisions and transitions, persisted in SQLite so a
controller restart loses nothing.

One database file, WAL mode (readers such as `vmad status` do not block the service), one
connection guarded by a lock: the service writes from gRPC worker threads, and SQLite
serializes writers anyway. Every write commits before the service answers, so an answer
the trainer saw is on disk.

Tables:
- `trainers`: id, address, first/last seen.
- `vms`: id, its trainer, last state (JSON of vmad/state.py's VMState), last decision.
- `decisions`: the decision log: when, which VM, the state, the action, why, which policy,
  and the DQN's Q-values behind it (a JSON list, empty for other policies).
- `transitions`: (state, action, reward, next state) for learning policies: the DQN's
  replay buffer, refilled from here after a restart (controller/dqn.py).
- `learners`: a learning policy's checkpoint: its arrays (networks, optimizer moments)
  as one `.npz` blob read back with `allow_pickle=False`, and its counters as JSON.
- `meta`: the schema version, and small JSON facts such as the shadow mode's latest
  backtest (`put_fact` / `fact`).

Decisions of a policy running in shadow (controller/shadow.py) sit beside the acted one
in `decisions.shadow` (JSON of the decision, empty when none).
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmad import sqlite as vmad_sqlite
from vmad.actions import Action, Decision
from vmad.state import VMState

__all__ = ["DecisionRow", "Registry", "TrainerRow", "TransitionRow", "VMRow"]

SCHEMA_VERSION = 3
# What each older schema lacks, applied in order when an older registry is opened.
_MIGRATIONS = {
    1: "ALTER TABLE decisions ADD COLUMN q_values TEXT NOT NULL DEFAULT '[]'",
    2: "ALTER TABLE decisions ADD COLUMN shadow TEXT NOT NULL DEFAULT ''",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trainers (
    trainer_id TEXT PRIMARY KEY,
    address TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    trainer_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    state TEXT,
    model_version TEXT NOT NULL DEFAULT '',
    last_decision_id INTEGER,
    reports INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS decisions (
    decision_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    vm_id TEXT NOT NULL,
    trainer_id TEXT NOT NULL,
    state TEXT NOT NULL,
    action TEXT NOT NULL,
    batches INTEGER NOT NULL,
    reason TEXT NOT NULL,
    policy TEXT NOT NULL,
    q_values TEXT NOT NULL DEFAULT '[]',
    shadow TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS decisions_vm ON decisions (vm_id, decision_id);
CREATE INDEX IF NOT EXISTS decisions_trainer ON decisions (trainer_id, at);
CREATE TABLE IF NOT EXISTS learners (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL,
    arrays BLOB NOT NULL,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    transition_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    vm_id TEXT NOT NULL,
    decision_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    action TEXT NOT NULL,
    batches INTEGER NOT NULL,
    reward REAL NOT NULL,
    next_state TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class TrainerRow:
    trainer_id: str
    address: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class VMRow:
    vm_id: str
    trainer_id: str
    first_seen: float
    last_seen: float
    state: VMState | None
    model_version: str
    reports: int
    last_action: Action | None
    last_reason: str


@dataclass(frozen=True)
class DecisionRow:
    decision_id: int
    at: float
    vm_id: str
    trainer_id: str
    state: VMState
    decision: Decision
    policy: str
    shadow: Decision | None = None


@dataclass(frozen=True)
class TransitionRow:
    transition_id: int
    at: float
    vm_id: str
    state: VMState
    decision: Decision
    reward: float
    next_state: VMState


def _state_json(state: VMState) -> str:
    return json.dumps(state.to_dict(), sort_keys=True)


def _state(text: str) -> VMState:
    return VMState.from_dict(json.loads(text))


def _decision_json(decision: Decision | None) -> str:
    if decision is None:
        return ""
    return json.dumps({"action": decision.action.value, "batches": decision.batches,
                       "reason": decision.reason, "q_values": list(decision.q_values)})


def _decision(text: str) -> Decision | None:
    if not text:
        return None
    data = json.loads(text)
    return Decision(Action(data["action"]), int(data["batches"]), data["reason"],
                    tuple(float(v) for v in data["q_values"]))


class Registry:
    """SQLite-backed fleet registry. Thread-safe; `close()` when done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # FULL: a decision the trainer has been told about survives a power cut.
        self._db = vmad_sqlite.connect(path, synchronous="FULL")
        with self._write() as db:
            has_meta = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND "
                                  "name='meta'").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
                if has_meta else None
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: registry schema {row[0]} is newer than "
                                   f"{SCHEMA_VERSION}; this vmad cannot read it")
            if row is not None:
                for version in range(int(row[0]), SCHEMA_VERSION):
                    db.execute(_MIGRATIONS[version])
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                       (str(SCHEMA_VERSION),))

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return vmad_sqlite.transaction(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes -------------------------------------------------------------------------

    def touch_trainer(self, trainer_id: str, address: str = "", now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as db:
            db.execute(
                "INSERT INTO trainers VALUES (?, ?, ?, ?) ON CONFLICT(trainer_id) DO UPDATE "
                "SET last_seen=excluded.last_seen, address=CASE WHEN excluded.address != '' "
                "THEN excluded.address ELSE trainers.address END",
                (trainer_id, address, now, now))

    def record_report(
        self, trainer_id: str, state: VMState, decision: Decision, policy: str,
        reward_of: Callable[[Decision, VMState], float] | None = None,
        now: float | None = None, shadow: Decision | None = None,
    ) -> tuple[int, TransitionRow | None]:
        """Store a state report and the decision answering it, in one transaction.

        When the VM had an earlier decision, the transition (earlier state, earlier
        action, reward, this state) is recorded too and returned; `reward_of(decision,
        next_state)` computes its reward. Returns (decision id, transition or None).
        """
        now = time.time() if now is None else now
        state_text = _state_json(state)
        transition: TransitionRow | None = None
        with self._write() as db:
            db.execute(
                "INSERT INTO trainers VALUES (?, '', ?, ?) ON CONFLICT(trainer_id) "
                "DO UPDATE SET last_seen=excluded.last_seen", (trainer_id, now, now))
            previous = db.execute(
                "SELECT d.decision_id, d.state, d.action, d.batches, d.reason FROM vms v "
                "JOIN decisions d ON d.decision_id = v.last_decision_id WHERE v.vm_id=?",
                (state.vm_id,)).fetchone()
            cursor = db.execute(
                "INSERT INTO decisions (at, vm_id, trainer_id, state, action, batches, reason, "
                "policy, q_values, shadow) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now, state.vm_id, trainer_id, state_text, decision.action.value,
                 decision.batches, decision.reason, policy, json.dumps(decision.q_values),
                 _decision_json(shadow)))
            decision_id = int(cursor.lastrowid or 0)
            db.execute(
                "INSERT INTO vms (vm_id, trainer_id, first_seen, last_seen, state, model_version,"
                " last_decision_id, reports) VALUES (?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT(vm_id) DO UPDATE SET trainer_id=excluded.trainer_id, "
                "last_seen=excluded.last_seen, state=excluded.state, "
                "model_version=excluded.model_version, "
                "last_decision_id=excluded.last_decision_id, reports=vms.reports + 1",
                (state.vm_id, trainer_id, now, now, state_text, state.model_version,
                 decision_id))
            if previous is not None and reward_of is not None:
                before = _state(previous[1])
                taken = Decision(Action(previous[2]), int(previous[3]), previous[4])
                value = float(reward_of(taken, state))
                cursor = db.execute(
                    "INSERT INTO transitions (at, vm_id, decision_id, state, action, batches, "
                    "reward, next_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, state.vm_id, int(previous[0]), previous[1], taken.action.value,
                     taken.batches, value, state_text))
                transition = TransitionRow(int(cursor.lastrowid or 0), now, state.vm_id,
                                           before, taken, value, state)
        return decision_id, transition

    # -- reads --------------------------------------------------------------------------

    def trainers(self) -> list[TrainerRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT trainer_id, address, first_seen, last_seen FROM trainers "
                "ORDER BY trainer_id").fetchall()
        return [TrainerRow(*row) for row in rows]

    def vms(self) -> list[VMRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT v.vm_id, v.trainer_id, v.first_seen, v.last_seen, v.state, "
                "v.model_version, v.reports, d.action, d.reason FROM vms v "
                "LEFT JOIN decisions d ON d.decision_id = v.last_decision_id "
                "ORDER BY v.vm_id").fetchall()
        return [VMRow(r[0], r[1], r[2], r[3], _state(r[4]) if r[4] else None, r[5], r[6],
                      Action(r[7]) if r[7] else None, r[8] or "") for r in rows]

    def decisions(self, vm_id: str | None = None, limit: int = 100) -> list[DecisionRow]:
        """The most recent decisions, newest first."""
        query = ("SELECT decision_id, at, vm_id, trainer_id, state, action, batches, reason, "
                 "policy, q_values, shadow FROM decisions")
        args: tuple = ()
        if vm_id is not None:
            query += " WHERE vm_id=?"
            args = (vm_id,)
        query += " ORDER BY decision_id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [DecisionRow(r[0], r[1], r[2], r[3], _state(r[4]),
                            Decision(Action(r[5]), r[6], r[7],
                                     tuple(float(v) for v in json.loads(r[9]))), r[8],
                            _decision(r[10]))
                for r in rows]

    def transitions(self, limit: int | None = None, *, newest: bool = False,
                    after: int = 0, through: int | None = None) -> list[TransitionRow]:
        """Transitions in the order they were recorded (oldest first), those with
        `after` < id <= `through`: the first `limit`, or with `newest` the last `limit`
        (what a replay buffer of that size holds)."""
        query = ("SELECT transition_id, at, vm_id, state, action, batches, reward, next_state "
                 "FROM transitions WHERE transition_id > ? AND transition_id <= ? "
                 "ORDER BY transition_id" + (" DESC" if newest else ""))
        args: tuple[int, ...] = (after, 2**62 if through is None else through)
        if limit is not None:
            query += " LIMIT ?"
            args = (*args, int(limit))
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        if newest:
            rows.reverse()
        return [TransitionRow(r[0], r[1], r[2], _state(r[3]), Decision(Action(r[4]), r[5]),
                              r[6], _state(r[7])) for r in rows]

    def batches_since(self, trainer_id: str, since: float) -> int:
        """Fine-tuning batches decided for `trainer_id`'s VMs since `since` (what its
        hourly compute budget counts)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(batches), 0) FROM decisions WHERE trainer_id=? AND at>? "
                "AND action IN ('finetune', 'reset_finetune')", (trainer_id, since)).fetchone()
        return int(row[0])

    def budget_use(self, since: float) -> dict[str, int]:
        """Fine-tuning batches per trainer since `since`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT trainer_id, COALESCE(SUM(batches), 0) FROM decisions WHERE at>? AND "
                "action IN ('finetune', 'reset_finetune') GROUP BY trainer_id ORDER BY "
                "trainer_id", (since,)).fetchall()
        return {t: int(n) for t, n in rows}

    def exploration_times(self, since: float) -> list[float]:
        """When the DQN explored (acted at random) since `since`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at FROM decisions WHERE at>? AND reason LIKE 'dqn explore%' "
                "ORDER BY at", (since,)).fetchall()
        return [float(r[0]) for r in rows]

    # -- a learning policy's checkpoint, and small facts ----------------------------------

    def save_learner(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                     now: float | None = None) -> None:
        """Replace `name`'s checkpoint in one transaction (a crash keeps the old one)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO learners VALUES (?, ?, ?, ?)",
                       (name, time.time() if now is None else now, buffer.getvalue(),
                        json.dumps(meta, sort_keys=True)))

    def load_learner(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """`name`'s checkpoint (arrays, meta), or None. Arrays are read without pickle."""
        with self._lock:
            row = self._db.execute("SELECT arrays, meta FROM learners WHERE name=?",
                                   (name,)).fetchone()
        if row is None:
            return None
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        return arrays, json.loads(row[1])

    def learner_meta(self, name: str) -> dict[str, Any] | None:
        """`name`'s checkpointed counters without its arrays (for `vmad status`)."""
        with self._lock:
            row = self._db.execute("SELECT meta, at FROM learners WHERE name=?",
                                   (name,)).fetchone()
        return None if row is None else {**json.loads(row[0]), "saved_at": row[1]}

    def put_fact(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def fact(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {table: int(self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                    for table in ("trainers", "vms", "decisions", "transitions")}

    def action_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT action, COUNT(*) FROM decisions GROUP BY action").fetchall()
        return {action: int(n) for action, n in rows}
