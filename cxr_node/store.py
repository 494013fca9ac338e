"""The node's state: one SQLite database in WAL mode, the source of truth for every study.

Each pipeline stage moves a study from one state to the next with a compare-and-set on
(state, revision) and records the step in ``transitions``, in the same transaction, so that a crash
at any point resumes from the last committed state. Receiver processes write instances concurrently;
WAL plus a busy timeout serialises their short write transactions.

Study states::

    receiving -> stable -> queued -> drafting -> drafted -> reported -> sent
         \\-> skipped (routing rules)      failed (with a reason) from any working state

Every state change goes through one method, ``Store._change``, which knows the allowed edges
(``EDGES``) and refuses any other with a StateError naming the study and the edge: a stage with a
bug cannot move a study somewhere the pipeline never goes (a draft straight to ``sent``, a sent
study back to ``drafting``). Besides the forward path: a draft that failed or was lost goes back
from ``drafting`` to ``queued`` (queue.py); a failed or skipped study is drafted again from
``stable`` (`cxr-node redraft`); a study failed by dispatch returns to ``reported``
(`cxr-node requeue`); a study whose new instance changes nothing the model reads goes from
``stable`` straight back to where its earlier draft had got (``reported`` or ``sent``).

A new instance for a study that is past ``receiving`` starts a new *revision*: the study goes back
to ``receiving`` from any state, work in flight for the old revision is discarded when it
returns, and the new draft supersedes the earlier one (see assemble.py).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from cxr_node.durable import FILE_MODE, private_dir
from cxr_node.logs import study_key


class StudyState(StrEnum):
    RECEIVING = "receiving"
    STABLE = "stable"
    QUEUED = "queued"
    DRAFTING = "drafting"
    DRAFTED = "drafted"
    REPORTED = "reported"
    SENT = "sent"
    SKIPPED = "skipped"
    FAILED = "failed"


_S = StudyState
EDGES: dict[StudyState, frozenset[StudyState]] = {
    _S.RECEIVING: frozenset({_S.STABLE, _S.SKIPPED}),
    _S.STABLE: frozenset({_S.QUEUED, _S.FAILED, _S.REPORTED, _S.SENT}),
    _S.QUEUED: frozenset({_S.DRAFTING, _S.DRAFTED, _S.FAILED}),
    _S.DRAFTING: frozenset({_S.DRAFTED, _S.FAILED, _S.QUEUED}),
    _S.DRAFTED: frozenset({_S.REPORTED, _S.FAILED}),
    _S.REPORTED: frozenset({_S.SENT, _S.FAILED}),
    _S.SENT: frozenset(),
    _S.SKIPPED: frozenset({_S.STABLE}),
    _S.FAILED: frozenset({_S.STABLE, _S.REPORTED}),
}
"""The edges a study may take within one revision; a new revision reopens it from any state."""


class StateError(RuntimeError):
    """A state change the study state machine does not have: a bug in the caller, not bad data."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT NOT NULL,
    body_part TEXT NOT NULL,
    view_position TEXT NOT NULL,
    view TEXT NOT NULL,
    instance_number INTEGER,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    conflict INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS instances_by_uid ON instances (sop_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    study_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL,
    reason TEXT,
    first_received_at REAL NOT NULL,
    revision_started_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    state_changed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_by_state ON studies (state);
CREATE INDEX IF NOT EXISTS studies_by_arrival ON studies (last_received_at);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_by_study ON transitions (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    task_id TEXT NOT NULL,
    inputs TEXT NOT NULL,
    result TEXT,
    reason TEXT,
    created_at REAL NOT NULL,
    submitted_at REAL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS reports (
    sr_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    job_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    supersedes TEXT,
    demo INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_study ON reports (study_uid);
CREATE TABLE IF NOT EXISTS documents (
    sr_uid TEXT NOT NULL,
    rendition TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_instance_uid TEXT,
    path TEXT,
    problem TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (sr_uid, rendition)
);
CREATE INDEX IF NOT EXISTS documents_by_sr ON documents (sr_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    sr_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status TEXT,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (sr_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS reports_by_time ON reports (created_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    document TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    study_uid TEXT,
    accession TEXT,
    patient_ids TEXT,
    path TEXT,
    findings TEXT,
    impression TEXT,
    tried_at REAL NOT NULL DEFAULT 0,
    sr_uid TEXT,
    paired_at REAL,
    model TEXT,
    demo INTEGER,
    scores TEXT,
    labels TEXT,
    misses TEXT,
    UNIQUE (source, document)
);
CREATE INDEX IF NOT EXISTS feedback_waiting ON feedback (state, tried_at);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (state, received_at);
CREATE INDEX IF NOT EXISTS feedback_by_study ON feedback (study_uid);
CREATE INDEX IF NOT EXISTS feedback_by_draft ON feedback (sr_uid);
CREATE TABLE IF NOT EXISTS draft_orders (
    sr_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    accession TEXT NOT NULL,
    patient_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS draft_orders_by_accession ON draft_orders (accession);
CREATE INDEX IF NOT EXISTS draft_orders_by_study ON draft_orders (study_uid);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY,
    adapter TEXT NOT NULL,
    files TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    decided_at REAL NOT NULL,
    operator TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS promotions_by_files ON promotions (files);
"""
"""``feedback``: signed reports (cxr_node/feedback.py), one row each: where it came from
(``source``: dicom, hl7 or import) and what it was (``document``: its SOP Instance UID, the
sender and MSH-10 of its ORU, or a hash of an imported line, so a re-send is known), its
``state`` (received, waiting, paired, superseded, ignored, unpaired) and why, what it names to
pair it by (study, accession, patient IDs as JSON), its text (findings, impression: PHI, kept
under the retention rules), and once paired the draft (``sr_uid``, ``model``, ``demo``) with
the scores, both texts' labels and the significant misses as JSON. ``draft_orders`` indexes each
draft SR by its accession and patient ID, to pair signed reports that name an order only.
``promotions``: each `cxr-node model promote` decision, by the adapter's label (name@version)
and the digest of its files (cxr_node/adaptation/promote.py); the node serves only an adapter
whose last decision was to accept it."""


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver learned about one stored instance."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    body_part: str
    view_position: str
    view: str
    instance_number: int | None
    path: str
    size: int
    calling_ae: str
    peer: str


@dataclass(frozen=True)
class Study:
    study_uid: str
    study_key: str
    state: StudyState
    revision: int
    reason: str | None
    first_received_at: float
    revision_started_at: float
    last_received_at: float
    state_changed_at: float


Stored = Literal["stored", "duplicate", "conflict"]


def instance_handle(instance_id: int, view: str) -> str:
    """How reasons and log lines name a stored image: its row id and view, never a UID or a file
    name (spool file names can hold a SOP Instance UID)."""
    return f"instance {instance_id} ({view})"


@dataclass(frozen=True)
class Recorded:
    """What indexing an instance did: its outcome, and the study if it started a new revision."""

    outcome: Stored
    reopened: Study | None = None


class Store:
    """Connections per thread to the state database, and the study state machine."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self._timeout = timeout
        self._local = threading.local()
        private_dir(path.parent)
        if not path.exists():
            path.touch(mode=FILE_MODE)
        self.db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives a power cut, which an acknowledged C-STORE needs.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so it cannot deadlock later."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- receive -------------------------------------------------------------------------------

    def copies_of(self, sop_instance_uid: str) -> dict[int, Path]:
        """The stored copies of an instance (more than one after a conflict), by row id."""
        rows = self.db.execute(
            "SELECT id, path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchall()
        return {r["id"]: Path(r["path"]) for r in rows}

    def record_instance(self, rec: InstanceRecord, same_content: Callable[[Path], bool],
                        compared: Collection[int] = (), now: float | None = None) -> Recorded:
        """Index a stored file and (re)open its study; idempotent for an identical re-send.

        Content is compared only when the SOP Instance UID is already known (``same_content``
        tells whether a stored copy holds the same dataset); ``compared`` are the copies the
        caller already found different. Inside the write transaction, so that two associations
        storing the same instance at once index it once.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            known = db.execute(
                "SELECT id, path FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
            ).fetchall()
            if any(r["id"] not in compared and same_content(Path(r["path"])) for r in known):
                return Recorded("duplicate")
            conflict = bool(known)
            db.execute(
                """INSERT INTO instances (sop_instance_uid, study_uid, series_uid,
                   sop_class_uid, transfer_syntax, modality, body_part, view_position, view,
                   instance_number, path, size, received_at, calling_ae, peer, conflict)
                   VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                (
                    rec.sop_instance_uid, rec.study_uid, rec.series_uid,
                    rec.sop_class_uid, rec.transfer_syntax, rec.modality, rec.body_part,
                    rec.view_position, rec.view, rec.instance_number, rec.path, rec.size, now,
                    rec.calling_ae, rec.peer, int(conflict),
                ),
            )
            reopened = self._reopen_study(db, rec.study_uid, now)
        return Recorded("conflict" if conflict else "stored", reopened)

    def _reopen_study(self, db: sqlite3.Connection, study_uid: str, now: float) -> Study | None:
        """Open a new study, or a new revision of one that had left ``receiving`` (returned)."""
        row = db.execute(
            "SELECT state, revision FROM studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        if row is None:
            db.execute(
                """INSERT INTO studies (study_uid, study_key, state, revision, first_received_at,
                   revision_started_at, last_received_at, state_changed_at)
                   VALUES (?, ?, 'receiving', 1, ?, ?, ?, ?)""",
                (study_uid, study_key(study_uid), now, now, now, now),
            )
            self._log_transition(db, study_uid, 1, StudyState.RECEIVING, None, now)
            return None
        if row["state"] == StudyState.RECEIVING:
            db.execute(
                "UPDATE studies SET last_received_at = ? WHERE study_uid = ?", (now, study_uid)
            )
            return None
        reason = f"new instance arrived while {row['state']}; drafting again with all images"
        self._change(db, study_uid, StudyState(row["state"]), row["revision"],
                     StudyState.RECEIVING, reason, now, reopen=True)
        return _study(db.execute("SELECT * FROM studies WHERE study_uid = ?",
                                 (study_uid,)).fetchone())

    # --- study state machine -------------------------------------------------------------------

    def transition(
        self,
        db: sqlite3.Connection,
        study: Study,
        to: StudyState,
        reason: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Move ``study`` on if it is still in the state and revision the caller saw.

        Returns False when the study has moved meanwhile (another stage, a new revision); raises
        StateError when ``to`` is not a state the study may go to from the one the caller saw.
        """
        now = time.time() if now is None else now
        return self._change(db, study.study_uid, study.state, study.revision, to, reason, now)

    def _change(
        self, db: sqlite3.Connection, study_uid: str, seen: StudyState, revision: int,
        to: StudyState, reason: str | None, now: float, *, reopen: bool = False,
    ) -> bool:
        """The one place a study's state is written: the edge checked, then compare-and-set on
        (state, revision), then the step recorded in ``transitions``, in the caller's transaction.

        ``reopen`` is the new-revision edge: back to ``receiving`` from any other state.
        """
        allowed = ({StudyState.RECEIVING} - {seen}) if reopen else EDGES[seen]
        if to not in allowed:
            raise StateError(
                f"study {study_key(study_uid)}: {seen.value} -> {StudyState(to).value} is not a "
                f"state change the pipeline makes (from {seen.value}: "
                f"{', '.join(sorted(s.value for s in allowed)) or 'none'})"
            )
        if reopen:
            revision += 1
            cur = db.execute(
                """UPDATE studies SET state = ?, revision = ?, reason = ?,
                   revision_started_at = ?, last_received_at = ?, state_changed_at = ?
                   WHERE study_uid = ? AND state = ? AND revision = ?""",
                (to, revision, reason, now, now, now, study_uid, seen, revision - 1),
            )
        else:
            cur = db.execute(
                """UPDATE studies SET state = ?, reason = ?, state_changed_at = ?
                   WHERE study_uid = ? AND state = ? AND revision = ?""",
                (to, reason, now, study_uid, seen, revision),
            )
        if cur.rowcount != 1:
            return False
        self._log_transition(db, study_uid, revision, to, reason, now)
        return True

    @staticmethod
    def _log_transition(
        db: sqlite3.Connection, study_uid: str, revision: int, state: StudyState,
        reason: str | None, now: float,
    ) -> None:
        db.execute(
            "INSERT INTO transitions (study_uid, revision, state, reason, at) VALUES (?,?,?,?,?)",
            (study_uid, revision, state, reason, now),
        )

    def move(self, study: Study, to: StudyState, reason: str | None = None) -> bool:
        """``transition`` in a transaction of its own."""
        with self.transaction() as db:
            return self.transition(db, study, to, reason)

    # --- reads ---------------------------------------------------------------------------------

    def study(self, uid_or_key: str) -> Study | None:
        row = self.db.execute(
            "SELECT * FROM studies WHERE study_uid = ? OR study_key = ?", (uid_or_key, uid_or_key)
        ).fetchone()
        return _study(row) if row else None

    def studies(self, states: Sequence[StudyState] | None = None, limit: int = 0) -> list[Study]:
        sql, args = "SELECT * FROM studies", []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = list(states)
        sql += " ORDER BY last_received_at DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [_study(r) for r in self.db.execute(sql, args)]

    def instances(self, study_uid: str) -> list[sqlite3.Row]:
        """The study's instances, the latest copy of each SOP Instance UID only."""
        return self.db.execute(
            """SELECT * FROM instances i WHERE study_uid = ? AND id = (
                   SELECT MAX(id) FROM instances j WHERE j.sop_instance_uid = i.sop_instance_uid)
               ORDER BY id""",
            (study_uid,),
        ).fetchall()

    def history(self, study_uid: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM transitions WHERE study_uid = ? ORDER BY id", (study_uid,)
        ).fetchall()

    def counts_by_state(self) -> dict[str, int]:
        return {
            r["state"]: r["n"]
            for r in self.db.execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        }


def _study(row: sqlite3.Row) -> Study:
    return Study(
        study_uid=row["study_uid"],
        study_key=row["study_key"],
        state=StudyState(row["state"]),
        revision=row["revision"],
        reason=row["reason"],
        first_received_at=row["first_received_at"],
        revision_started_at=row["revision_started_at"],
        last_received_at=row["last_received_at"],
        state_changed_at=row["state_changed_at"],
    )
