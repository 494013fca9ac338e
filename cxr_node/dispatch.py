"""Dispatch: a durable outbox that delivers each draft to every configured destination.

The Reporter writes the SR file (and the renditions some destination asked for), its ``reports``
row and one ``outbox`` row per destination in one transaction (``Outbox.enqueue``). This stage then
sends each row on its own and keeps the books:

    pending --(marked before the peer is called)--> sending --> delivered
       ^                                               |------> dead (with the reason)
       '------ retry, exponential backoff -------------'

A row is committed as ``sending`` before the peer hears anything, so a node killed at any moment
finds it at the next start and sends the same files again: same SOP Instance UIDs (or the same
message), so the peer keeps at most one copy, and never none. Destinations (``cxr_node.destinations``,
one module per kind) only talk to their peer and answer delivered / retry / dead; the outbox owns
attempts, backoff, dead letters and the study's state (``sent`` when every destination of its
newest draft has it, ``failed`` naming the destination that gave up).

Each destination has lanes of its own (threads that drain its due rows), so a peer that hangs
until its timeout never delays the copy into a folder or another PACS.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
import structlog

from cxr_node import audit, destinations
from cxr_node.config import Config, DispatchConfig
from cxr_node.destinations import Delivery, Destination, Draft, Rendition
from cxr_node.logs import study_key
from cxr_node.report import draft_note
from cxr_node.store import Store, Study, StudyState

log = structlog.get_logger("cxr_node.dispatch")

RowState = Literal["pending", "sending", "delivered", "dead", "superseded"]
ROW_STATES: tuple[RowState, ...] = ("pending", "sending", "delivered", "dead", "superseded")
WAITING_OR_FAILED: tuple[RowState, ...] = ("pending", "sending", "dead")

# A study failed by dispatch carries this reason prefix; `requeue` only reopens those.
FAILED_BY_DISPATCH = "dispatch to "
MAX_JITTER = 0.1  # backoff is stretched by up to 10 %, so rows that failed together spread out


# --- the outbox --------------------------------------------------------------------------------


def backoff_seconds(attempts: int, settings: DispatchConfig, jitter: float = 0.0) -> float:
    """Wait after the ``attempts``-th failed send: initial, doubling per attempt, capped."""
    if attempts < 1:
        raise ValueError(f"attempts: expected at least 1, got {attempts}")
    if not 0 <= jitter <= MAX_JITTER:
        raise ValueError(f"jitter: expected 0 to {MAX_JITTER}, got {jitter}")
    base = settings.backoff_initial_seconds * 2.0 ** min(attempts - 1, 64)
    return min(settings.backoff_max_seconds, base * (1 + jitter))


@dataclass(frozen=True)
class _Claim:
    """One outbox row, marked ``sending``, with what it takes to send it and to log it."""

    id: int
    sr_uid: str
    study_uid: str
    study: str
    destination: str
    attempts: int
    path: str | None


class Outbox:
    """The dispatch stage: sends due outbox rows on lanes per destination, and keeps the books.

    A DICOM destination gets ``associations`` lanes (a PACS takes several SRs at once); each lane
    claims its row in a transaction of its own, so no row is ever sent by two lanes.
    """

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self.settings = config.dispatch
        self.store = store
        self.clock = clock
        self.destinations: dict[str, Destination] = {
            d.name: destinations.make(d, config.node.ae_title) for d in config.destinations
        }
        self._settings = {d.name: d for d in config.destinations}
        self._lane_counts = {d.name: d.lanes for d in config.destinations}
        self._lanes: dict[tuple[str, int], threading.Thread] = {}
        self._lock = threading.Lock()
        self._sending: set[int] = set()  # rows a lane of this process is sending right now
        self._finished = 0

    @staticmethod
    def enqueue(db: sqlite3.Connection, *, sr_uid: str, study_uid: str,
                destinations: Sequence[str], now: float | None = None) -> int:
        """Queue an SR for each destination, inside the caller's transaction; idempotent.

        With no destination configured nothing is queued and the draft stays 'reported', kept
        on the node only.
        """
        if not all(isinstance(d, str) and d for d in destinations):
            raise ValueError(f"destinations: expected names, got {list(destinations)!r}")
        now = time.time() if now is None else now
        added = 0
        for name in dict.fromkeys(destinations):
            added += db.execute(
                """INSERT OR IGNORE INTO outbox (sr_uid, study_uid, destination, state,
                   next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)""",
                (sr_uid, study_uid, name, now, now, now),
            ).rowcount
        return added

    def step(self) -> int:
        """Start a lane for each destination with due rows; the rows finished since last step.

        Lanes run on their own threads, so this returns at once; ``wait`` joins them.
        """
        self._resume_orphans()
        for name in self._due_destinations():
            for index in range(self._lane_counts.get(name, 1)):
                lane = self._lanes.get((name, index))
                if lane is None or not lane.is_alive():
                    lane = threading.Thread(target=self._drain, args=(name,), daemon=True,
                                            name=f"dispatch-{name}-{index}")
                    self._lanes[(name, index)] = lane
                    lane.start()
        with self._lock:
            finished, self._finished = self._finished, 0
        return finished

    def wait(self, timeout: float | None = None) -> bool:
        """Join the running lanes; True when none is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for lane in list(self._lanes.values()):
            lane.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(lane.is_alive() for lane in self._lanes.values())

    def _resume_orphans(self) -> None:
        """Rows in 'sending' that no lane here is sending go out again now, the same file.

        At the first step these are the rows a killed node left behind; later, a row whose lane
        failed before its bookkeeping. The SR keeps its SOP Instance UID, so the PACS ends up
        with one copy: at most one, never none.
        """
        marked = {r[0] for r in self.store.db.execute(
            "SELECT id FROM outbox WHERE state = 'sending'")}
        with self._lock:
            if not marked - self._sending:
                return
        now = self.clock()
        with self.store.transaction() as db:
            # Under the write lock: every committed claim's id is in _sending (added before commit).
            with self._lock:
                busy = list(self._sending)
            count = db.execute(
                f"""UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ?
                    WHERE state = 'sending' AND id NOT IN ({','.join('?' * len(busy))})""",
                (now, now, *busy),
            ).rowcount
        if count:
            log.warning("outbox.resumed", rows=count,
                        reason="interrupted while sending; sending the same SR again")

    def _due_destinations(self) -> list[str]:
        return [r["destination"] for r in self.store.db.execute(
            """SELECT DISTINCT destination FROM outbox
               WHERE state = 'pending' AND next_attempt_at <= ?""", (self.clock(),))]

    def _drain(self, name: str) -> None:
        try:
            while (claim := self._claim(name)) is not None:
                try:
                    self._record(claim, self._send(claim))
                finally:
                    with self._lock:
                        self._sending.discard(claim.id)
                        self._finished += 1
        except Exception:
            log.exception("outbox.lane_error", destination=name)
        finally:
            self.store.close()  # this thread's connection

    def _claim(self, name: str) -> _Claim | None:
        """Mark the destination's oldest due row 'sending' and commit before any peer hears of it.

        A row still waiting for a draft that a newer draft of its study has replaced is not sent
        at all ('superseded'): sent late, it would land after the newer one, and a RIS that keeps
        the last result of an order would show the older draft.
        """
        now = self.clock()
        with self.store.transaction() as db:
            retired = db.execute(
                """UPDATE outbox SET state = 'superseded', updated_at = ?,
                   reason = 'a newer draft of the study replaces it' WHERE destination = ?
                   AND state = 'pending' AND EXISTS (
                       SELECT 1 FROM reports mine JOIN reports newer
                       ON newer.study_uid = mine.study_uid AND newer.revision > mine.revision
                       WHERE mine.sr_uid = outbox.sr_uid)
                   RETURNING study_uid, sr_uid""", (now, name)).fetchall()
            row = db.execute(
                """SELECT o.id, o.sr_uid, o.study_uid, o.destination, o.attempts, r.path,
                          s.study_key
                   FROM outbox o LEFT JOIN reports r ON r.sr_uid = o.sr_uid
                                 LEFT JOIN studies s ON s.study_uid = o.study_uid
                   WHERE o.destination = ? AND o.state = 'pending' AND o.next_attempt_at <= ?
                   ORDER BY o.next_attempt_at, o.id LIMIT 1""",
                (name, now),
            ).fetchone()
            if row is not None:
                db.execute(
                    """UPDATE outbox SET state = 'sending', attempts = attempts + 1,
                       updated_at = ? WHERE id = ?""",
                    (now, row["id"]),
                )
                with self._lock:
                    self._sending.add(row["id"])
        for old in retired:
            log.info("outbox.superseded", destination=name, study=study_key(old["study_uid"]))
            audit.record("outbox.superseded", old["study_uid"], destination=name,
                         sr_uid=old["sr_uid"], reason="a newer draft of the study replaces it")
        if row is None:
            return None
        return _Claim(id=row["id"], sr_uid=row["sr_uid"], study_uid=row["study_uid"],
                      study=row["study_key"] or study_key(row["study_uid"]),
                      destination=name, attempts=row["attempts"] + 1, path=row["path"])

    def _draft(self, claim: _Claim) -> tuple[Draft, dict[str, str]]:
        """The claimed draft's documents (the SR, and the renditions built for it), and why any
        rendition could not be built."""
        documents: dict[Rendition, Path] = {}
        problems: dict[str, str] = {}
        if claim.path is not None:
            documents["sr"] = Path(claim.path)
        for row in self.store.db.execute(
                "SELECT rendition, path, problem FROM documents WHERE sr_uid = ?",
                (claim.sr_uid,)):
            if row["path"]:
                documents[row["rendition"]] = Path(row["path"])
            else:
                problems[row["rendition"]] = row["problem"]
        return Draft(claim.sr_uid, claim.study, documents), problems

    def _send(self, claim: _Claim) -> Delivery:
        destination = self.destinations.get(claim.destination)
        if destination is None:
            return Delivery.dead(f"destination {claim.destination} is no longer configured")
        draft, problems = self._draft(claim)
        wanted = getattr(self._settings[claim.destination], "renditions", ("sr",))
        failed = [f"the {r} rendition could not be built: {problems[r]}"
                  for r in wanted if r in problems]
        if failed:
            return Delivery.dead("; ".join(failed))
        lacking = [r for r in wanted if r not in draft.documents]
        if lacking:  # a destination that asked for a rendition after this draft was built
            return Delivery.dead(f"the draft has no {', '.join(lacking)} rendition: it was "
                                 "built before the destination asked for it")
        missing = [r for r, path in draft.documents.items() if not path.is_file()]
        if "sr" not in draft.documents or missing:
            return Delivery.dead(f"the {', '.join(missing) or 'sr'} file is missing from the "
                                 "reports folder")
        try:
            return destination.send(draft)
        except pydicom.errors.InvalidDicomError:
            return Delivery.dead("a file of the draft is not readable as DICOM")
        except Exception as exc:  # a destination's bug must not stop the lane; retries are bounded
            log.exception("outbox.send_error", destination=claim.destination, study=claim.study)
            return Delivery.retry(f"unexpected {type(exc).__name__} while sending")

    def _record(self, claim: _Claim, delivery: Delivery) -> None:
        now = self.clock()
        wait = 0.0
        if delivery.outcome == "retry" and claim.attempts >= self.settings.max_attempts:
            delivery = Delivery.dead(
                f"gave up after {claim.attempts} attempts; last: {delivery.reason}",
                delivery.status,
            )
        with self.store.transaction() as db:
            if delivery.outcome == "delivered":
                db.execute(
                    """UPDATE outbox SET state = 'delivered', delivered_at = ?, updated_at = ?,
                       last_status = ?, reason = ? WHERE id = ?""",
                    (now, now, delivery.status_hex, delivery.reason or None, claim.id),
                )
            elif delivery.outcome == "retry":
                wait = backoff_seconds(claim.attempts, self.settings,
                                       random.uniform(0, MAX_JITTER))
                db.execute(
                    """UPDATE outbox SET state = 'pending', next_attempt_at = ?, updated_at = ?,
                       last_status = ?, reason = ? WHERE id = ?""",
                    (now + wait, now, delivery.status_hex, delivery.reason, claim.id),
                )
            else:
                db.execute(
                    """UPDATE outbox SET state = 'dead', updated_at = ?, last_status = ?,
                       reason = ? WHERE id = ?""",
                    (now, delivery.status_hex, delivery.reason, claim.id),
                )
            moved = self._settle_study(db, claim, delivery, now)
        fields = dict(destination=claim.destination, study=claim.study, attempts=claim.attempts,
                      status=delivery.status_hex, reason=delivery.reason or None)
        if delivery.outcome == "delivered":
            warned = delivery.status not in (None, 0x0000)  # the PACS kept it, with a warning
            (log.warning if warned else log.info)("outbox.delivered", **fields)
        elif delivery.outcome == "retry":
            log.warning("outbox.retry", retry_in=round(wait, 3), **fields)
        else:
            log.error("outbox.dead", **fields)
        audit.delivery(claim, delivery, now)
        if moved:
            study, to, reason = moved
            (log.error if to == StudyState.FAILED else log.info)(
                "study.state", study=study.study_key, revision=study.revision, state=to,
                reason=reason)
            audit.study_state(study, to, reason, now)

    def _settle_study(self, db: sqlite3.Connection, claim: _Claim, delivery: Delivery,
                      now: float) -> tuple[Study, StudyState, str | None] | None:
        """reported -> sent when the newest draft reached every destination; -> failed if one died.

        Only the study's newest SR counts (a new revision may keep an earlier draft when the model
        would read the same images). CAS on state and revision: a study that moved on meanwhile
        is left alone. Answers the move made, if any, for the log.
        """
        if delivery.outcome == "retry":
            return None
        study = self.store.study(claim.study_uid)
        if study is None or study.state != StudyState.REPORTED:
            return None
        newest = _newest_report(db, claim.study_uid)
        if newest is None or newest["sr_uid"] != claim.sr_uid:
            return None
        if delivery.outcome == "dead":
            to, reason = StudyState.FAILED, (
                f"{FAILED_BY_DISPATCH}{claim.destination} failed: {delivery.reason}")
        elif db.execute("SELECT COUNT(*) FROM outbox WHERE sr_uid = ? AND state != 'delivered'",
                        (claim.sr_uid,)).fetchone()[0] == 0:
            # sent keeps what the report stage noted about the draft (values copied as they are)
            to, reason = StudyState.SENT, draft_note(self.store.history(study.study_uid),
                                                     study.revision)
        else:
            return None
        return (study, to, reason) if self.store.transition(db, study, to, reason, now) else None


def _newest_report(db: sqlite3.Connection, study_uid: str) -> sqlite3.Row | None:
    return db.execute(
        """SELECT sr_uid FROM reports WHERE study_uid = ?
           ORDER BY revision DESC, created_at DESC LIMIT 1""",
        (study_uid,),
    ).fetchone()


# --- for the command line ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxRow:
    """One outbox row as an admin sees it: no patient or study identifiers, the study's key."""

    id: int
    study: str
    destination: str
    state: RowState
    attempts: int
    next_attempt_at: float | None
    last_status: str | None
    reason: str | None
    created_at: float
    delivered_at: float | None

    COLUMNS = ("id", "study", "destination", "state", "attempts", "next attempt", "status",
               "reason")

    def cells(self, now: float | None = None) -> tuple[str, ...]:
        """The row as text, for a table under ``COLUMNS``; the next attempt relative to now."""
        now = time.time() if now is None else now
        if self.next_attempt_at is None:
            when = ""
        elif self.next_attempt_at <= now:
            when = "now"
        else:
            when = f"in {self.next_attempt_at - now:.0f} s"
        return (str(self.id), self.study, self.destination, self.state, str(self.attempts), when,
                self.last_status or "", self.reason or "")


def outbox_rows(store: Store, states: Sequence[str] | None = None) -> list[OutboxRow]:
    """Outbox rows in ``states`` (default: what still waits or failed), oldest first."""
    wanted = tuple(states) if states else WAITING_OR_FAILED
    unknown = [s for s in wanted if s not in ROW_STATES]
    if unknown:
        raise ValueError(f"states: unknown {unknown}; expected some of {list(ROW_STATES)}")
    rows = store.db.execute(
        f"""SELECT o.*, s.study_key FROM outbox o LEFT JOIN studies s ON s.study_uid = o.study_uid
            WHERE o.state IN ({','.join('?' * len(wanted))}) ORDER BY o.id""",
        wanted,
    ).fetchall()
    return [
        OutboxRow(
            id=r["id"], study=r["study_key"] or study_key(r["study_uid"]),
            destination=r["destination"], state=r["state"], attempts=r["attempts"],
            next_attempt_at=r["next_attempt_at"] if r["state"] == "pending" else None,
            last_status=r["last_status"], reason=r["reason"], created_at=r["created_at"],
            delivered_at=r["delivered_at"],
        )
        for r in rows
    ]


def requeue(store: Store, row_id: int | None = None, all_failed: bool = False,
            now: float | None = None) -> int:
    """Send a dead (or waiting) row again now with fresh attempts, or every dead row.

    A study that dispatch had failed goes back to 'reported', so that delivery can complete it.
    The row keeps its last status and reason until the next attempt replaces them.
    """
    if (row_id is None) == (not all_failed):
        raise ValueError("give either a row id or all_failed=True")
    now = time.time() if now is None else now
    with store.transaction() as db:
        if row_id is not None:
            rows = db.execute(
                "SELECT * FROM outbox WHERE id = ? AND state IN ('dead', 'pending')", (row_id,)
            ).fetchall()
        else:
            rows = db.execute("SELECT * FROM outbox WHERE state = 'dead'").fetchall()
        for row in rows:
            db.execute(
                """UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,
                   updated_at = ? WHERE id = ?""",
                (now, now, row["id"]),
            )
            _reopen_study(store, db, row, now)
    for row in rows:
        log.info("outbox.requeued", destination=row["destination"],
                 study=study_key(row["study_uid"]), was=row["state"],
                 status=row["last_status"], reason=row["reason"])
        audit.outbox_requeued(row)
    return len(rows)


def _reopen_study(store: Store, db: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
    study = store.study(row["study_uid"])
    if (study is None or study.state != StudyState.FAILED
            or not (study.reason or "").startswith(FAILED_BY_DISPATCH)):
        return
    newest = _newest_report(db, row["study_uid"])
    if newest is None or newest["sr_uid"] != row["sr_uid"]:
        return
    if store.transition(db, study, StudyState.REPORTED, "outbox re-queued", now):
        log.info("study.state", study=study.study_key, revision=study.revision,
                 state=StudyState.REPORTED, reason="outbox re-queued")
        audit.study_state(study, StudyState.REPORTED, "outbox re-queued")
