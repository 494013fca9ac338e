"""Retention: patient data leaves the node once nobody here needs it.

The node drafts; the PACS archives. Every image received, every draft SR and every row that
describes a study holds patient data, so a node that never deleted anything would become a second,
unmanaged archive of every chest X-ray, until its disk filled. The policy (``retention:``):

- A study is *finished* when it is ``sent``, ``skipped`` or ``failed``, or ``reported`` with nothing
  left to send; its age counts from then. Studies still in work are never touched.
- ``images_days`` after it finished, its spooled images are deleted with their index rows. A late
  instance of that study starts a new revision drafted from the images then present.
- ``studies_days`` after it finished, the rest goes: its draft SR files (and their PDF and page
  renditions) and every row of it (study, transitions, jobs with the draft text, reports, outbox,
  and the signed reports paired with its drafts, with their text: cxr_node/feedback.py).
- A signed report whose study the node does not hold (never drafted, or purged before the report
  came) goes ``studies_days`` after it was received.
- Quarantined datasets go after ``quarantine_days``, and the oldest first while the folder holds
  more than ``quarantine_max_mb``.
- The audit trail is not purged: it is the record of what was received, drafted, sent and purged,
  and holds UIDs but no patient names or IDs (rotate it with the site's log rotation).

Each purge is one transaction that checks again that the study is still finished and unchanged,
so an instance arriving meanwhile is never lost; files are deleted after the commit, and only
under the node's own folders. Every purge is a record in the audit trail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from cxr_node import audit
from cxr_node.config import Config
from cxr_node.durable import OutsideRoot, confined
from cxr_node.store import Store

log = structlog.get_logger("cxr_node.retention")

DAY = 86400.0
FINISHED = """(s.state IN ('sent', 'skipped', 'failed') OR (s.state = 'reported' AND NOT EXISTS (
    SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid AND o.state IN ('pending', 'sending'))))"""
STUDY_TABLES = ("instances", "transitions", "jobs", "documents", "reports", "outbox", "feedback",
                "draft_orders", "studies")
ORPHAN_FEEDBACK = """FROM feedback WHERE received_at < ? AND (study_uid IS NULL
    OR study_uid NOT IN (SELECT study_uid FROM studies))"""

What = Literal["images", "study"]


@dataclass(frozen=True)
class StudyPurge:
    """One finished study's images (``images``) or everything left of it (``study``)."""

    study_uid: str
    study_key: str
    state: str
    finished_at: float
    what: What
    files: tuple[Path, ...]

    def bytes(self) -> int:
        return sum(_size(p) for p in self.files)


@dataclass(frozen=True)
class QuarantinePurge:
    """Quarantined datasets (each with its note) that are too old or over the size limit."""

    files: tuple[Path, ...]
    reason: str

    def bytes(self) -> int:
        return sum(_size(p) for p in self.files)


@dataclass(frozen=True)
class FeedbackPurge:
    """Signed reports (rows, and a received SR's file) of studies the node does not hold."""

    cutoff: float
    reports: int
    files: tuple[Path, ...]

    def bytes(self) -> int:
        return sum(_size(p) for p in self.files)


@dataclass(frozen=True)
class Plan:
    studies: list[StudyPurge]
    quarantine: list[QuarantinePurge]
    feedback: list[FeedbackPurge]

    def __bool__(self) -> bool:
        return bool(self.studies or self.quarantine or self.feedback)

    def __len__(self) -> int:
        return len(self.studies) + len(self.quarantine) + len(self.feedback)


class Retention:
    """The retention stage: finds what the policy says is due and deletes it, at most once per
    ``retention.interval_minutes``."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self.config = config
        self.policy = config.retention
        self.store = store
        self.clock = clock
        self._next_run = 0.0

    def step(self) -> int:
        now = self.clock()
        if now < self._next_run:
            return 0
        self._next_run = now + self.policy.interval_minutes * 60
        return self.apply(self.plan(now))

    def seconds_until_due(self) -> float:
        return max(0.0, self._next_run - self.clock())

    # --- what is due ----------------------------------------------------------------------------

    def plan(self, now: float | None = None) -> Plan:
        now = self.clock() if now is None else now
        studies: list[StudyPurge] = []
        if self.policy.studies_days is not None:
            studies += self._due("study", now - self.policy.studies_days * DAY)
        if self.policy.images_days is not None:
            whole = {s.study_uid for s in studies}
            studies += [s for s in self._due("images", now - self.policy.images_days * DAY)
                        if s.study_uid not in whole]
        return Plan(studies, self._quarantine_due(now), self._feedback_due(now))

    def _due(self, what: What, cutoff: float) -> list[StudyPurge]:
        rows = self.store.db.execute(
            f"""SELECT s.study_uid, s.study_key, s.state, s.state_changed_at FROM studies s
                WHERE s.state_changed_at < ? AND {FINISHED}
                ORDER BY s.state_changed_at""", (cutoff,)).fetchall()
        due = []
        for row in rows:
            files = self._files(row["study_uid"], what)
            if what == "images" and not files:
                continue  # images already gone
            due.append(StudyPurge(row["study_uid"], row["study_key"], row["state"],
                                  row["state_changed_at"], what, tuple(files)))
        return due

    def _files(self, study_uid: str, what: What) -> list[Path]:
        db = self.store.db
        files = [Path(r["path"]) for r in db.execute(
            "SELECT path FROM instances WHERE study_uid = ?", (study_uid,))]
        if what == "study":
            files += [Path(r["path"]) for r in db.execute(
                """SELECT path FROM reports WHERE study_uid = ?
                   UNION ALL SELECT path FROM documents WHERE study_uid = ? AND path IS NOT NULL
                   UNION ALL SELECT path FROM feedback WHERE study_uid = ? AND path IS NOT NULL""",
                (study_uid, study_uid, study_uid))]
        return files

    def _feedback_due(self, now: float) -> list[FeedbackPurge]:
        if self.policy.studies_days is None:
            return []
        cutoff = now - self.policy.studies_days * DAY
        rows = self.store.db.execute(f"SELECT path {ORPHAN_FEEDBACK}", (cutoff,)).fetchall()
        files = tuple(Path(r["path"]) for r in rows if r["path"])
        return [FeedbackPurge(cutoff, len(rows), files)] if rows else []

    def _quarantine_due(self, now: float) -> list[QuarantinePurge]:
        folder = self.config.quarantine_dir
        if not folder.is_dir():
            return []
        entries = sorted(_quarantined(folder), key=lambda e: e[1])  # oldest first
        due: list[QuarantinePurge] = []
        kept = []
        for files, mtime in entries:
            if self.policy.quarantine_days is not None and \
                    mtime < now - self.policy.quarantine_days * DAY:
                due.append(QuarantinePurge(files, f"older than {self.policy.quarantine_days:g} "
                                                  "days (retention.quarantine_days)"))
            else:
                kept.append(files)
        if self.policy.quarantine_max_mb is not None:
            limit = self.policy.quarantine_max_mb * 2**20
            total = sum(_size(p) for files in kept for p in files)
            for files in kept:
                if total <= limit:
                    break
                total -= sum(_size(p) for p in files)
                due.append(QuarantinePurge(files, f"quarantine over "
                                                  f"{self.policy.quarantine_max_mb} MB "
                                                  "(retention.quarantine_max_mb), oldest first"))
        return due

    # --- deleting -------------------------------------------------------------------------------

    def apply(self, plan: Plan, by: str | None = None) -> int:
        """Carry out ``plan``; returns how many purges were done."""
        done = 0
        for purge in plan.studies:
            done += self._purge_study(purge, by)
        for feedback in plan.feedback:
            done += self._purge_feedback(feedback, by)
        for purge in plan.quarantine:
            size, removed = purge.bytes(), self._unlink(purge.files, self.config.quarantine_dir)
            if removed:
                log.info("retention.quarantine_purged", files=removed, bytes=size,
                         reason=purge.reason)
                audit.quarantine_purged(removed, size, purge.reason, by=by)
                done += 1
        return done

    def _purge_study(self, purge: StudyPurge, by: str | None) -> int:
        size = purge.bytes()
        with self.store.transaction() as db:
            still = db.execute(
                f"""SELECT 1 FROM studies s WHERE s.study_uid = ? AND s.state = ?
                    AND s.state_changed_at = ? AND {FINISHED}""",
                (purge.study_uid, purge.state, purge.finished_at)).fetchone()
            if still is None:  # a late instance reopened it, or an admin acted: next time
                return 0
            files = self._files(purge.study_uid, purge.what)
            tables = ("instances",) if purge.what == "images" else STUDY_TABLES
            for table in tables:
                db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (purge.study_uid,))
        removed = self._unlink(files, self.config.state_dir)
        log.info("retention.purged", study=purge.study_key, what=purge.what, state=purge.state,
                 files=removed, bytes=size)
        audit.study_purged(purge.study_uid, purge.what, purge.state, removed, size,
                           finished_at=purge.finished_at, by=by)
        return 1

    def _purge_feedback(self, purge: FeedbackPurge, by: str | None) -> int:
        """Signed reports of studies the node does not hold, as they are when it runs."""
        with self.store.transaction() as db:
            files = [Path(r["path"]) for r in db.execute(
                f"SELECT path {ORPHAN_FEEDBACK} AND path IS NOT NULL", (purge.cutoff,))]
            reports = db.execute(f"DELETE {ORPHAN_FEEDBACK}", (purge.cutoff,)).rowcount
        removed = self._unlink(files, self.config.state_dir)
        if not reports:
            return 0
        log.info("retention.feedback_purged", reports=reports, files=removed)
        audit.feedback_purged(reports, removed, by=by)
        return 1

    @staticmethod
    def _unlink(files: Iterable[Path], root: Path) -> int:
        """Delete files under ``root`` only: a path that resolves elsewhere is left and logged."""
        removed = 0
        for path in files:
            try:
                confined(path, root).unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OutsideRoot:
                log.error("retention.refused", reason=f"a recorded file is outside {root}")
            except OSError as exc:
                log.error("retention.unlink_failed", reason=exc.strerror)
        return removed


def _quarantined(folder: Path) -> list[tuple[tuple[Path, ...], float]]:
    """Each quarantined dataset with the files kept for it (its note), and its age."""
    groups: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith("."):
            groups.setdefault(path.stem, []).append(path)
    entries = []
    for files in groups.values():
        try:
            mtime = max(p.stat().st_mtime for p in files)
        except FileNotFoundError:
            continue
        entries.append((tuple(sorted(files)), mtime))
    return entries


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def describe(plan: Plan, now: float) -> Sequence[tuple[str, str, str, str, str]]:
    """One row per purge for `cxr-node purge`: what, which, finished/age, files, size."""
    rows = [(p.what, p.study_key, f"{p.state}, {(now - p.finished_at) / DAY:.0f} days ago",
             str(len(p.files)), _mb(p.bytes())) for p in plan.studies]
    rows += [("quarantine", f"{len(q.files)} file(s)", q.reason, str(len(q.files)),
              _mb(q.bytes())) for q in plan.quarantine]
    rows += [("signed reports", f"{f.reports} without a study",
              f"received over {(now - f.cutoff) / DAY:.0f} days ago", str(len(f.files)),
              _mb(f.bytes())) for f in plan.feedback]
    return rows


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
