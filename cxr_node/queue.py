"""Queue: hand stable studies to the GPU workers through Celery, and take their drafts back.

Only pixels and view names leave the node (workers.payload): no names, IDs, dates or UIDs. The
request id is the job's row id. A job is written (``pending``) before its task is sent, and marked
``queued`` after, so a crash in between sends it again on restart (a duplicate draft is harmless:
the first result for a job wins, and the SR's UIDs depend on the inputs, not on the run).

Batching: at most ``queue.max_in_flight`` tasks are outstanding; while they run, stable studies
wait, and the next task takes up to ``queue.batch_size`` of them into one ``generate`` call.

Results: each task's result is read on its own and checked against the contract
(workers.payload.DraftResult); a result that is unreadable or not the expected shape fails only the
studies of its task, each with a reason, and is forgotten. A draft is then checked by the node:
the worker's model must be the one the node expects (cxr_node.identity), and the text must be what
a preliminary draft may say (report.DraftReport: bounded, no sign-off). The stored result names the
node's model identity, not the worker's. Reasons name images by view and instance number (see
imaging.py), never by file name or UID.

Retries have one owner, this stage; the task never retries itself. A failed task (GPU out of
memory, a time limit, a broken model folder), a task a worker discarded because it could no longer
start in time, a task with no result after ``queue.result_timeout_seconds`` (a worker killed with
its message, a broker restart), or a draft the local worker was running when it died is submitted
again as a new attempt after ``queue.retry_delay_seconds`` (doubling), up to ``queue.max_attempts``
runs; then the study fails with a reason. Every task expires ``queue.start_timeout_seconds`` after
it is sent, and the result timeout is longer than that plus the hard time limit, so an attempt is
given up only once it can no longer run: two attempts of one study never run at once.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from cxr_node import audit
from cxr_node.adaptation.promote import unpromoted
from cxr_node.assemble import route
from cxr_node.config import Config
from cxr_node.decoder import DecoderProcess
from cxr_node.identity import ExpectedModel, IdentityError
from cxr_node.imaging import Candidate, ImagingError, View, select_images
from cxr_node.report import DraftReport, ReportError
from cxr_node.store import Store, Study, StudyState
from workers.payload import TASK_NAME, DraftRequest, DraftResult, encode_image, read_results

log = structlog.get_logger("cxr_node.queue")

IN_FLIGHT = ("queued", "drafting")
RESULT_POLL_SECONDS = 0.02
"""How often results are looked for while a task is out (a draft is the wait the user sees)."""
RETRY_DELAY_MAX_SECONDS = 300.0
BACKEND_DOWN = (OSError, RedisError, OperationalError)
"""Errors of the result backend itself (unreachable, refused, a disk error), not of a result."""
MAX_REASON = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


@dataclass(frozen=True)
class Inputs:
    """What the model is given for one study: the chosen images, and why others were left out."""

    images: list[dict[str, Any]]  # sop_instance_uid, instance_id (its stored copy), view, path
    dropped: list[list[str]]

    def key(self) -> list[tuple[str, int]]:
        return sorted((i["sop_instance_uid"], i["instance_id"]) for i in self.images)

    def to_json(self) -> str:
        return json.dumps({"images": self.images, "dropped": self.dropped})

    @classmethod
    def from_json(cls, text: str) -> Inputs:
        data = json.loads(text)
        return cls(images=data["images"], dropped=data["dropped"])


class DraftQueue:
    """The queue stage: stable -> queued -> drafting -> drafted (or failed with a reason)."""

    def __init__(self, config: Config, store: Store, app: Celery | None = None,
                 clock: Callable[[], float] = time.time):
        from workers.app import make_celery

        self.config = config
        self.store = store
        self.app = app or make_celery(config)
        self.clock = clock
        self.model = ExpectedModel(config.model, config.model_path,
                                   refusal=lambda: unpromoted(config, store.db))
        self._next_retry_at: float | None = None
        self._pixels: dict[int, list[Any]] = {}  # job id -> prepared images, until sent
        self._decoder = DecoderProcess(config.limits)  # decoding never runs in this process
        self._awaiting = False

    def step(self) -> int:
        moved = self._collect() + self._expire() + self._claim() + self._send()
        self._awaiting = self.store.db.execute(
            f"SELECT 1 FROM jobs WHERE state IN {IN_FLIGHT} LIMIT 1").fetchone() is not None
        return moved

    def seconds_until_due(self) -> float | None:
        """Look for results more often than the poll interval while a task is out, and send a
        retry when its delay is over."""
        due = [] if self._next_retry_at is None else [self._next_retry_at - self.clock()]
        if self._awaiting:
            due.append(RESULT_POLL_SECONDS)
        return min(due, default=None)

    # --- stable -> queued ----------------------------------------------------------------------

    def _claim(self) -> int:
        q = self.config.queue
        in_flight = self.store.db.execute(
            f"SELECT COUNT(DISTINCT task_id) FROM jobs WHERE state IN {IN_FLIGHT}").fetchone()[0]
        pending = self.store.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()[0]
        room = (q.max_in_flight - in_flight) * q.batch_size - pending
        studies = sorted(self.store.studies([StudyState.STABLE]), key=lambda s: s.state_changed_at)
        claimed = 0
        for study in studies[: max(room, 0)]:
            claimed += self._claim_one(study)
        return claimed

    def _claim_one(self, study: Study) -> int:
        eligible = route(self.store.instances(study.study_uid), self.config.study.rules).eligible
        by_uid = {row["sop_instance_uid"]: row for row in eligible}
        candidates = [Candidate(row["sop_instance_uid"], Path(row["path"]), View(row["view"]),
                                row["instance_number"], row["id"]) for row in eligible]
        try:
            selection = select_images(candidates, self.config.model.image_size,
                                      self.config.model.max_images, self._decoder.prepare)
        except ImagingError as exc:
            return self._fail(study, f"no usable image: {exc}")
        inputs = Inputs(
            images=[{"sop_instance_uid": img.sop_instance_uid, "view": img.view.value,
                     "instance_id": by_uid[img.sop_instance_uid]["id"],
                     "path": by_uid[img.sop_instance_uid]["path"]} for img in selection.images],
            dropped=[list(d) for d in selection.dropped],
        )
        earlier = self._reported_inputs(study)
        with self.store.transaction() as db:
            if earlier is not None and earlier[0].key() == inputs.key():
                moved = self.store.transition(db, study, earlier[1], reason=(
                    "new instance does not change what the model reads; the earlier draft stands"))
                if moved:
                    audit.study_state(study, earlier[1], "the earlier draft stands")
                return int(moved)
            if not self.store.transition(db, study, StudyState.QUEUED,
                                         reason=f"{len(inputs.images)} image(s) to draft"):
                return 0
            job_id = self._new_job(db, study, attempt=1, inputs=inputs)
        self._pixels[job_id] = selection.images
        log.info("study.state", study=study.study_key, revision=study.revision, state="queued",
                 images=[i["view"] for i in inputs.images], dropped=len(inputs.dropped))
        audit.study_state(study, StudyState.QUEUED, job=job_id,
                          views=[i["view"] for i in inputs.images])
        return 1

    def _reported_inputs(self, study: Study) -> tuple[Inputs, StudyState] | None:
        """Inputs of the study's newest report, and the state that report had reached."""
        row = self.store.db.execute(
            """SELECT j.inputs, r.sr_uid, r.revision FROM reports r JOIN jobs j ON j.id = r.job_id
               WHERE r.study_uid = ? ORDER BY r.revision DESC LIMIT 1""", (study.study_uid,)).fetchone()
        if row is None:
            return None
        undelivered = self.store.db.execute(
            "SELECT COUNT(*) FROM outbox WHERE sr_uid = ? AND state != 'delivered'",
            (row["sr_uid"],)).fetchone()[0]
        sent = self.config.destinations and not undelivered
        return Inputs.from_json(row["inputs"]), StudyState.SENT if sent else StudyState.REPORTED

    def _new_job(self, db: sqlite3.Connection, study: Study, attempt: int, inputs: Inputs) -> int:
        cur = db.execute(
            """INSERT INTO jobs (study_uid, revision, attempt, state, task_id, inputs, created_at)
               VALUES (?, ?, ?, 'pending', '', ?, ?)""",
            (study.study_uid, study.revision, attempt, inputs.to_json(), self.clock()))
        return int(cur.lastrowid)

    # --- pending -> sent to the broker ---------------------------------------------------------

    def _send(self) -> int:
        now = self.clock()
        waiting = self.store.db.execute(
            "SELECT * FROM jobs WHERE state = 'pending' ORDER BY id").fetchall()
        jobs = [job for job in waiting if self._send_at(job) <= now]
        self._next_retry_at = min((self._send_at(j) for j in waiting if self._send_at(j) > now),
                                  default=None)
        size = self.config.queue.batch_size
        for start in range(0, len(jobs), size):
            self._send_batch(jobs[start:start + size])
        return len(jobs)

    def _send_batch(self, jobs: Sequence[sqlite3.Row]) -> None:
        requests, sendable = [], []
        for job in jobs:
            try:
                requests.append(self._request(job).to_dict())
                sendable.append(job)
            except ImagingError as exc:
                self._finish(job, None, f"image no longer readable: {exc}")
        if not requests:
            return
        task_id = str(uuid.uuid4())
        # expires: a worker that gets the task later than this discards it unrun (see _expire)
        self.app.send_task(TASK_NAME, args=[requests], task_id=task_id,
                           queue=self.config.queue.name,
                           expires=self.config.queue.start_timeout_seconds)
        now = self.clock()
        with self.store.transaction() as db:
            for job in sendable:
                db.execute("UPDATE jobs SET state = 'queued', task_id = ?, submitted_at = ? "
                           "WHERE id = ? AND state = 'pending'", (task_id, now, job["id"]))
        log.info("draft.submitted", task=task_id, studies=len(sendable))

    def _request(self, job: sqlite3.Row) -> DraftRequest:
        inputs = Inputs.from_json(job["inputs"])
        max_side = self.config.model.image_size
        prepared = self._pixels.pop(job["id"], None)
        pixels = ([img.pixels for img in prepared] if prepared is not None
                  else [self._decoder.prepare(Path(i["path"]), max_side) for i in inputs.images])
        images = tuple(encode_image(p, i["view"], max_side)
                       for p, i in zip(pixels, inputs.images, strict=True))
        indication = self._indication(inputs) if self.config.model.send_indication else None
        return DraftRequest(request_id=f"job-{job['id']}", images=images, indication=indication)

    @staticmethod
    def _indication(inputs: Inputs) -> str | None:
        """The reason for the request, from the frontal image's header, when configured to send it."""
        import pydicom

        ds = pydicom.dcmread(inputs.images[0]["path"], stop_before_pixels=True, force=True)
        requests = ds.get("RequestAttributesSequence") or []
        for source in [*requests, ds]:
            value = source.get("ReasonForTheRequestedProcedure")
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    # --- results -------------------------------------------------------------------------------

    def _collect(self) -> int:
        tasks: dict[str, list[sqlite3.Row]] = defaultdict(list)
        for job in self.store.db.execute(f"SELECT * FROM jobs WHERE state IN {IN_FLIGHT}"):
            tasks[job["task_id"]].append(job)
        return sum(self._collect_task(self.app.AsyncResult(task_id), jobs)
                   for task_id, jobs in tasks.items())

    def _collect_task(self, result: AsyncResult, jobs: Sequence[sqlite3.Row]) -> int:
        """Take one task's outcome. Whatever its result holds costs this task's studies only."""
        try:
            state = result.state
            value = result.result if state in ("SUCCESS", "FAILURE") else None
            failure = f"{type(value).__name__}: {value}" if state == "FAILURE" else ""
        except BACKEND_DOWN:
            raise  # not the result's fault: the stage backs off and every result waits
        except Exception as exc:  # noqa: BLE001 - anything a forged or torn result makes Celery raise
            for job in jobs:
                self._finish(job, None, f"the task's result cannot be read ({type(exc).__name__})")
            self._forget(result)
            return len(jobs)
        if state == "STARTED":
            self._started([j for j in jobs if j["state"] == "queued"])
            return 0
        if state == "SUCCESS":
            answers = read_results(value, [f"job-{job['id']}" for job in jobs])
            for job in jobs:
                answer = answers[f"job-{job['id']}"]
                if isinstance(answer, DraftResult):
                    self._finish(job, answer, None)
                else:
                    self._finish(job, None, answer)
        elif state in ("FAILURE", "REVOKED"):
            reason = (_plain(f"draft task failed: {failure}") if state == "FAILURE" else
                      "a worker discarded the task unrun: it could not start within "
                      f"{self.config.queue.start_timeout_seconds} s of being sent "
                      "(queue.start_timeout_seconds)")
            for job in jobs:
                self._retry(job, reason)
        else:
            return 0  # PENDING, RETRY or anything else: the result timeout looks after it
        self._forget(result)
        return len(jobs)

    @staticmethod
    def _forget(result: AsyncResult) -> None:
        """Delete a taken result from the backend; its jobs have left 'queued' either way."""
        try:
            result.forget()
        except Exception as exc:  # noqa: BLE001 - a result we cannot delete is never read again
            log.warning("draft.result_not_forgotten", task=result.id, error=type(exc).__name__)

    def _started(self, jobs: Sequence[sqlite3.Row]) -> None:
        now = self.clock()
        with self.store.transaction() as db:
            for job in jobs:
                db.execute("UPDATE jobs SET state = 'drafting', started_at = ? WHERE id = ?",
                           (now, job["id"]))
                study = self._study_at(job, StudyState.QUEUED)
                if study:
                    self.store.transition(db, study, StudyState.DRAFTING, now=now)

    def _finish(self, job: sqlite3.Row, result: DraftResult | None, problem: str | None) -> None:
        """Record a job's outcome; only the study's current revision moves on.

        A draft is kept only if its worker ran the model the node expects and its text is what a
        preliminary draft may say; what is stored names the node's model identity.
        """
        now = self.clock()
        if result is not None and result.ok and problem is None:
            try:
                result = result.model_copy(update={"model": self.model.identity_for(result.model)})
                DraftReport.from_result(result, self.config.limits.max_draft_characters)
            except (IdentityError, ReportError) as exc:
                problem = f"draft refused: {exc}"
        ok = result is not None and result.ok and problem is None
        said = problem or (result.reason if result else None)
        reason = None if ok else _plain(said or "draft failed")
        study = self._study_at(job, StudyState.QUEUED, StudyState.DRAFTING)
        stored = result.model_dump(mode="json") if result else None
        with self.store.transaction() as db:
            state = ("done" if ok else "failed") if study else "superseded"
            db.execute("UPDATE jobs SET state = ?, result = ?, reason = ?, finished_at = ? "
                       "WHERE id = ?", (state, json.dumps(stored) if stored else None, reason,
                                        now, job["id"]))
            if study:
                to = StudyState.DRAFTED if ok else StudyState.FAILED
                self.store.transition(db, study, to, reason=reason, now=now)
        log.info("draft.finished", job=job["id"], outcome=state, reason=reason)
        audit.draft_finished(job, state, stored, reason, now)

    def _study_at(self, job: sqlite3.Row, *states: StudyState) -> Study | None:
        study = self.store.study(job["study_uid"])
        if study and study.revision == job["revision"] and study.state in states:
            return study
        return None

    # --- lost or failed tasks ------------------------------------------------------------------

    def _expire(self) -> int:
        deadline = self.clock() - self.config.queue.effective_result_timeout
        lost = self.store.db.execute(
            f"SELECT * FROM jobs WHERE state IN {IN_FLIGHT} AND submitted_at < ?",
            (deadline,)).fetchall()
        for job in lost:
            self._retry(job, f"no result after {self.config.queue.effective_result_timeout} s")
        return len(lost)

    def requeue_running(self, reason: str) -> int:
        """The worker that held these drafts is gone (the local worker died or restarted).

        A draft whose result already reached the backend is left for ``_collect`` to take.
        """
        jobs = [job for job in self.store.db.execute("SELECT * FROM jobs WHERE state = 'drafting'")
                if not self._ready(job["task_id"])]
        for job in jobs:
            self._retry(job, reason)
        return len(jobs)

    def _ready(self, task_id: str) -> bool:
        """Whether the task's result is in (one that cannot even be read counts: _collect takes it)."""
        try:
            return bool(self.app.AsyncResult(task_id).ready())
        except Exception:  # noqa: BLE001 - see _collect_task
            return True

    def _send_at(self, job: sqlite3.Row) -> float:
        """When a pending job may go: at once, or for a retry after the delay of its attempt."""
        if job["attempt"] <= 1:
            return job["created_at"]
        delay = self.config.queue.retry_delay_seconds * 2 ** min(job["attempt"] - 2, 16)
        return job["created_at"] + min(delay, RETRY_DELAY_MAX_SECONDS)

    def _retry(self, job: sqlite3.Row, reason: str) -> None:
        study = self._study_at(job, StudyState.QUEUED, StudyState.DRAFTING)
        with self.store.transaction() as db:
            cur = db.execute("UPDATE jobs SET state = 'lost', reason = ?, finished_at = ? "
                             "WHERE id = ? AND state IN ('queued', 'drafting')",
                             (reason, self.clock(), job["id"]))
            if not cur.rowcount or study is None:
                return
            if job["attempt"] >= self.config.queue.max_attempts:
                self.store.transition(db, study, StudyState.FAILED,
                                      reason=f"{reason}; gave up after {job['attempt']} attempts")
            else:
                if study.state == StudyState.DRAFTING:
                    self.store.transition(db, study, StudyState.QUEUED,
                                          reason=f"{reason}; attempt {job['attempt'] + 1}")
                self._new_job(db, study, job["attempt"] + 1, Inputs.from_json(job["inputs"]))
        log.warning("draft.retry", job=job["id"], attempt=job["attempt"], reason=reason)
        audit.draft_retry(job, reason, gave_up=job["attempt"] >= self.config.queue.max_attempts)

    def _fail(self, study: Study, reason: str) -> int:
        moved = self.store.move(study, StudyState.FAILED, reason)
        if moved:
            log.warning("study.state", study=study.study_key, state="failed", reason=reason)
            audit.study_state(study, StudyState.FAILED, reason)
        return int(moved)


def _plain(text: str) -> str:
    """A reason from outside (a worker's words, an exception's message) as one bounded line."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."

