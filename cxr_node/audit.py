"""Audit trail: who sent what, and every step each study took, as append-only JSON lines.

One line per event in ``<state_dir>/audit.jsonl`` (0600): each association (calling AE, peer
address, accepted or why not), each instance received (study, SOP class, DIMSE status), each state
change of a study with its reason and the facts that go with it (the model that drafted it, the SR
built, who it was sent to and what they answered), re-queues, dead letters, an admin's requeue.

Receivers and the node's main process append to the same file. Each record is a single write() on
a descriptor opened with O_APPEND, so every line lands whole at the end of the file and lines of
different processes never interleave; a process killed mid-run leaves only complete lines. Only a
power cut or a full disk during a write can tear a line: the reader skips it and says so.

Study and SOP Instance UIDs are in the file (it is the audit trail, private like the database);
patient names, IDs and birth dates never are: records hold the fields below only, and a record
that carries a patient attribute is refused.

Each event function here also counts the event in the metrics, so the counters and the trail
always tell the same story. A process that opened no trail (a test driving one stage) only counts.
An event function never raises into the pipeline: an instance already stored must still be
answered with success, whatever happens to its audit line (the failure is logged).
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, get_args

import structlog

from cxr_node.durable import FILE_MODE, private_dir
from cxr_node.logs import study_key
from cxr_node.metrics import instruments
from cxr_node.store import Study, StudyState
from cxr_node.throttle import Throttle

if TYPE_CHECKING:
    from cxr_node.part10 import Header

log = structlog.get_logger("cxr_node.audit")
P = ParamSpec("P")

# Attributes that identify a patient: never in an audit record.
PATIENT_FIELDS = frozenset({"patient_name", "patient_id", "patient_birth_date",
                            "other_patient_ids", "accession_number", "indication"})
# Why an association or a connection was turned away: the metric label of each refusal.
RejectCause = Literal["wrong_called_ae_title", "unknown_calling_ae_or_address",
                      "certificate_subject", "node_busy"]  # answered with an A-ASSOCIATE-RJ
ConnectionRefusal = Literal["unknown_network", "pending_limit", "pending_per_source",
                            "pdu_too_large"]  # closed before an association was negotiated
REJECT_CAUSES: tuple[RejectCause, ...] = get_args(RejectCause)
CONNECTION_REFUSALS: tuple[ConnectionRefusal, ...] = get_args(ConnectionRefusal)
Kept = Literal["stored", "duplicate", "conflict"]
KEPT: tuple[Kept, ...] = ("stored", "duplicate", "conflict")
Refused = Literal["quarantined", "refused", "discarded"]
REFUSED: dict[Refused, str] = {"quarantined": "quarantined", "refused": "out_of_resources",
                               "discarded": "over_limits"}
Reconciled = Literal["indexed", "removed", "quarantined"]


class AuditTrail:
    """One process's handle on the audit file."""

    def __init__(self, path: Path):
        private_dir(path.parent)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        self._failures = Throttle()

    def append(self, event: str, fields: Mapping[str, Any], at: float | None = None) -> None:
        """Write one record; a failure is logged and counted, never raised into the pipeline."""
        if not event or not isinstance(event, str):
            raise ValueError(f"event: expected a name such as 'study.sent', got {event!r}")
        leaked = PATIENT_FIELDS.intersection(fields)
        if leaked:
            raise ValueError(f"audit record {event}: patient attributes {sorted(leaked)} are "
                             "never written to the audit trail")
        record = {"at": _iso(time.time() if at is None else at), "event": event,
                  **{k: v for k, v in fields.items() if v is not None}}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
                + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # disk full mid-record: end the torn line
                os.write(self._fd, b"\n")
                raise OSError(f"only {written} of {len(line)} bytes written")
        except OSError as exc:
            instruments().audit_write_errors.inc()
            repeated = self._failures.due(exc.errno)  # a full disk fails every record
            if repeated:
                log.error("audit.write_failed", audit_event=event, reason=str(exc),
                          count=repeated)

    def close(self) -> None:
        os.close(self._fd)


_trail: AuditTrail | None = None


def open_trail(path: Path) -> AuditTrail:
    """Open (once per process) the trail that the event functions below append to."""
    global _trail
    if _trail is None or _trail.path != path:
        _trail = AuditTrail(path)
    return _trail


def record(event: str, study_uid: str | None = None, at: float | None = None,
           **fields: Any) -> None:
    """Append one event to this process's trail, if it opened one."""
    if _trail is None:
        return
    study = {"study_key": study_key(study_uid), "study_uid": study_uid} if study_uid else {}
    _trail.append(event, {**study, **fields}, at)


# --- events ------------------------------------------------------------------------------------


def _guarded(event: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(event)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            event(*args, **kwargs)
        except Exception:
            log.exception("audit.event_failed", audit_event=event.__name__)

    return guarded



@_guarded
def association_accepted(calling_ae: str, peer: str) -> None:
    instruments().associations_accepted.inc()
    record("association.accepted", calling_ae=calling_ae, peer=peer)


@_guarded
def association_rejected(calling_ae: str, peer: str, reason: str, cause: RejectCause,
                         diagnostic: int, *, record_now: int = 1) -> None:
    """An A-ASSOCIATE-RJ sent, with its PS3.8 diagnostic (2: local limit, 3: calling AE title,
    7: called AE title). Counted every time; the same rejection repeated in a flood is recorded
    once per interval, with how many it stands for (``record_now``; 0: counted only)."""
    if cause not in REJECT_CAUSES:
        raise ValueError(f"cause: expected one of {REJECT_CAUSES}, got {cause!r}")
    instruments().associations_rejected.labels(cause).inc()
    if record_now:
        record("association.rejected", calling_ae=calling_ae, peer=peer, reason=reason,
               cause=cause, diagnostic=diagnostic, count=record_now)


@_guarded
def connection_refused(peer: str, cause: ConnectionRefusal, reason: str, *,
                       record_now: int = 1) -> None:
    """A connection closed before its association was negotiated. Counted every time; during a
    flood recorded once per interval, with how many refusals the record stands for
    (``record_now``; 0: counted only)."""
    if cause not in CONNECTION_REFUSALS:
        raise ValueError(f"cause: expected one of {CONNECTION_REFUSALS}, got {cause!r}")
    instruments().associations_rejected.labels(cause).inc()
    if record_now:
        record("association.refused", peer=peer, cause=cause, reason=reason, count=record_now)


@_guarded
def association_aborted(calling_ae: str, peer: str, cause: Literal["pdu_too_large"],
                        reason: str) -> None:
    """An accepted association the node aborted (A-ABORT) for what its peer sent."""
    instruments().associations_aborted.labels(cause).inc()
    record("association.aborted", calling_ae=calling_ae, peer=peer, cause=cause, reason=reason)


@_guarded
def tls_refused(peer: str, reason: str) -> None:
    """A connection whose TLS handshake failed: no association, so no AE title to name."""
    instruments().associations_rejected.labels("tls_handshake").inc()
    record("association.tls_refused", peer=peer, reason=reason)


@_guarded
def instance_kept(outcome: Kept, sop_class_uid: str, sop_instance_uid: str, study_uid: str, *,
                  calling_ae: str, peer: str) -> None:
    """A C-STORE answered with success: stored, a duplicate, or a conflicting copy kept."""
    if outcome not in KEPT:
        raise ValueError(f"outcome: expected one of {KEPT}, got {outcome!r}")
    instruments().instances_received.labels(outcome).inc()
    record(f"instance.{outcome}", study_uid, status="0x0000", sop_class_uid=sop_class_uid,
           sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, peer=peer)


@_guarded
def instance_refused(outcome: Refused, status: int, sop_class_uid: str, sop_instance_uid: str,
                     reason: str, *, calling_ae: str, peer: str) -> None:
    """A C-STORE answered with a failure status: quarantined (unusable), refused for lack of
    resources (retry later), or discarded (over the limits, too large to keep).

    The dataset may be unreadable, so the UIDs are those the C-STORE request names, as the caller
    made them fit for the trail (an invalid one is an escaped excerpt).
    """
    if outcome not in REFUSED:
        raise ValueError(f"outcome: expected one of {list(REFUSED)}, got {outcome!r}")
    instruments().instances_rejected.labels(REFUSED[outcome], f"0x{status:04X}").inc()
    record(f"instance.{outcome}", status=f"0x{status:04X}", sop_class_uid=sop_class_uid,
           sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, peer=peer, reason=reason)


@_guarded
def instance_reconciled(outcome: Reconciled, header: Header | None,
                        reason: str | None = None) -> None:
    """A spool file found at start without its index row: indexed, removed (an identical copy is
    indexed) or quarantined (not a usable dataset)."""
    instruments().instances_reconciled.labels(outcome).inc()
    uids = {"sop_instance_uid": header.sop_instance_uid} if header else {}
    record(f"instance.reconciled_{outcome}", header.study_uid if header else None,
           reason=reason, **uids)


@_guarded
def study_state(study: Study, state: StudyState, reason: str | None = None,
                at: float | None = None, **detail: Any) -> None:
    """A study moved to ``state``; reaching ``sent`` also times the whole trip."""
    at = time.time() if at is None else at
    if state == StudyState.SENT:
        instruments().end_to_end_seconds.observe(max(0.0, at - study.last_received_at))
    record(f"study.{StudyState(state).value}", study.study_uid, at, revision=study.revision,
           reason=reason, **detail)


@_guarded
def draft_finished(job: sqlite3.Row, outcome: str, result: Mapping[str, Any] | None,
                   reason: str | None, at: float) -> None:
    """A draft job's result taken: drafted (with the model that wrote it), failed, superseded."""
    m = instruments()
    m.drafts.labels(outcome).inc()
    timings = _mapping(result, "timings")
    generate = timings.get("generate_seconds")
    if isinstance(generate, (int, float)) and not isinstance(generate, bool):
        m.draft_generate_seconds.observe(generate)
    roundtrip = round(at - job["submitted_at"], 3) if job["submitted_at"] else None
    if roundtrip is not None:
        m.draft_roundtrip_seconds.observe(max(0.0, roundtrip))
    event = {"done": "study.drafted", "failed": "study.failed"}.get(outcome, f"draft.{outcome}")
    model = _mapping(result, "model")
    identity = {k: model.get(k) for k in ("name", "version", "fingerprint", "demo")}
    record(event, job["study_uid"], at, revision=job["revision"], job=job["id"],
           attempt=job["attempt"], reason=reason, model=identity if model else None,
           generate_seconds=generate, roundtrip_seconds=roundtrip, worker=timings.get("worker"))


@_guarded
def draft_retry(job: sqlite3.Row, reason: str, gave_up: bool) -> None:
    """A draft lost or failed: submitted again as a new attempt, or given up (study failed)."""
    instruments().draft_retries.labels(str(gave_up).lower()).inc()
    record("draft.gave_up" if gave_up else "draft.requeued", job["study_uid"],
           revision=job["revision"], job=job["id"], attempt=job["attempt"], reason=reason)


class Attempt(Protocol):
    study_uid: str
    sr_uid: str
    destination: str
    attempts: int


class Answer(Protocol):
    outcome: str
    reason: str
    status_hex: str | None


@_guarded
def delivery(attempt: Attempt, answer: Answer, at: float | None = None) -> None:
    """One send of a draft SR to one destination: delivered, to retry, or dead-lettered."""
    instruments().deliveries.labels(attempt.destination, answer.outcome).inc()
    record(f"outbox.{answer.outcome}", attempt.study_uid, at, destination=attempt.destination,
           sr_uid=attempt.sr_uid, attempts=attempt.attempts, status=answer.status_hex,
           reason=answer.reason or None)


@_guarded
def outbox_requeued(row: sqlite3.Row) -> None:
    """An admin sent a dead (or waiting) report again (`cxr-node requeue`)."""
    record("outbox.requeued", row["study_uid"], destination=row["destination"],
           sr_uid=row["sr_uid"], was=row["state"], status=row["last_status"],
           reason=row["reason"], by=operator())


@_guarded
def study_purged(study_uid: str, what: str, state: str, files: int, size: int, *,
                 finished_at: float, by: str | None = None) -> None:
    """Retention deleted a finished study's images, or everything left of it."""
    instruments().purges.labels("images" if what == "images" else "studies").inc()
    record(f"retention.{what}_purged", study_uid, state=state, finished=_iso(finished_at),
           files=files, bytes=size, by=by)


@_guarded
def quarantine_purged(files: int, size: int, reason: str, by: str | None = None) -> None:
    """Retention deleted quarantined datasets (too old, or the folder over its size)."""
    instruments().purges.labels("quarantine").inc()
    record("retention.quarantine_purged", files=files, bytes=size, reason=reason, by=by)


FeedbackOutcome = Literal["received", "stored", "duplicate", "ignored"]


@_guarded
def feedback_received(source: str, outcome: FeedbackOutcome, study_uid: str | None,
                      feedback_id: int | None, *, document: str | None = None,
                      reason: str | None = None, **context: Any) -> None:
    """A signed report (cxr_node/feedback.py): an SR kept to be read (received), a report kept
    to be paired (stored), one received before (duplicate), or one that does not count and why
    (ignored). ``document`` is its SOP Instance UID, MSH-10 or line hash, never its text."""
    instruments().feedback_reports.labels(source, outcome).inc()
    record(f"feedback.{outcome}", study_uid, source=source, feedback=feedback_id,
           document=document, reason=reason, **context)


@_guarded
def feedback_paired(source: str, feedback_id: int, study_uid: str, sr_uid: str,
                    scores: Mapping[str, float | None], misses: list[str]) -> None:
    """A signed report paired with a draft, with the pair's scores and significant misses."""
    m = instruments()
    m.feedback_pairs.labels(source).inc()
    for observation in misses:
        m.significant_misses.labels(observation).inc()
    record("feedback.paired", study_uid, source=source, feedback=feedback_id, sr_uid=sr_uid,
           scores=dict(scores), significant_misses=misses or None)


@_guarded
def feedback_unpaired(source: str, feedback_id: int, study_uid: str | None, reason: str) -> None:
    """A signed report that no draft came for; its text is gone."""
    record("feedback.unpaired", study_uid, source=source, feedback=feedback_id, reason=reason)


@_guarded
def feedback_purged(reports: int, files: int, by: str | None = None) -> None:
    """Retention deleted signed reports of studies the node does not hold."""
    instruments().purges.labels("feedback").inc()
    record("retention.feedback_purged", reports=reports, files=files, by=by)


def adapter_promotion(adapter: str, files: str, accepted: bool, reasons: Sequence[str],
                      scores: Mapping[str, Any]) -> None:
    """`cxr-node model promote` decided whether an adapter may draft live studies."""
    record("model.promotion", adapter=adapter, files=files,
           decision="accepted" if accepted else "refused", reasons=list(reasons),
           scores=dict(scores), by=operator())


@_guarded
def feedback_refused(peer: str, cause: str, reason: str, *, record_now: int = 1) -> None:
    """An HL7 connection or message turned away (feedback_hl7.py). Counted every time; during a
    flood recorded once per interval with the count (``record_now``; 0: counted only)."""
    instruments().feedback_refused.labels(cause).inc()
    if record_now:
        record("feedback.refused", peer=peer, cause=cause, reason=reason, count=record_now)


def _mapping(result: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """``result[key]`` if it is a mapping: a worker's result is not trusted to be well formed."""
    value = result.get(key) if isinstance(result, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def operator() -> str:
    """Who ran the command: the login behind sudo if any, else the process's user."""
    user = pwd.getpwuid(os.getuid()).pw_name
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {user})" if sudo and sudo != user else user


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trail:
    """The records of an audit file, and how many lines could not be read (torn by a crash)."""

    records: list[dict[str, Any]]
    torn: int


# Inside a JSON string these quotes would be escaped: the bytes only occur where a record starts.
RECORD_START = re.compile(re.escape(b'{"at":"'))


def read_trail(path: Path) -> Trail:
    """Every whole record; a torn one is counted, and a record appended right after it kept.

    A writer killed inside a write() of a line that spans a page boundary can leave part of the
    line without its newline, and the next record then goes on the same line: such a line is
    split where records start.
    """
    records: list[dict[str, Any]] = []
    torn = 0
    with path.open("rb") as fh:
        for raw in fh:
            whole = _record(raw)
            if whole is not None:
                records.append(whole)
                continue
            if not raw.strip():
                continue
            starts = [m.start() for m in RECORD_START.finditer(raw)]
            torn += not starts or starts[0] > 0  # a fragment before the first record start
            for start, end in zip(starts, [*starts[1:], len(raw)], strict=True):
                item = _record(raw[start:end])
                if item is None:
                    torn += 1
                else:
                    records.append(item)
    return Trail(records, torn)


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    return item if isinstance(item, dict) and "event" in item and "at" in item else None


def study_history(path: Path, uid_or_key: str, since: datetime | None = None) -> Trail:
    """One study's records, oldest first; ``since`` keeps those at or after that time."""
    trail = read_trail(path)
    cutoff = _iso(since.timestamp()) if since else ""
    chosen = [r for r in trail.records
              if uid_or_key in (r.get("study_key"), r.get("study_uid")) and r["at"] >= cutoff]
    return Trail(sorted(chosen, key=lambda r: r["at"]), trail.torn)


def history_rows(records: list[dict[str, Any]], uids: bool = False) -> Iterator[tuple[str, str, str]]:
    """(time, event, detail) per record, for a table people read; UIDs only with ``uids``
    (the trail holds them, a terminal or a ticket it is pasted into should not)."""
    for r in records:
        detail = "; ".join(f"{k}={_shown(v)}" for k, v in r.items()
                           if k not in ("at", "event", "study_key", "study_uid")
                           and (uids or not k.endswith("_uid")))
        yield r["at"].replace("T", " "), r["event"], detail


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}:{_shown(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(_shown, value))
    return str(value)
